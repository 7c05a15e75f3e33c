"""The dist and hf tests' sidecar: `deltawatch.sidecar.process.SidecarProcess` seen as
(gRPC endpoint, HTTP base URL), and the environment of their torchrun children."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltawatch.sidecar.process import SidecarProcess
from support import get_json as _get_json


def quiet_env() -> dict[str, str]:
    """The environment for child processes: one intra-op thread each (the CI has 2 cores)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def sidecar(directory: Path) -> Iterator[tuple[str, str]]:
    """Run a sidecar with its data (and its log, sidecar.log) in `directory`/data; yields
    (gRPC endpoint, HTTP base URL)."""
    with SidecarProcess(directory / "data") as side:
        yield side.endpoint, side.http_url


def get_json(base: str, path: str) -> Any:
    """GET base + /api/v1 + path as JSON."""
    return _get_json(base + "/api/v1" + path)
