"""The dist and hf tests' sidecar: `deltawatch.sidecar.process.SidecarProcess` seen as
(gRPC endpoint, HTTP base URL), and the environment of their torchrun children."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltawatch.sidecar.process import SidecarProcess
from support import assert_agrees
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


def torchrun_beside_reference(
    script: Path,
    out: Path,
    endpoint: str,
    run_prefix: str,
    steps: int,
    reference: list[str],
    jobs: list[tuple[int, list[str]]],
    timeout: float,
) -> tuple[dict[str, Any], str]:
    """The single-process reference (`script *reference`) in the background while each torchrun
    job (nproc, its arguments) runs in turn, all sending to `endpoint` as runs `run_prefix`-...
    for `steps` steps, then every process checked for exit 0. Returns every rank's output
    (`out`/*.json by file stem) and the jobs' stderr."""
    common = ["--endpoint", endpoint, "--run-prefix", run_prefix, "--out", str(out)]
    common += ["--steps", str(steps)]
    env = quiet_env()
    single = subprocess.Popen(
        [sys.executable, str(script), *reference, *common],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stderr = ""
    for nproc, args in jobs:
        job = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            + ["--nproc-per-node", str(nproc), str(script), *args, *common],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert job.returncode == 0, job.stdout[-5000:] + job.stderr[-10000:]
        stderr += job.stderr
    single_log, _ = single.communicate(timeout=timeout)
    assert single.returncode == 0, single_log
    return {f.stem: json.loads(f.read_text()) for f in out.glob("*.json")}, stderr


def compare_points(
    a: list[dict], b: list[dict], where: str, rel: float, slack: dict[str, float]
) -> int:
    """Two histories of one matrix point by point: nulls and flags equal, numbers within `rel`
    relative plus `slack[key]` absolute. Returns how many numbers were compared."""
    compared = 0
    for pa, pb in zip(a, b, strict=True):
        for key, va in pa.items():
            at = f"{where} step {pa['step']} {key}: {va} vs {pb[key]}"
            compared += assert_agrees(va, pb[key], at, rel, slack.get(key, 0.0))
    return compared


def get_json(base: str, path: str) -> Any:
    """GET base + /api/v1 + path as JSON."""
    return _get_json(base + "/api/v1" + path)
