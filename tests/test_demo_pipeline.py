"""`deltawatch demo` end to end on a reduced setting: the real sidecar subprocess, real Monitors,
the shipped anchor and teacher, a few steps per regime; the JSON of DESIGN §4 with every regime
and every aggregate key, and the bottleneck part."""

from __future__ import annotations

import json

from deltawatch.sidecar.cli import main
from deltawatch.sidecar.engine import AGGREGATE_KEYS


def test_demo_writes_every_regime_and_key(tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = main(
        [
            "demo",
            "--steps", "6",
            "--every", "2",
            "--batch", "16",
            "--drift-step", "4",
            "--bottleneck",
            "--json", str(out),
            "--data-dir", str(tmp_path / "data"),
            "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(result["regimes"]) == {"opd", "sft", "rlvr", "opd-drift"}
    for regime, entry in result["regimes"].items():
        agg = entry["aggregate"]
        assert set(AGGREGATE_KEYS) <= set(agg), (regime, set(AGGREGATE_KEYS) - set(agg))
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert entry["lock_step"] == agg["lock_step"]
        assert agg["frobenius_norm"] > 0  # six steps of AdamW moved the weights
        assert 0.0 < agg["bf16_visible_ratio"] <= 1.0
        for alert in entry["alerts"]:  # what the trainer received, if anything fired
            assert set(alert) == {"rule", "matrix", "step", "state"}
    b = result["bottleneck"]
    assert b["channel_rank"] == 16 and b["lock_at_step"] == 2
    assert set(b["regimes"]) == {"opd", "sft"}
    for regime, entry in b["regimes"].items():
        assert entry["accuracy_free"] == result["regimes"][regime]["accuracy"]
        assert 0.0 <= entry["accuracy_bottleneck"] <= 1.0
        assert entry["locked_ratio"] == 1.0  # lock_at_step locks every matrix
        # projected from step 3 to step 6, every monitored matrix (3 layers × 7)
        assert entry["projected_gradients"] == 4 * 21
        assert 0.0 <= entry["channel_energy_ratio"] <= 1.0
    table = capsys.readouterr().out
    assert "deltawatch page: http://127.0.0.1:" in table
    assert "| regime | alert | state | step (trainer) |" in table
    for word in ("bf16_visible_ratio", "rotation_max_degrees", "accuracy", "accuracy bottleneck"):
        assert word in table
