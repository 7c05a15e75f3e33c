"""bench/bench_hook.py at its smallest settings, so the benchmark cannot rot: it starts a real
`deltawatch serve`, trains a tiny Qwen3 with and without the Monitor, prints its tables and JSON,
and the reports it made reached the sidecar's store with ‖ΔW‖_F equal to the exact float64
‖bf16(W_t) − bf16(W0)‖_F (within the geometry core's 1e-4). No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")  # the "hf" extra, as tests/test_hf_trainer.py

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_hook.py"
TINY = [
    "--hidden=64", "--intermediate=128", "--head-dim=16", "--layers=2", "--vocab=128",
    "--batch=1", "--seq=16", "--every=2", "--rounds=2", "--block=2", "--rounds-1=1",
    "--block-1=1", "--rounds-absent=1", "--warmup=1", "--threads=1", "--bound-shapes=64x96",
    "--bound-repeats=1", "--rounds-variants=1", "--weight-every=2", "--rounds-wandb=1",
]  # fmt: skip


def load():
    spec = importlib.util.spec_from_file_location("bench_hook", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_hook_runs_and_its_reports_are_exact(tmp_path: Path, capsys) -> None:
    out = tmp_path / "hook.json"
    threads = torch.get_num_threads()
    try:
        assert load().main([*TINY, f"--json={out}"]) == 0
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert "| config | every |" in stdout and "Check split on the training thread" in stdout
    result = json.loads(out.read_text())
    rows = {r["label"]: r for r in result["rows"]}
    variants = {
        "e2 sidecar batch_matrices=False",
        "e2 sidecar weight_every=2",
        "e2 sidecar schedule=spread",
    }
    assert set(rows) == {"e2 sidecar", "e1 sidecar", "e100 (derived)", "e2 no sidecar", *variants}

    main_row = rows["e2 sidecar"]
    assert main_row["matrices"] == 14  # 2 blocks × (q, k, v, o, gate, up, down)
    assert main_row["checks"] == 2 and rows["e1 sidecar"]["checks"] == 1
    for label in ("e2 sidecar", "e1 sidecar", *variants):
        row = rows[label]
        assert row["flushed"] is True and row["client_stats"]["errors"] == {}
        assert row["client_stats"]["dropped_reports"] == 0
        d = row["delivered"]
        assert d["in_store"] == d["checks"] > 0
        for step, exact in d["exact_frobenius"].items():
            stored = d["stored_frobenius"][step]
            # the geometry core's bound on frobenius_norm (tests/test_core_accuracy.py)
            assert exact > 0 and abs(stored - exact) <= 1e-4 * exact, (label, step, stored, exact)
    # the bound beside the check: the rates measured in this process, every report's bound
    assert result["rates"]["matmul_gflops"] > 0 and result["rates"]["memory_gbps"] > 0
    for label in ("e2 sidecar", *variants):
        assert rows[label]["bound_s"] > 0 and rows[label]["check_over_bound"] > 0
    (bound,) = result["bound"]
    assert bound["shape"] == [64, 96] and bound["without W_t"]["power_steps"][1] == 0
    assert "One matrix's settled check against its bound" in stdout and "GFLOP/s" in stdout
    # the monitored shapes alone and batched, from the same state (4 shapes: q/o, k/v, gate/up,
    # down), with and without the W_t tracker
    assert [b["W_t"] for b in result["batched"]] == ["with W_t", "without W_t"]
    for b in result["batched"]:
        assert (b["matrices"], b["groups"]) == (14, 4)
        assert b["alone_s"] > 0 and b["batched_s"] > 0 and b["bound_s"] > 0
    # spread: every step of its one 2-step block checks a slice; q_proj once per `every` steps
    assert rows["e2 sidecar schedule=spread"]["checks"] == 2
    assert rows["e2 sidecar schedule=spread"]["delivered"]["checks"] == 1
    # the peer baseline: its row, or the line saying wandb is not installed
    wandb = result["wandb"]
    assert (isinstance(wandb, dict) and wandb["rounds"] == 1) or "wandb is not installed" in wandb
    # the sidecar absent: the checks ran, nothing was acknowledged, nothing raised
    absent = rows["e2 no sidecar"]
    assert absent["checks"] == 1 and absent["client_stats"]["acknowledged"] == 0
    assert not {"check", "step", "baseline"} & set(absent["client_stats"]["errors"])
    # the split adds up to no more than the checks it was taken from
    assert sum(main_row["split"].values()) > 0
    assert {"eigh threads", "settled checks", "exact pass"} <= set(result["micro"])
    derived = rows["e100 (derived)"]
    expected = (99 * main_row["hook_noop_s"] + main_row["check_s"]) / (100 * main_row["step_off_s"])
    assert derived["overhead_amortised"] == pytest.approx(expected, rel=1e-12)
