"""A real `deltawatch serve` process on ephemeral loopback ports, for the dist and hf tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def quiet_env() -> dict[str, str]:
    """The environment for child processes: one intra-op thread each (the CI has 2 cores)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def sidecar(directory: Path) -> Iterator[tuple[str, str]]:
    """Run a sidecar with its data in `directory`; yields (gRPC endpoint, HTTP base URL)."""
    ready = directory / "ready.json"
    with open(directory / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deltawatch.sidecar.cli", "serve"]
            + ["--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0"]
            + ["--data-dir", str(directory / "data"), "--ready-file", str(ready)]
            + ["--device", "cpu"],
            env=quiet_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            for _ in range(600):
                if ready.exists() and ready.read_text().strip().endswith("}"):
                    break
                if proc.poll() is not None:
                    raise RuntimeError((directory / "serve.log").read_text())
                time.sleep(0.1)
            ports = json.loads(ready.read_text())
            yield f"127.0.0.1:{ports['grpc_port']}", f"http://127.0.0.1:{ports['http_port']}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def get_json(base: str, path: str) -> dict:
    """GET base + /api/v1 + path as JSON."""
    import urllib.request

    with urllib.request.urlopen(base + "/api/v1" + path, timeout=30) as r:
        return json.load(r)
