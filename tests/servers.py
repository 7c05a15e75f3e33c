"""Servers that only the tests and the dashboard picture run beside a sidecar: the real Prometheus
(/usr/bin/prometheus from the Debian package) with a generated configuration on a free loopback
port and its own storage directory. (The sidecar's own launcher, `SidecarProcess`, is product code
in `deltawatch.sidecar.process`: the demo and `replay` start their embedded sidecar with it.)
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from deltawatch.sidecar.process import free_port, tail, terminate

PROMETHEUS = "/usr/bin/prometheus"


class PrometheusServer:
    """/usr/bin/prometheus on a free loopback port, its configuration and storage in `directory`;
    use as a context manager.

    It scrapes `targets` (host:port) as one job `job` every `interval`, plus any whole
    `scrape_configs` (for a TLS scheme, a CA, a bearer token file), and loads `rule_files`.
    """

    def __init__(
        self,
        directory: str | Path,
        targets: Iterable[str] = (),
        *,
        job: str = "deltawatch",
        interval: str = "1s",
        scrape_configs: Sequence[dict[str, Any]] = (),
        rule_files: Iterable[str | Path] = (),
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        configs = list(scrape_configs)
        targets = list(targets)
        if targets:
            configs.insert(0, {"job_name": job, "static_configs": [{"targets": targets}]})
        self.jobs = [c["job_name"] for c in configs]
        self.config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": configs,
        }
        if rule_files:
            self.config["rule_files"] = [str(p) for p in rule_files]
        self.config_path = self.directory / "prometheus.yml"
        self.log_path = self.directory / "prometheus.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        """The HTTP API's base, .../api/v1."""
        return self.url + "/api/v1"

    def start(self, timeout: float = 90.0) -> PrometheusServer:
        """Write the configuration (JSON is YAML), start Prometheus and wait until it is ready."""
        self.config_path.write_text(json.dumps(self.config, indent=1))
        self.port = free_port()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait(self._ready, "Prometheus to be ready", timeout)
        return self

    def _ready(self) -> bool:
        with urllib.request.urlopen(self.url + "/-/ready", timeout=10) as resp:
            return resp.status == 200

    def _wait(self, predicate, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if predicate():
                    return
            except (OSError, ValueError, KeyError, IndexError, AssertionError):  # not up yet
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Prometheus exited with {self.proc.returncode} while waiting for {what}; "
                    f"its log ({self.log_path}):\n{tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"gave up waiting for {what} after {timeout:.0f} s; "
                    f"Prometheus's log:\n{tail(self.log_path)}"
                )
            time.sleep(0.2)

    def get(self, path: str, **query: str) -> Any:
        """GET .../api/v1{path}?query as JSON; an HTTP error raises with Prometheus's answer."""
        url = self.api + path + ("?" + urllib.parse.urlencode(query) if query else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{url}: HTTP {e.code}: {e.read().decode()}") from None

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        body = self.get("/query", query=promql)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scrapes(self, selector: str) -> int:
        """How many samples of `selector` Prometheus holds from the last 5 minutes (its scrapes)."""
        result = self.query(f"count_over_time({selector}[5m])")
        return max((int(float(r["value"][1])) for r in result), default=0)

    def wait_for_scrapes(
        self,
        n: int = 2,
        *,
        selector: str | None = None,
        jobs: Iterable[str] | None = None,
        up: bool = False,
        timeout: float = 90.0,
    ) -> None:
        """Wait until every job (or `selector`) has at least `n` scrapes; with `up`, until each
        job's last scrape also succeeded. A bound on waiting, never a timing assertion."""
        jobs = list(self.jobs if jobs is None else jobs)
        selectors = [selector] if selector else [f'up{{job="{j}"}}' for j in jobs]

        def done() -> bool:
            if any(self.scrapes(s) < n for s in selectors):
                return False
            return not up or all(
                [r["value"][1] for r in self.query(f'up{{job="{j}"}}')] == ["1"] for j in jobs
            )

        self._wait(done, f"{n} scrapes of {', '.join(selectors)}", timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
