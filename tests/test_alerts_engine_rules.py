"""The alert rules on real engine keys: MatrixTracker checks of synthetic trajectories, ingested by
the real Engine on a real SQLite store, observed by the AlertEngine through the engine's listener.

OPD-like: the update grows inside a fixed rank-16 channel plus faint dense noise. A steady run locks
and raises nothing; a run whose channel moves to a new subspace after the lock raises
SubspaceDrift (and ChannelLeak); a one-step dense kick raises VisibilitySpike. Each verdict is also
checked against the exact float64 reference (sidecar/exact.py) of the same weights.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from deltawatch.client.naming import parse_name
from deltawatch.client.records import ManifestEntry
from deltawatch.client.tracker import MatrixTracker
from deltawatch.sidecar.alerts.config import AlertConfig
from deltawatch.sidecar.alerts.engine import AlertEngine, StoreAlertState
from deltawatch.sidecar.engine import Engine
from deltawatch.sidecar.exact import exact_keys
from deltawatch.sidecar.store import Store
from support import one_thread_fixture

M, N = 64, 128
NAMES = ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight")
LR = 3e-4  # the channel's growth per step: a few bf16 ulps of W0 spread over many steps
NOISE = 3e-6


one_thread = one_thread_fixture(scope="function")


def pretrained_like(g: torch.Generator) -> torch.Tensor:
    """W0 = U diag(i^-0.7) Vᵀ: a decaying spectrum, random singular vectors."""
    U, _ = torch.linalg.qr(torch.randn(M, M, generator=g))
    V, _ = torch.linalg.qr(torch.randn(N, N, generator=g))
    s = torch.arange(1, M + 1, dtype=torch.float32) ** -0.7
    return (U * s) @ V[:, :M].T


def channel(g: torch.Generator, k: int = 16) -> torch.Tensor:
    """A fixed rank-k direction U_c diag(1 .. 0.5) V_cᵀ."""
    U, _ = torch.linalg.qr(torch.randn(M, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(N, k, generator=g))
    return U @ torch.diag(torch.linspace(1.0, 0.5, k)) @ V.T


@dataclass
class Run:
    """A monitored toy run: trackers on the client side, the real engine and alert engine."""

    name: str
    tmp: Any
    config: AlertConfig = field(default_factory=AlertConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.g = g
        self.W0 = {n: pretrained_like(g) for n in NAMES}
        self.first = {n: channel(g) for n in NAMES}
        self.second = {n: channel(g) for n in NAMES}
        self.W = {n: w.clone() for n, w in self.W0.items()}
        self.trackers = {n: MatrixTracker.attach(n, w.clone()) for n, w in self.W0.items()}
        self.store = Store(self.tmp, synchronous="NORMAL")
        self.engine = Engine(self.store)
        self.alerts = AlertEngine(
            self.config,
            StoreAlertState(self.store),
            run_matrices=lambda run: len(self.engine.manifest(run) or []) or None,
        )
        self.engine.subscribe(self.alerts.observe)
        self.transitions: list[dict[str, Any]] = []
        self.alerts.add_sink(lambda item, matrices: self.transitions.append(item))
        manifest = []
        for n in NAMES:
            layer, module = parse_name(n)
            manifest.append(
                ManifestEntry(n, (M, N), M * N, "float32", layer, module, "replicated", 0)
            )
        self.engine.hello(self.name, 1, None, manifest, {})
        for n in NAMES:
            self.engine.baseline(self.name, 1, n, self.trackers[n].baseline())
        self.keys: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in NAMES}
        self.engine.subscribe(lambda run, m, step, keys: self.keys[m].__setitem__(step, keys))

    def step(self, step: int, *, moved: bool = False, kick: float = 0.0) -> None:
        for n in NAMES:
            direction = self.second[n] * 3.0 if moved else self.first[n]
            self.W[n] += LR * direction + NOISE * torch.randn(M, N, generator=self.g)
            if kick:
                self.W[n] += kick * torch.randn(M, N, generator=self.g)
            self.engine.ingest(self.name, 1, self.trackers[n].check(self.W[n], step))

    def exact(self, n: str) -> dict[str, Any]:
        """The float64 reference of the current weights against the client's V_ref."""
        return exact_keys(self.W0[n].double(), self.W[n].double(), v_ref=self.trackers[n].v_ref)

    def close(self) -> None:
        self.store.close()


def consecutive_breach_step(values: dict[int, Any], breach, n: int) -> int | None:
    """The first step ending n consecutive breaching checks (nulls count nothing either way)."""
    streak = 0
    for step in sorted(values):
        v = values[step]
        if v is None:
            continue
        streak = streak + 1 if breach(v) else 0
        if streak == n:
            return step
    return None


