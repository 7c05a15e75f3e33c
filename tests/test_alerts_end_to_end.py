"""SubspaceDrift on all three paths, end to end: a monitored run (a real Monitor on a torch model)
whose channel moves after the lock, streaming to a real `deltawatch serve` process; the alert
arrives in `/api/v1/alerts`, at the `--alert-webhook` receiver (a real aiohttp server on a loopback
port) and in the trainer's `Monitor(on_alert=...)` callback."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from deltawatch.client import Monitor
from prometheus_client.parser import text_string_to_metric_families
from support import (
    TINY_LAYERS as LAYERS,
)
from support import (
    TINY_M as M,
)
from support import (
    TINY_N as N,
)
from support import (
    SidecarProcess,
    TinyModel,
    WebhookReceiver,
    channel,
    get_json,
    wait_for,
)

LR = 3e-4
DEADLINE = 60.0  # generous bound on waiting for a delivery; never a timing assertion


def test_subspace_drift_reaches_the_api_the_webhook_and_the_trainer(tmp_path, one_thread):
    receiver = WebhookReceiver()
    side = SidecarProcess(tmp_path, "--alert-webhook", receiver.url).start()
    api = side.http_url
    received: list[dict[str, Any]] = []
    try:
        g = torch.Generator().manual_seed(0)
        model = TinyModel(g)
        params = [b.mlp.up_proj.weight for b in model.model.layers]
        first = [channel(g) for _ in params]
        second = [channel(g) for _ in params]
        mon = Monitor(
            model,
            run="e2e-drift",
            endpoint=side.endpoint,
            every=1,
            on_alert=received.append,
        )
        with torch.no_grad():
            for step in range(1, 31):
                for p, a, b in zip(params, first, second, strict=True):
                    direction = a if step <= 16 else 3.0 * b  # the channel moves at step 17
                    p.add_(LR * direction + 3e-6 * torch.randn(M, N, generator=g))
                mon.step(step)
        wait_for(
            lambda: any(a["rule"] == "SubspaceDrift" for a in received),
            "SubspaceDrift in on_alert",
            timeout=DEADLINE,
        )
        assert mon.close(timeout=DEADLINE)
        wait_for(
            lambda: any(b["groupLabels"]["alertname"] == "SubspaceDrift" for b in receiver.bodies),
            "SubspaceDrift at the webhook",
            timeout=DEADLINE,
        )

        # 1. the HTTP API: the run-level roll-up and one alert per matrix, all firing
        alerts = get_json(f"{api}/api/v1/alerts")["alerts"]
        drift = {a["matrix"]: a for a in alerts if a["rule"] == "SubspaceDrift"}
        names = {f"model.layers.{i}.mlp.up_proj.weight" for i in range(LAYERS)}
        assert set(drift) == {None, *names}
        assert {a["state"] for a in drift.values()} == {"firing"}
        for name in names:  # the value is the matrix's latest subspace_alignment, below 0.7
            points = get_json(f"{api}/api/v1/runs/e2e-drift/history?matrix={name}")["points"]
            assert drift[name]["value"] == points[-1]["subspace_alignment"] < 0.7
            assert points[-1]["locked"] is True and points[-1]["lock_step"] <= 16
        rollup = drift[None]
        assert set(rollup) == {
            "id",
            "rule",
            "run",
            "matrix",
            "state",
            "severity",
            "started_at",
            "ended_at",
            "value",
            "summary",
        }

        # 2. the trainer's callback got the same roll-up, as a dict of the same shape
        by_id = {a["id"]: a for a in received if a["rule"] == "SubspaceDrift"}
        assert rollup["id"] in by_id
        got = by_id[rollup["id"]]
        assert {k: got[k] for k in ("rule", "run", "state", "severity", "started_at")} == {
            k: rollup[k] for k in ("rule", "run", "state", "severity", "started_at")
        }
        assert got["matrix"] is None

        # 3. the webhook: Alertmanager v4, one group for (run, rule), matrices in an annotation
        body = [b for b in receiver.bodies if b["groupLabels"]["alertname"] == "SubspaceDrift"][-1]
        assert body["version"] == "4" and body["status"] == "firing"
        assert body["groupLabels"] == {"alertname": "SubspaceDrift", "run": "e2e-drift"}
        (alert,) = body["alerts"]
        assert alert["startsAt"] == rollup["started_at"]
        assert set(alert["annotations"]["matrices"].split(", ")) == names
        metrics = urllib.request.urlopen(f"{api}/metrics", timeout=30).read().decode()
        firing = {
            (x.labels["run"], x.labels["rule"]): x.value
            for family in text_string_to_metric_families(metrics)
            for x in family.samples
            if x.name == "deltawatch_alerts_firing"
        }
        assert firing[("e2e-drift", "SubspaceDrift")] == 2.0  # both matrices
        assert firing[("e2e-drift", "RunStalled")] == 0.0
    finally:
        side.stop(30)
        receiver.close()


def short_stall_sidecar(tmp_path: Path) -> SidecarProcess:
    """A sidecar whose --alert-config makes RunStalled fire after ~1.5 s without a report
    (min 1 s + grace 0.5 s, evaluated every 0.2 s)."""
    config = tmp_path / "alerts.json"
    config.write_text(
        json.dumps(
            {
                "run_stalled": {
                    "min_seconds": 1.0,
                    "grace_seconds": 0.5,
                    "evaluate_every_seconds": 0.2,
                }
            }
        )
    )
    return SidecarProcess(tmp_path / "data", "--alert-config", str(config)).start()


def test_run_stalled_fires_on_the_timer_and_resolves_on_the_next_report(tmp_path, one_thread):
    """The real server's timer with an --alert-config file: a trainer that stops reporting (its
    stream still open) gets RunStalled in on_alert and the API; its next report resolves it."""
    side = short_stall_sidecar(tmp_path)
    api = side.http_url
    received: list[dict[str, Any]] = []
    try:
        g = torch.Generator().manual_seed(3)
        model = TinyModel(g)
        mon = Monitor(
            model,
            run="e2e-stall",
            endpoint=side.endpoint,
            every=1,
            on_alert=received.append,
        )

        def step(s: int) -> None:
            with torch.no_grad():
                for block in model.model.layers:
                    block.mlp.up_proj.weight.add_(LR * torch.randn(M, N, generator=g))
            mon.step(s)

        for s in (1, 2, 3):
            step(s)

        def stalled(state: str) -> list[dict[str, Any]]:
            return [a for a in received if a["rule"] == "RunStalled" and a["state"] == state]

        wait_for(lambda: stalled("firing"), "RunStalled firing in on_alert", timeout=DEADLINE)
        (fired,) = stalled("firing")
        assert fired["run"] == "e2e-stall" and fired["matrix"] is None
        assert fired["severity"] == "critical" and fired["value"] > 1.5
        api_items = get_json(f"{api}/api/v1/alerts")["alerts"]
        assert fired["id"] in {a["id"] for a in api_items if a["state"] == "firing"}

        step(4)  # the trainer reports again
        wait_for(lambda: stalled("resolved"), "RunStalled resolved in on_alert", timeout=DEADLINE)
        (resolved,) = stalled("resolved")
        assert resolved["id"] == fired["id"] and resolved["ended_at"] is not None
        assert mon.close(timeout=DEADLINE)
    finally:
        side.stop(30)


def test_a_run_whose_trainer_said_goodbye_is_finished_not_stalled(tmp_path, one_thread):
    """Monitor.close() sends a Goodbye; once the run's last stream ends with it, the alert engine
    stops watching the run, so a finished run is never left stalled. (On a loaded machine the
    flush in close() can outlast the short 1.5 s window, so RunStalled may fire before the Goodbye
    arrives; the Goodbye then resolves it. Without the hook it would stay firing for hours.)"""
    side = short_stall_sidecar(tmp_path)
    api = side.http_url
    try:
        g = torch.Generator().manual_seed(4)
        model = TinyModel(g)
        mon = Monitor(model, run="e2e-done", endpoint=side.endpoint, every=1)
        for s in (1, 2, 3):
            with torch.no_grad():
                for block in model.model.layers:
                    block.mlp.up_proj.weight.add_(LR * torch.randn(M, N, generator=g))
            mon.step(s)
        assert mon.close(timeout=DEADLINE)
        time.sleep(5.0)  # several stall windows of the configured timer
        stalled = [
            a
            for a in get_json(f"{api}/api/v1/alerts")["alerts"]
            if a["run"] == "e2e-done" and a["rule"] == "RunStalled"
        ]
        shown = [(a["state"], a.get("summary"), a.get("started_at"), a.get("ended_at"))
                 for a in stalled]  # fmt: skip
        assert all(a["state"] == "resolved" for a in stalled), (shown, side.logtail(40))
        assert get_json(f"{api}/api/v1/runs/e2e-done")["last_step"] == 3
    finally:
        side.stop(30)
