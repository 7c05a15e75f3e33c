"""Alertmanager-native alerts, against a real Alertmanager (Debian `prometheus-alertmanager`) on a
loopback port, routing to its own webhook receiver (a real aiohttp server):

* the sidecar's engine posts to /api/v2/alerts (`deltawatch serve --alertmanager-url`): a run whose
  channel moves after the lock reaches Alertmanager and its receiver, with the labels, annotations
  and generatorURL Prometheus-style senders give; an Alertmanager restarted empty gets it again (the
  re-send); a sidecar killed and restarted posts its restored alert again; the run's channel moving
  back resolves it in Alertmanager;
* the Prometheus path: a real Prometheus evaluating prometheus/deltawatch-rules.yml (its `for:`
  shortened, nothing else) on a real sidecar's /metrics sends to the same kind of Alertmanager.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from deltawatch.client import Monitor
from deltawatch.sidecar import cli
from support import (
    TINY_LAYERS,
    TINY_M,
    TINY_N,
    AlertmanagerServer,
    PrometheusServer,
    SidecarProcess,
    TinyModel,
    WebhookReceiver,
    channel,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[1]
RULES_FILE = ROOT / "prometheus" / "deltawatch-rules.yml"
LR = 3e-4
DEADLINE = 60.0  # a bound on waiting for a delivery; never a timing assertion
NAMES = {f"model.layers.{i}.mlp.up_proj.weight" for i in range(TINY_LAYERS)}
RESEND_SECONDS = 1.0


class DriftingRun:
    """A Monitor on TinyModel whose channel is `first` up to step 16, then `3 · second` (the
    update leaves its locked channel); `back()` undoes the second channel in a few steps and goes
    on along the first, so Sim_K(t, ref) recovers and the drift resolves."""

    def __init__(self, run: str, endpoint: str, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.model = TinyModel(self.g)
        self.params = [b.mlp.up_proj.weight for b in self.model.model.layers]
        self.first = [channel(self.g) for _ in self.params]
        self.second = [channel(self.g) for _ in self.params]
        self.mon = Monitor(self.model, run=run, endpoint=endpoint, every=1)
        self.step = 0

    def _advance(self, directions: list[torch.Tensor]) -> None:
        self.step += 1
        with torch.no_grad():
            for p, d in zip(self.params, directions, strict=True):
                p.add_(LR * d + 3e-6 * torch.randn(TINY_M, TINY_N, generator=self.g))
        self.mon.step(self.step)

    def drift(self) -> None:
        """Steps 1–30: locks on the first channel, then moves to the second at step 17."""
        for s in range(1, 31):
            self._advance(self.first if s <= 16 else [3.0 * b for b in self.second])

    def back(self) -> None:
        """7 steps undoing the second channel, then 6 along the first."""
        for _ in range(7):
            self._advance([-6.0 * b for b in self.second])
        for _ in range(6):
            self._advance(self.first)


def notifications(receiver: WebhookReceiver, alertname: str, status: str) -> list[dict[str, Any]]:
    return [
        b
        for b in receiver.bodies
        if b["groupLabels"].get("alertname") == alertname and b["status"] == status
    ]


def all_drifted(receiver: WebhookReceiver, status: str, after: int = 0) -> list[dict[str, Any]]:
    """The `status` SubspaceDrift notifications after the first `after` that carry every matrix
    (Alertmanager sends a group as soon as its first alert arrives, then again as it grows)."""
    return [
        b
        for b in notifications(receiver, "SubspaceDrift", status)[after:]
        if {a["labels"]["matrix"] for a in b["alerts"]} == NAMES
    ]


def same_instant(a: str, b: str) -> bool:
    """Two RFC 3339 times within a millisecond (Alertmanager may print fewer fractional digits)."""
    parse = datetime.fromisoformat
    return abs((parse(a) - parse(b)).total_seconds()) <= 1e-3


def test_alertmanager_url_flags_and_environment():
    parser = cli.build_parser(with_demo=False)
    args = parser.parse_args(
        ["serve", "--alertmanager-url", "http://a:9093", "--alertmanager-url", "http://b:9093"]
    )
    assert cli.serve_config(args, environ={}).alertmanager_url == ("http://a:9093", "http://b:9093")
    env = {"DELTAWATCH_ALERTMANAGER_URL": "http://a:9093, http://b:9093"}
    config = cli.serve_config(parser.parse_args(["serve"]), environ=env)
    assert config.alertmanager_url == ("http://a:9093", "http://b:9093")
    assert config.external_url is None
    with pytest.raises(ValueError, match="--alertmanager-url 'a:9093' must be an http"):
        cli.serve_config(parser.parse_args(["serve", "--alertmanager-url", "a:9093"]), environ={})


def test_a_drift_reaches_alertmanager_survives_restarts_and_resolves(tmp_path, one_thread):
    receiver = WebhookReceiver()
    am = AlertmanagerServer(tmp_path / "am", receiver.url).start()
    config = tmp_path / "alerts.yaml"
    # the re-send and the retry backoff shortened alike: an Alertmanager that is restarting refuses
    # posts, and the default backoff (up to 60 s) would outlast the test's wait
    alertmanager = {"resend_every_seconds": RESEND_SECONDS, "max_backoff_seconds": 2.0}
    config.write_text(yaml.safe_dump({"alertmanager": alertmanager}))
    side = SidecarProcess(
        tmp_path / "data", "--alertmanager-url", am.url, "--alert-config", str(config)
    )
    side.start()
    run = None
    try:
        run = DriftingRun("am-drift", side.endpoint, seed=0)
        run.drift()
        wait_for(
            lambda: all_drifted(receiver, "firing"),
            "SubspaceDrift of every matrix routed to Alertmanager's receiver",
            timeout=DEADLINE,
            proc=side,
        )
        body = all_drifted(receiver, "firing")[0]
        assert body["groupLabels"] == {"alertname": "SubspaceDrift", "run": "am-drift"}
        by_matrix = {a["labels"]["matrix"]: a for a in body["alerts"]}
        assert set(by_matrix) == NAMES  # per matrix; Alertmanager folded them into one group
        api = {  # other rules may fire on the same matrices
            a["matrix"]: a
            for a in side.get("/api/v1/alerts")["alerts"]
            if a["rule"] == "SubspaceDrift"
        }
        for name, alert in by_matrix.items():
            layer = name.split(".")[2]
            assert alert["labels"] == {
                "alertname": "SubspaceDrift",
                "run": "am-drift",
                "matrix": name,
                "layer": layer,
                "module": "mlp.up_proj",
                "severity": "warning",
                "service": "deltawatch",
            }
            assert alert["status"] == "firing"
            assert alert["generatorURL"] == f"{side.http_url}/runs/am-drift"
            assert alert["annotations"]["summary"].startswith(f"{name} (run am-drift, step ")
            assert "locked reference" in alert["annotations"]["description"]
            assert same_instant(alert["startsAt"], api[name]["started_at"])
        # Alertmanager holds them as active, valid for a few re-send intervals
        held = [a for a in am.alerts() if a["labels"]["alertname"] == "SubspaceDrift"]
        assert {a["labels"]["matrix"] for a in held} == NAMES
        assert {a["status"]["state"] for a in held} == {"active"}

        # an Alertmanager that lost its storage gets the alert again from the re-send (counted
        # before the restart: the re-send may reach the new Alertmanager before restart() returns)
        before = len(notifications(receiver, "SubspaceDrift", "firing"))
        am.restart()
        wait_for(
            lambda: all_drifted(receiver, "firing", before),
            "SubspaceDrift again after an empty Alertmanager restart",
            timeout=DEADLINE,
        )

        # a sidecar killed and restarted posts the alert it restored (to a new, empty Alertmanager)
        side.kill()
        am.restart()
        before = len(notifications(receiver, "SubspaceDrift", "firing"))
        side.restart()
        wait_for(
            lambda: all_drifted(receiver, "firing", before),
            "SubspaceDrift again after a sidecar restart",
            timeout=DEADLINE,
            proc=side,
        )
        again = all_drifted(receiver, "firing", before)[0]
        assert {a["generatorURL"] for a in again["alerts"]} == {f"{side.http_url}/runs/am-drift"}

        # the channel moves back: the engine resolves, Alertmanager tells its receiver
        run.back()
        wait_for(
            lambda: all_drifted(receiver, "resolved"),
            "SubspaceDrift resolved at Alertmanager's receiver",
            timeout=DEADLINE,
            proc=side,
        )
        resolved = all_drifted(receiver, "resolved")[0]
        assert {a["status"] for a in resolved["alerts"]} == {"resolved"}
        api = [a for a in side.get("/api/v1/alerts")["alerts"] if a["rule"] == "SubspaceDrift"]
        assert {a["state"] for a in api} == {"resolved"}
        ended = {a["matrix"]: a["ended_at"] for a in api}
        for a in resolved["alerts"]:  # endsAt is the engine's resolution, not an expiry
            assert same_instant(a["endsAt"], ended[a["labels"]["matrix"]])
        assert run.mon.close(timeout=DEADLINE)
    finally:
        side.stop(30)
        am.stop()
        receiver.close()


def short_for_rules(path: Path) -> Path:
    """prometheus/deltawatch-rules.yml with every `for:` set to 0s (expressions untouched)."""
    text = RULES_FILE.read_text()
    short = re.sub(r"(?m)^(\s+for:) \S+$", r"\1 0s", text)
    assert short != text
    changed = [a for a, b in zip(text.splitlines(), short.splitlines(), strict=True) if a != b]
    assert all(line.strip().startswith("for:") for line in changed)
    path.write_text(short)
    return path


def test_prometheus_rules_on_a_real_sidecar_reach_alertmanager(tmp_path, one_thread):
    receiver = WebhookReceiver()
    am = AlertmanagerServer(tmp_path / "am", receiver.url, group_by=("alertname", "run", "matrix"))
    am.start()
    side = SidecarProcess(tmp_path / "data").start()
    prometheus = PrometheusServer(
        tmp_path / "prom",
        [f"127.0.0.1:{side.http_port}"],
        rule_files=[short_for_rules(tmp_path / "deltawatch-rules.yml")],
    )
    prometheus.config["alerting"] = {
        "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am.port}"]}]}]
    }
    try:
        prometheus.start()
        run = DriftingRun("prom-drift", side.endpoint, seed=1)
        run.drift()
        assert run.mon.close(timeout=DEADLINE)
        wait_for(
            lambda: (
                {
                    a["labels"]["matrix"]
                    for b in notifications(receiver, "DeltawatchSubspaceDrift", "firing")
                    for a in b["alerts"]
                }
                == NAMES
            ),
            "DeltawatchSubspaceDrift from Prometheus at Alertmanager's receiver",
            timeout=DEADLINE,
            proc=side,
        )
        for body in notifications(receiver, "DeltawatchSubspaceDrift", "firing"):
            (alert,) = body["alerts"]
            labels = alert["labels"]
            assert labels["rule"] == "SubspaceDrift" and labels["run"] == "prom-drift"
            assert labels["severity"] == "warning" and labels["module"] == "mlp.up_proj"
            assert "left its locked channel" in alert["annotations"]["summary"]
            history = side.history("prom-drift", labels["matrix"])
            assert history[max(history)]["subspace_alignment"] < 0.7
    finally:
        prometheus.stop()
        side.stop(30)
        am.stop()
        receiver.close()
