"""bench/bench_sketch.py at its smallest settings, so the benchmark cannot rot: it runs, writes its
JSON, prints its tables, and its exact reference (the float64 Gram spectrum of ΔW) agrees with the
full-SVD reference of sidecar/exact.py on the same weights. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch
from deltawatch.sidecar.exact import exact_keys

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SHAPE = (48, 64)  # min(m, n) > K + p = 32: the tracker path, not the exact one
CHECKS = 3


def load(name: str):
    """A bench/ script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_sketch_runs_and_its_reference_is_exact(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    m, n = SHAPE
    argv = [
        f"--shapes={m}x{n}",
        f"--checks={CHECKS}",
        "--report-at=1,3",
        "--niters=0,2",
        "--repeats=1",
        "--full-svd-at=1,3",
        "--full-svd-kinds=opd,sft,rlvr",
        "--threads=1",
        f"--json={out}",
    ]
    threads = torch.get_num_threads()
    try:  # in this process (one torch import, not two); main() sets one thread, as the run below
        assert load("bench_sketch").main(argv) == 0
        stdout = capsys.readouterr().out
        assert f"== {m}x{n}" in stdout and "Cost ratios" in stdout
        check_against_reference(load("trajectories"), json.loads(out.read_text()))
    finally:
        torch.set_num_threads(threads)


def check_against_reference(traj, results: dict) -> None:
    """The bench's numbers against sidecar/exact.py on the same weights."""
    m, n = SHAPE

    assert results["partial"] is False and results["settings"]["view"] == "bf16"
    (shape,) = results["shapes"]
    assert shape["shape"] == [m, n] and shape["full_svd"] is True
    assert len(results["ratios"]) == 3
    W0 = traj.pretrained_like(m, n, seed=0)
    for index, kind in enumerate(traj.KINDS):
        data = shape["kinds"][kind]
        assert [c["step"] for c in data["checks"]] == list(range(1, CHECKS + 1))
        assert all(c["power_steps"] >= 1 for c in data["checks"])
        for step, W in enumerate(traj.trajectory(kind, W0, steps=CHECKS, seed=1 + index), 1):
            if str(step) not in data["at"]:
                continue
            point = data["at"][str(step)]
            ref = exact_keys(W0, W, view="bf16", channel_rank=16)
            exact = point["exact"]
            for key in ("stable_rank", "spectral_norm", "topk_energy_ratio"):
                assert math.isclose(exact[key], ref[key], rel_tol=1e-9), (kind, step, key)
            assert math.isclose(exact["frobenius_sq"], ref["frobenius_norm"] ** 2, rel_tol=1e-12)
            # a float32 full SVD is exact to float32 rounding; every method reports every error
            for key, err in point["full_svd"]["errors"].items():
                assert err is not None and err <= 1e-4, (kind, step, key, err)
            for method in ("deltawatch", "svd_lowrank_0", "svd_lowrank_2"):
                assert all(
                    e is not None and math.isfinite(e) for e in point[method]["errors"].values()
                )
            # the printed error bound is never below the actual stable-rank (and σ1) error
            dw = point["deltawatch"]
            errors = dw["errors"]
            assert dw["bound"] >= max(errors["stable_rank"], errors["spectral_norm"]), (kind, step)
        # the OPD-like channel: issue 2's bound after 3 checks (stable rank within 2%)
        if kind == "opd":
            assert data["at"]["3"]["deltawatch"]["errors"]["stable_rank"] <= 0.02
    assert torch.equal(W0, traj.pretrained_like(m, n, seed=0))  # seeded: reproducible


def test_bench_ab_client_compares_two_checkouts_in_one_process(capsys) -> None:
    """bench/bench_ab_client.py with this tree as its own base: both clients run the same checks
    (the same power steps on every row) and the ratio line is printed."""
    ab = load("bench_ab_client")
    threads, path, modules = torch.get_num_threads(), list(sys.path), set(sys.modules)
    try:
        assert (
            ab.main(["--base", str(ROOT), "--threads", "1", "--checks", "3", "--warmup", "1"]) == 0
        )
    finally:  # the bench sets the process's threads and imports the base as `dwbase`
        torch.set_num_threads(threads)
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if name.split(".")[0] == "dwbase":
                del sys.modules[name]
    out = capsys.readouterr().out
    rows = [
        line.split("|")[1:-1]
        for line in out.splitlines()
        if line.startswith("| ") and "ms" not in line
    ]
    rows = [[c.strip() for c in r] for r in rows if r[0].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    assert all(r[3] == r[4] and int(r[3]) >= 14 for r in rows)  # every matrix steps at least once
    assert "this / base" in out
