"""The demo's sidecar: `python -m deltawatch.sidecar.cli serve` as a subprocess on ephemeral
loopback ports, found through its ready file, and read back through its HTTP API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any


class Sidecar:
    """A running `deltawatch serve` child process; use as a context manager."""

    def __init__(self, data_dir: str | Path | None = None, threads: int = 1) -> None:
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="deltawatch-demo-")
        self.data_dir = Path(data_dir or self._tmp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        self.grpc_port = self.http_port = 0
        self.log_path = self.data_dir / "demo-sidecar.log"

    def start(self, timeout: float = 120.0) -> Sidecar:
        ready = self.data_dir / f"ready-{os.getpid()}.json"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "deltawatch.sidecar.cli",
            "serve",
            "--grpc-address=127.0.0.1:0",
            "--http-address=127.0.0.1:0",
            f"--data-dir={self.data_dir}",
            f"--ready-file={ready}",
            "--device=cpu",
            f"--threads={self.threads}",
            "--log-level=warning",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAWATCH_")}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the sidecar exited with {self.proc.returncode} before it was ready; "
                    f"its log: {self.log_path}\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the sidecar was not ready within {timeout:.0f} s")
            time.sleep(0.05)
        ports = json.loads(ready.read_text())
        self.grpc_port, self.http_port = int(ports["grpc_port"]), int(ports["http_port"])
        return self

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str, **query: str) -> Any:
        """GET a JSON document from the HTTP API."""
        url = self.http_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=30) as resp:
            return json.loads(resp.read())

    def run(self, run: str) -> dict[str, Any]:
        """`GET /api/v1/runs/{run}`: the run's aggregate and per-matrix keys."""
        return self.get("/api/v1/runs/" + urllib.parse.quote(run))

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; removes the temporary data dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Sidecar:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