def test_a_steady_opd_like_run_locks_and_raises_no_alert(tmp_path):
    run = Run("opd-steady", tmp_path)
    for step in range(1, 31):
        run.step(step)
    for n in NAMES:
        last = run.keys[n][30]
        assert last["locked"], f"{n} never locked: {last}"
        exact = run.exact(n)
        assert exact["subspace_alignment"] > AlertConfig().subspace_drift.threshold
        assert exact["channel_energy_ratio"] > AlertConfig().channel_leak.threshold
    assert run.alerts.alerts() == []
    assert run.transitions == []
    assert set(run.alerts.firing_counts().values()) == {0}
    run.close()


def test_a_channel_that_moves_after_lock_raises_subspace_drift(tmp_path):
    run = Run("opd-drift", tmp_path)
    for step in range(1, 17):
        run.step(step)
    lock_steps = {run.keys[n][16]["lock_step"] for n in NAMES}
    assert None not in lock_steps, "the run must lock before its channel moves"
    for step in range(17, 31):
        run.step(step, moved=True)

    rule = AlertConfig().subspace_drift
    alerts = run.alerts.alerts()
    drift = {a["matrix"]: a for a in alerts if a["rule"] == "SubspaceDrift"}
    assert set(drift) == {None, *NAMES}
    for n in NAMES:
        alignments = {s: k["subspace_alignment"] for s, k in run.keys[n].items()}
        fired_at = consecutive_breach_step(
            alignments, lambda a: a < rule.threshold, rule.fire_after
        )
        assert fired_at is not None and fired_at > 16
        a = drift[n]
        assert a["state"] == "firing" and a["severity"] == rule.severity
        assert a["value"] == run.keys[n][30]["subspace_alignment"]  # the latest check's value
        assert "step 30" in a["summary"]
        # the exact float64 reference agrees: the update has left the locked channel
        assert run.exact(n)["subspace_alignment"] < rule.threshold
    rollup = drift[None]
    assert rollup["state"] == "firing" and rollup["value"] == 1.0  # both matrices of the run
    # one firing episode of the roll-up: the second matrix joining updates it, same id
    episodes = {t["id"] for t in run.transitions if t["rule"] == "SubspaceDrift"}
    assert episodes == {rollup["id"]}
    assert run.alerts.firing_counts()[("opd-drift", "SubspaceDrift")] == len(NAMES)
    # the energy left the channel too
    assert {a["matrix"] for a in alerts if a["rule"] == "ChannelLeak"} == {None, *NAMES}
    run.close()


def test_a_dense_kick_raises_visibility_spike_and_stable_rank_excursion(tmp_path):
    run = Run("rlvr-kick", tmp_path)
    for step in range(1, 31):  # the visible share rises fast at first (0.12 per check), then slows
        run.step(step)
    before = {n: run.keys[n][30]["bf16_visible_ratio"] for n in NAMES}
    assert run.alerts.alerts() == []
    run.step(31, kick=1e-3)  # once, a dense update of ~5% of W0's typical entry
    spikes = {a["matrix"]: a for a in run.alerts.alerts() if a["rule"] == "VisibilitySpike"}
    assert set(spikes) == {None, *NAMES}
    for n in NAMES:
        rise = run.keys[n][31]["bf16_visible_ratio"] - before[n]
        assert spikes[n]["value"] == pytest.approx(rise, rel=1e-12, abs=0)
        assert rise >= AlertConfig().visibility_spike.min_increase

    # the kick stays in the cumulative update: its stable rank leaves the band for good
    run.step(32)
    rule = AlertConfig().stable_rank_excursion
    excursions = {a["matrix"]: a for a in run.alerts.alerts() if a["rule"] == "StableRankExcursion"}
    assert set(excursions) == {None, *NAMES}
    for n in NAMES:
        history = [run.keys[n][s]["stable_rank"] for s in range(1, 31)]
        lock = run.keys[n][30]["lock_step"]
        window = [v for s, v in zip(range(1, 31), history, strict=True) if s >= lock]
        median = statistics.median(window[-rule.window :])
        assert excursions[n]["value"] == run.keys[n][32]["stable_rank"]
        # the exact float64 stable rank of the same weights is outside the band too
        assert run.exact(n)["stable_rank"] > rule.factor * median
    run.close()


def test_alert_state_survives_an_engine_restart(tmp_path):
    run = Run("opd-restart", tmp_path)
    for step in range(1, 17):
        run.step(step)
    for step in range(17, 31):
        run.step(step, moved=True)
    before = run.alerts.alerts()
    assert any(a["state"] == "firing" for a in before)
    run.alerts.flush()  # the AlertService flushes periodically and at shutdown
    run.close()

    store = Store(tmp_path, synchronous="NORMAL")  # a new sidecar process on the same data dir
    engine = Engine(store)
    alerts = AlertEngine(AlertConfig(), StoreAlertState(store))
    engine.subscribe(alerts.observe)
    assert alerts.alerts() == before
    store.close()
