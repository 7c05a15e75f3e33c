"""The command line every tests/dist script takes from its test (tests/dist/sidecar_process.py
`torchrun_beside_reference` passes --endpoint, --run-prefix, --out and --steps), and the watchdog
that makes a hung collective fail fast."""

from __future__ import annotations

import argparse
import faulthandler


def parser(*, run: str = "--run-prefix", steps: int | None = None) -> argparse.ArgumentParser:
    """--endpoint HOST:PORT, `run` (--run-prefix for a script running several modes as runs
    PREFIX-MODE, --run-name for one run), --out DIR, and --steps (default `steps`; None: none)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument(run, required=True)
    ap.add_argument("--out", required=True)
    if steps is not None:
        ap.add_argument("--steps", type=int, default=steps)
    return ap


def parse(ap: argparse.ArgumentParser, hang_seconds: float) -> argparse.Namespace:
    """The parsed arguments; a process still running after `hang_seconds` (a hung collective)
    prints every thread's stack and exits instead of waiting forever."""
    a = ap.parse_args()
    faulthandler.dump_traceback_later(hang_seconds, exit=True)
    return a
