"""Fixtures shared by test files (helpers without pytest's machinery live in support.py, and so do
the fixture factories, `sidecar_fixture` and `one_thread_fixture`)."""

from __future__ import annotations

from support import one_thread_fixture

one_thread = one_thread_fixture(scope="function", autouse=False)
