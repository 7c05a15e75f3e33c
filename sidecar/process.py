"""A `deltawatch serve` child process on ephemeral loopback ports: the one way the demo, `replay`,
the tests, the benchmarks and the dashboard picture start an embedded sidecar.

`SidecarProcess` runs `python -m deltawatch.sidecar.cli serve` with `--grpc-address` and
`--http-address` on 127.0.0.1 (port 0 unless given), `--ready-file`, `--device cpu` and
`--threads`, logging to a file, and reads its ports back from the ready file.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_serial = itertools.count()


def free_port() -> int:
    """A loopback port the OS just handed out and took back (for servers that cannot bind 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def terminate(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class SidecarProcess:
    """A running `deltawatch serve` child process; use as a context manager.

    `data_dir` None: a temporary directory, removed by `stop()`. The child's environment is this
    process's without any DELTAWATCH_* variable (the flags say everything), with
    OMP_NUM_THREADS = `threads`, then `env` on top. `args` are extra `serve` flags. `grpc_port` /
    `http_port` 0: the OS picks; give the old `grpc_port` to come back where a client reconnects.
    `log_level` None: serve's own default level.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *args: str,
        threads: int = 1,
        env: Mapping[str, str] | None = None,
        grpc_port: int = 0,
        http_port: int = 0,
        log_level: str | None = "warning",
        log_name: str = "sidecar.log",
        start_timeout: float = 120.0,
    ) -> None:
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="deltawatch-sidecar-")
        self.data_dir = Path(data_dir or self._tmp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.args = tuple(args)
        self.threads = threads
        self.env = dict(env or {})
        self.log_level = log_level
        self.log_path = self.data_dir / log_name
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.grpc_port, self.http_port = grpc_port, http_port

    def command(self, ready: Path) -> list[str]:
        """The `serve` command line, writing its ports to `ready`."""
        return [
            sys.executable,
            "-m",
            "deltawatch.sidecar.cli",
            "serve",
            f"--grpc-address=127.0.0.1:{self.grpc_port}",
            f"--http-address=127.0.0.1:{self.http_port}",
            f"--data-dir={self.data_dir}",
            f"--ready-file={ready}",
            "--device=cpu",
            f"--threads={self.threads}",
            *([f"--log-level={self.log_level}"] if self.log_level else []),
            *self.args,
        ]

    def start(self, timeout: float | None = None) -> SidecarProcess:
        """Start the child and wait for its ready file (ports 0 are replaced by the real ones)."""
        timeout = self.start_timeout if timeout is None else timeout
        ready = self.data_dir / f"ready-{os.getpid()}-{next(_serial)}.json"
        ready.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAWATCH_")}
        env.update(OMP_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1", **self.env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop() and kill()
        self.proc = subprocess.Popen(
            self.command(ready), stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                ports = json.loads(ready.read_text())
                break
            except (OSError, ValueError):  # not written yet, or half written
                pass
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._close_log()
                raise RuntimeError(
                    f"the sidecar exited with {code} before it was ready; "
                    f"its log ({self.log_path}):\n{self.logtail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the sidecar was not ready within {timeout:.0f} s")
            time.sleep(0.05)
        self.grpc_port, self.http_port = int(ports["grpc_port"]), int(ports["http_port"])
        return self

    def restart(self, timeout: float | None = None) -> SidecarProcess:
        """Start again on the same data dir and the same gRPC port (after `stop()` or `kill()`);
        the HTTP port is picked anew."""
        if self.running:
            raise RuntimeError("the sidecar is still running: stop() or kill() it first")
        self.http_port = 0
        return self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the sidecar was not started"
        return self.proc.pid

    @property
    def endpoint(self) -> str:
        """The gRPC endpoint, host:port."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str, timeout: float = 30.0, **query: str) -> Any:
        """GET a JSON document from the HTTP API (`path` starts with /)."""
        url = self.http_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())

    def metrics_text(self, timeout: float = 30.0) -> str:
        """`GET /metrics`: the Prometheus text exposition."""
        with urllib.request.urlopen(self.http_url + "/metrics", timeout=timeout) as resp:
            return resp.read().decode()

    def metric(self, name: str, timeout: float = 30.0) -> float:
        """The value of the unlabelled sample `name` on /metrics (KeyError if there is none)."""
        for line in self.metrics_text(timeout).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(f"no sample {name} on /metrics")

    def run(self, run: str) -> dict[str, Any]:
        """`GET /api/v1/runs/{run}`: the run's aggregate and per-matrix keys."""
        return self.get("/api/v1/runs/" + urllib.parse.quote(run))

    def history(self, run: str, matrix: str) -> dict[int, dict[str, Any]]:
        """`GET /api/v1/runs/{run}/history?matrix=`: the matrix's points by step."""
        points = self.get(f"/api/v1/runs/{urllib.parse.quote(run)}/history", matrix=matrix)
        return {p["step"]: p for p in points["points"]}

    def logtail(self, lines: int = 20) -> str:
        return tail(self.log_path, lines)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """kill -9: no shutdown at all (the store must survive it)."""
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)
        self._close_log()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; removes a temporary data dir. The exit code
        (0: a graceful exit), None when never started."""
        code = None if self.proc is None else terminate(self.proc, timeout)
        self._close_log()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return code

    def __enter__(self) -> SidecarProcess:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
