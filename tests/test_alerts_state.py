"""Alert configuration files, hysteresis counted in checks, and state kept across a restart in the
real SQLite store."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
from deltawatch.sidecar.alerts.config import (
    AlertConfig,
    alert_config_from_mapping,
    load_alert_config,
    with_overrides,
)
from deltawatch.sidecar.alerts.engine import AlertEngine, StoreAlertState
from deltawatch.sidecar.alerts.rules import stall_threshold_seconds
from deltawatch.sidecar.store import Store

T0 = 1_764_169_200.0
RUN = "opd-run"
M = "model.layers.0.mlp.down_proj.weight"


def keys(alignment: float | None, locked: bool = True) -> dict[str, Any]:
    return {
        "locked": locked,
        "subspace_alignment": alignment,
        "channel_energy_ratio": 0.8,
        "stable_rank": 2.0,
        "bf16_visible_ratio": 0.3,
    }


def test_config_from_json_and_yaml_files(tmp_path):
    data = {
        "subspace_drift": {"threshold": 0.6, "fire_after": 5},
        "run_stalled": {"grace_seconds": 0},
        "rollup_min_matrices": 2,
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    (tmp_path / "a.yaml").write_text(
        "subspace_drift:\n  threshold: 0.6\n  fire_after: 5\nrun_stalled:\n  grace_seconds: 0\n"
        "rollup_min_matrices: 2\n"
    )
    for name in ("a.json", "a.yaml"):
        config = load_alert_config(tmp_path / name)
        assert config.subspace_drift.threshold == 0.6
        assert config.subspace_drift.fire_after == 5
        assert config.subspace_drift.resolve_after == AlertConfig().subspace_drift.resolve_after
        assert config.run_stalled.grace_seconds == 0
        assert config.rollup_min_matrices == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"subspace_drfit": {}}, "unknown key(s) ['subspace_drfit']"),
        ({"channel_leak": {"treshold": 0.3}}, "unknown key(s) ['treshold'] in channel_leak"),
        ({"subspace_drift": {"threshold": 1.5}}, "subspace_drift.threshold is a ratio in (0, 1]"),
        ({"subspace_drift": {"fire_after": 0}}, "subspace_drift.fire_after must be an integer"),
        ({"visibility_spike": {"factor": 0.5}}, "visibility_spike.factor must be > 1"),
        ({"run_stalled": {"min_seconds": -1}}, "run_stalled.min_seconds must be a number > 0"),
        ({"webhook": "http://x"}, "webhook must be a mapping"),
    ],
)
def test_bad_config_is_refused_with_the_field_named(data, message):
    with pytest.raises(ValueError) as err:
        alert_config_from_mapping(data)
    assert message in str(err.value)


def test_hysteresis_fires_after_n_and_resolves_after_m_checks():
    config = with_overrides(AlertConfig(), subspace_drift={"fire_after": 3, "resolve_after": 2})
    engine = AlertEngine(config, clock=lambda: T0)

    def state(step: int, a: float | None) -> str | None:
        engine.observe(RUN, M, step, keys(a), now=T0 + step)
        found = [x for x in engine.alerts(now=T0 + step) if x["matrix"] == M]
        return found[0]["state"] if found else None

    assert [state(s, 0.5) for s in (1, 2)] == [None, None]
    assert state(3, 0.9) is None  # a healthy check breaks the streak
    assert [state(s, 0.5) for s in (4, 5, 6)] == [None, None, "firing"]
    assert state(7, None) == "firing"  # a null estimate counts nothing either way
    assert state(8, 0.95) == "firing"
    assert state(9, 0.4) == "firing"  # the healthy streak restarts
    assert [state(s, 0.95) for s in (10, 11)] == ["firing", "resolved"]
    assert engine.firing_counts()[(RUN, "SubspaceDrift")] == 0


def test_nothing_is_judged_before_lock():
    engine = AlertEngine(with_overrides(AlertConfig(), subspace_drift={"fire_after": 1}))
    for step in range(1, 20):
        engine.observe(RUN, M, step, keys(0.1, locked=False))
    assert engine.alerts() == []


def test_state_survives_a_restart_through_the_store(tmp_path):
    config = with_overrides(AlertConfig(), subspace_drift={"fire_after": 3, "resolve_after": 2})
    store = Store(tmp_path)
    engine = AlertEngine(config, StoreAlertState(store), clock=lambda: T0)
    for step in (1, 2, 3):
        engine.observe(RUN, M, step, keys(0.5), now=T0 + step)
    firing = engine.alerts(now=T0 + 3)
    assert {a["state"] for a in firing} == {"firing"}
    # one more breaching check: the counters are mid-streak for a second matrix
    other = "model.layers.1.mlp.down_proj.weight"
    for step in (1, 2):
        engine.observe(RUN, other, step, keys(0.5), now=T0 + step)
    engine.flush()  # what the AlertService does every persist_every_seconds and at shutdown
    store.close()

    store = Store(tmp_path)  # a new process on the same data dir
    engine = AlertEngine(config, StoreAlertState(store), clock=lambda: T0 + 10)
    assert engine.alerts(now=T0 + 3) == firing  # same ids, times, values, summaries
    engine.observe(RUN, other, 3, keys(0.5), now=T0 + 13)  # the third breach in a row
    assert other in {a["matrix"] for a in engine.alerts() if a["state"] == "firing"}
    # episodes are recorded in the store's alerts table, with the API's ids
    stored = {a["id"]: a for a in store.alerts(state="firing")}
    assert {a["id"] for a in engine.alerts()} == set(stored)
    store.close()
    # and it is plain SQLite, no pickle: every alert-state value is JSON text
    con = sqlite3.connect(tmp_path / "deltawatch.sqlite3")
    for (value,) in con.execute("SELECT value FROM kv"):
        json.loads(value)
    con.close()


def test_run_stalled_on_the_timer():
    rule = AlertConfig().run_stalled
    # factor x median interval, floor and grace: intervals of 30 s -> max(60, 150) + 120
    assert stall_threshold_seconds([30.0, 30.0, 30.0], rule) == 270.0
    assert stall_threshold_seconds([5.0, 5.0], rule) == 180.0  # the floor
    assert stall_threshold_seconds([30.0], rule) == 180.0  # too few intervals: floor alone

    engine = AlertEngine(clock=lambda: T0)
    for i in range(5):  # a run checking every 30 s
        engine.observe(RUN, M, 10 * (i + 1), keys(0.9), now=T0 + 30 * i)
    last = T0 + 120
    assert engine.tick(now=last + 269) == []
    (fired,) = engine.tick(now=last + 271)
    assert fired["rule"] == "RunStalled" and fired["matrix"] is None
    assert fired["state"] == "firing" and fired["severity"] == "critical"
    assert fired["value"] == 271.0
    assert engine.firing_counts()[(RUN, "RunStalled")] == 1
    assert engine.tick(now=last + 400) == []  # still firing, no new transition
    # the next report resolves it at once
    (resolved,) = engine.observe(RUN, M, 60, keys(0.9), now=last + 500)
    assert resolved["state"] == "resolved" and resolved["id"] == fired["id"]


def test_a_run_that_said_goodbye_is_not_stalled(tmp_path):
    store = Store(tmp_path)
    engine = AlertEngine(AlertConfig(), StoreAlertState(store), clock=lambda: T0)
    engine.observe(RUN, M, 10, keys(0.9), now=T0)
    (fired,) = engine.tick(now=T0 + 200)
    (resolved,) = engine.finish_run(RUN, now=T0 + 201)
    assert (fired["state"], resolved["state"], resolved["id"]) == (
        "firing",
        "resolved",
        fired["id"],
    )
    assert engine.tick(now=T0 + 5000) == []  # finished: silence is expected
    store.close()
    store = Store(tmp_path)  # still finished after a restart
    engine = AlertEngine(AlertConfig(), StoreAlertState(store), clock=lambda: T0)
    assert engine.tick(now=T0 + 9000) == []
    engine.observe(RUN, M, 20, keys(0.9), now=T0 + 9000)  # reports again: watched again
    (again,) = engine.tick(now=T0 + 9000 + 181)
    assert again["state"] == "firing" and again["id"] != fired["id"]
    store.close()


def test_a_run_silent_past_forget_after_resolves():
    config = with_overrides(AlertConfig(), run_stalled={"forget_after_seconds": 1000.0})
    engine = AlertEngine(config, clock=lambda: T0)
    engine.observe(RUN, M, 10, keys(0.9), now=T0)
    (fired,) = engine.tick(now=T0 + 200)
    (resolved,) = engine.tick(now=T0 + 1001)
    assert (fired["state"], resolved["state"]) == ("firing", "resolved")


def test_a_sidecar_restart_is_not_a_stalled_run(tmp_path):
    """Silence counts from the sidecar's start at most: reports that stopped while the sidecar
    was down do not fire RunStalled the moment it comes back."""
    store = Store(tmp_path)
    engine = AlertEngine(AlertConfig(), StoreAlertState(store), clock=lambda: T0)
    engine.observe(RUN, M, 10, keys(0.9), now=T0)
    engine.flush()
    store.close()
    store = Store(tmp_path)
    restarted = T0 + 3600.0  # an hour later
    engine = AlertEngine(AlertConfig(), StoreAlertState(store), clock=lambda: restarted)
    assert engine.tick(now=restarted + 1) == []
    (fired,) = engine.tick(now=restarted + 181)  # the floor (60 s) plus the grace (120 s)
    assert fired["rule"] == "RunStalled" and fired["value"] == 181.0
    store.close()


def test_checks_without_a_transition_are_written_on_flush_transitions_at_once(tmp_path):
    store = Store(tmp_path)
    config = with_overrides(AlertConfig(), subspace_drift={"fire_after": 2})
    engine = AlertEngine(config, StoreAlertState(store), clock=lambda: T0)
    engine.observe(RUN, M, 1, keys(0.5), now=T0)  # one breach: counters only
    assert AlertEngine(config, StoreAlertState(store)).alerts() == []
    assert store.load_alert_state() == {}
    engine.observe(RUN, M, 2, keys(0.5), now=T0 + 1)  # fires: written before observe returns
    reloaded = AlertEngine(config, StoreAlertState(store), clock=lambda: T0)
    assert reloaded.alerts(now=T0 + 1) == engine.alerts(now=T0 + 1)
    store.close()


def test_resolved_alerts_leave_the_api_after_retention():
    config = with_overrides(AlertConfig(), subspace_drift={"fire_after": 1, "resolve_after": 1})
    engine = AlertEngine(config)
    engine.observe(RUN, M, 1, keys(0.1), now=T0)
    engine.observe(RUN, M, 2, keys(0.9), now=T0 + 10)
    assert {a["state"] for a in engine.alerts(now=T0 + 11)} == {"resolved"}
    retention = config.resolved_retention_seconds
    assert engine.alerts(now=T0 + 10 + retention + 1) == []
