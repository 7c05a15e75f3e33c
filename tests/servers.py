"""Servers that only the tests and the dashboard picture run beside a sidecar, each on a free
loopback port with its configuration and storage in its own directory: the real Prometheus
(/usr/bin/prometheus, Debian package `prometheus`) and the real Alertmanager (Debian package
`prometheus-alertmanager`); and the two waits they and the tests share, `wait_for` and `get_json`. (The sidecar's own launcher, `SidecarProcess`, is product code
in `deltawatch.sidecar.process`: the demo and `replay` start their embedded sidecar with it.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from deltawatch.sidecar.process import free_port, tail, terminate

PROMETHEUS = "/usr/bin/prometheus"


def wait_for(
    predicate: Callable[[], Any],
    what: str | Callable[[], str],
    timeout: float = 90.0,
    proc: Any = None,
) -> None:
    """Poll `predicate` every 50 ms until it is true; a predicate that raises OSError or
    AssertionError (not listening, not ready) counts as false. Fails saying `what` (or `what()`,
    for a message built at the end) after `timeout` s, or at once when `proc` (a Popen or a
    SidecarProcess) has exited. A generous bound on waiting on 2 shared cores, never a timing
    assertion."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            if predicate():
                return
        except (OSError, AssertionError) as e:
            last = e
        popen = getattr(proc, "proc", proc)
        if popen is not None and popen.poll() is not None:
            log = proc.log_tail() if hasattr(proc, "log_tail") else ""
            raise AssertionError(f"{_say(what)}: the process exited with {popen.returncode}\n{log}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"gave up waiting for {_say(what)}" + (f" ({last!r})" if last else "")
            )
        time.sleep(0.05)


def _say(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def get_json(url: str, timeout: float = 30.0) -> Any:
    """GET `url` as JSON; an HTTP error fails with the server's answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{url}: HTTP {e.code}: {e.read().decode()}") from None


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
        wait_for(self._ready, "Prometheus to be ready", timeout, proc=self)
        return self

    def _ready(self) -> bool:
        with urllib.request.urlopen(self.url + "/-/ready", timeout=10) as resp:
            return resp.status == 200

    def log_tail(self, lines: int = 20) -> str:
        return tail(self.log_path, lines)

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

        wait_for(done, f"{n} scrapes of {', '.join(selectors)}", timeout, proc=self)

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


ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"


class AlertmanagerServer:
    """/usr/bin/prometheus-alertmanager (Debian package `prometheus-alertmanager`) on a loopback
    port, clustering off, its configuration and storage under `directory`; a context manager.

    One route: every alert, grouped by `group_by`, to the webhook receiver `receiver_url` with
    `send_resolved`, after `group_wait` and every `group_interval` (short, so a test is quick).
    `restart(fresh=True)` comes back on the same port with an empty storage: an Alertmanager that
    lost everything.
    """

    def __init__(
        self,
        directory: str | Path,
        receiver_url: str,
        *,
        group_by: tuple[str, ...] = ("alertname", "run"),
        group_wait: str = "200ms",
        group_interval: str = "1s",
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config = {
            "route": {
                "receiver": "test",
                "group_by": list(group_by),
                "group_wait": group_wait,
                "group_interval": group_interval,
                "repeat_interval": "1h",
            },
            "receivers": [
                {"name": "test", "webhook_configs": [{"url": receiver_url, "send_resolved": True}]}
            ],
        }
        self.config_path = self.directory / "alertmanager.yml"
        self.log_path = self.directory / "alertmanager.log"
        self.port = free_port()
        self.starts = 0
        self.proc: subprocess.Popen | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> AlertmanagerServer:
        self.config_path.write_text(json.dumps(self.config, indent=1))  # JSON is YAML
        self.starts += 1
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                ALERTMANAGER,
                f"--config.file={self.config_path}",
                f"--storage.path={self.directory / f'data-{self.starts}'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, "Alertmanager to be ready", timeout, proc=self.proc)
        return self

    def _ready(self) -> bool:
        with urllib.request.urlopen(self.url + "/-/ready", timeout=10) as resp:
            return resp.status == 200

    def alerts(self) -> list[dict[str, Any]]:
        """GET /api/v2/alerts: what Alertmanager holds now."""
        return get_json(self.url + "/api/v2/alerts")

    def restart(self, timeout: float = 60.0) -> AlertmanagerServer:
        """Stop, then start on the same port with a new, empty storage directory."""
        self.stop()
        return self.start(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, 30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        return tail(self.log_path, lines)

    def __enter__(self) -> AlertmanagerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
