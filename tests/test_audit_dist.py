"""The live self-audit of sharded matrices: `torchrun --standalone --nproc-per-node 2` (gloo, CPU)
feeds the toy trajectory (tests/dist/toy.py) through FSDP2 `fully_shard` (row blocks, a fused QKV
split across ranks) and FSDP1 (flat slices of the row-major weight) with `audit_every=1`; each rank
sends only its own block(s), the real sidecar assembles them, and the audit's exact keys equal an
independent float64 numpy computation from the trajectory's W_t − W0, with every live key within
its stated bound. A block missing would leave the audit pending, never wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from deltawatch.client import fused
from deltawatch.sidecar.audit import AUDITED_KEYS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
import sidecar_process as serve  # noqa: E402
from support import wait_for  # noqa: E402
from test_audit_live import bf16_view_delta, numpy_keys  # noqa: E402
from toy import FUSED, initial_weights, weights_at  # noqa: E402

SCRIPT = ROOT / "tests" / "dist" / "run_toy.py"
MODES = ("fsdp2", "fsdp1")
STEPS = 3  # step t audits matrix t of the rotation: three matrices per mode
K = 4  # channel_rank in tests/dist/run_toy.py MONITOR

pytestmark = pytest.mark.timeout(300)


def parts() -> dict[str, tuple[str, tuple[int, int]]]:
    """Reported matrix name -> (parameter name, its rows), the fused QKV split as the run does."""
    rules = fused.parse_fused(FUSED)
    out = {}
    for name, W in initial_weights().items():
        for part in fused.split(name, tuple(W.shape), rules):
            out[part.name] = (name, part.rows or (0, W.shape[0]))
    return out


def audited(base: str, run: str) -> int:
    """Audits of `run` complete with their live keys (the report of a check may be stored after
    its audit: its ratios are filled in then)."""
    items = serve.get_json(base, f"/runs/{run}")["audit"]["matrices"]
    return sum(i["keys"]["frobenius_norm"]["error_ratio"] is not None for i in items)


def test_each_rank_sends_its_block_and_the_sidecar_audits_the_whole(tmp_path):
    with serve.sidecar(tmp_path) as (endpoint, base):
        job = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             "2", str(SCRIPT), "--modes", ",".join(MODES), "--endpoint", endpoint,
             "--run-prefix", "audit", "--out", str(tmp_path / "ranks"), "--steps", str(STEPS),
             "--settings", '{"audit_every": 1}'],
            env=serve.quiet_env(), capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
        W0 = initial_weights()
        where = parts()
        for mode in MODES:
            run = f"audit-{mode}"
            wait_for(lambda r=run: audited(base, r) >= STEPS, f"{run}: {STEPS} audits")
            audit = serve.get_json(base, f"/runs/{run}")["audit"]
            rank0 = json.loads((tmp_path / "ranks" / f"{mode}-rank0.json").read_text())
            layout = {e["matrix"]: e["shard_layout"] for e in rank0["manifest"]}
            assert audit["pending"] == 0 and audit["skipped"] == 0
            compared = 0
            for item in audit["matrices"]:
                for key in AUDITED_KEYS:
                    ratio = item["keys"][key]["error_ratio"]
                    assert ratio is not None and ratio <= 1, (run, item["matrix"], key, ratio)
                    print(f"{run} {item['matrix']} step {item['step']} {key}: ratio {ratio:.3g}")
                if item["step"] > STEPS:  # fsdp1's real optimizer step: W_t unknown here
                    continue
                assert layout[item["matrix"]] == {"fsdp2": "rows", "fsdp1": "flat"}[mode]
                param, (r0, r1) = where[item["matrix"]]
                W_t = weights_at(item["step"], W0)[param][r0:r1]
                ref = numpy_keys(bf16_view_delta(W_t, W0[param][r0:r1]), K)
                for key in AUDITED_KEYS:
                    got = item["keys"][key]["exact"]
                    assert got == pytest.approx(ref[key], rel=1e-9), (run, item["matrix"], key)
                compared += 1
            assert compared == STEPS, (run, audit)
