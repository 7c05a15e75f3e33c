"""The toy trajectory through a real Monitor while DELTAWATCH_FAULT makes one rank fail.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist/run_faults.py \
        --faults '{"fsdp2": "start:1:2,...", "tp": "...", "ddp": "...", "tp_project": "..."}' \
        --endpoint HOST:PORT --run-prefix P --out DIR
    python tests/dist/run_faults.py --faults '{"single": "..."}' ...    # the reference

Modes fsdp2, tp, ddp and single are tests/dist/run_toy.py's (the same model, monitor settings and
bit-identical weights; each matrix checked on its own, `batch_matrices=False`), run under the
fault plan given for the mode (set as DELTAWATCH_FAULT before its Monitor is built). Mode
tp_project trains the tensor-parallel toy with `enforce_channel=True`: SGD on a fixed synthetic gradient (the same full matrix on every rank, each rank setting its own
block), so the projection hook's column-group all-reduce runs at every step; after each optimizer
step every rank records, per matrix, how much of that step's update lies outside the locked
channel (‖ΔW(I − V_ref V_refᵀ)‖_F / ‖ΔW‖_F, from DTensor's own full_tensor()).

Each rank writes DIR/<mode>-rank<k>.json: its Monitor's stats (errors, checks_dropped,
projections_dropped), whether close() saw every report acknowledged, the collectives it issued
during checks, and (tp_project) the residuals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import script_args  # noqa: E402
from deltawatch.client import sharding  # noqa: E402
from deltawatch.client.collectives import FAULT_ENV  # noqa: E402
from deltawatch.client.monitor import Monitor  # noqa: E402
from run_toy import MONITOR, build, run_each, write_weights  # noqa: E402
from toy import CollectiveCounter, initial_weights, weights_at  # noqa: E402


def run_checks(mode: str, a: argparse.Namespace) -> dict:
    """run_toy's trajectory: weights written, a check at every step."""
    model, named = build(mode)
    # each matrix checked on its own (no same-shape batch, client/batch.py), so a fault drops one
    # matrix's check in every mode alike; tests/test_batch.py pins a failed batch
    kwargs = dict(MONITOR, batch_matrices=False)
    mon = Monitor(model, run=f"{a.run_prefix}-{mode}", endpoint=a.endpoint, **kwargs)
    counter = CollectiveCounter()
    counter.install()
    W0 = initial_weights()
    try:
        for step in range(1, a.steps + 1):
            write_weights(named, weights_at(step, W0))
            counter.active = True
            mon.step(step)
            counter.active = False
    finally:
        counter.uninstall()
    return {"calls": counter.calls, "monitor": mon}


def gradient(name: str, shape: tuple[int, int]) -> torch.Tensor:
    """A fixed synthetic gradient per matrix (the same on every rank)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(*shape, generator=g) * 1e-2


def run_project(mode: str, a: argparse.Namespace) -> dict:
    """Tensor-parallel toy, enforce_channel=True, locked at step 1: SGD on synthetic gradients."""
    from torch.distributed.tensor import DTensor

    model, named = build("tp")
    kwargs = dict(MONITOR, lock_at_step=1, enforce_channel=True)
    mon = Monitor(model, run=f"{a.run_prefix}-{mode}", endpoint=a.endpoint, **kwargs)
    params = {n: p for n, p in named.named_parameters() if p.dim() == 2}
    opt = torch.optim.SGD(params.values(), lr=1.0)
    mon.attach(opt)
    write_weights(named, weights_at(1, initial_weights()))
    by_param = {m.param_name: m for m in mon.matrices if m.rows is None}
    residuals: dict[str, list[float | None]] = {name: [] for name in by_param}
    for _ in range(a.steps):
        before = {n: p.full_tensor().clone() for n, p in params.items()}
        for n, p in params.items():
            d = sharding.describe_layout(p)
            (r0, r1), (c0, c1) = d["rows"], d["cols"]
            local = gradient(n, tuple(p.shape))[r0:r1, c0:c1].contiguous()
            p.grad = DTensor.from_local(
                local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        v_refs = {n: m.tracker.v_ref for n, m in by_param.items()}  # before this step's check
        opt.step()
        for n in by_param:
            dW = (params[n].full_tensor() - before[n]).double()
            v = v_refs[n]
            if v is None:
                residuals[n].append(None)
                continue
            v = v.double()
            outside = dW - dW @ v @ v.T
            residuals[n].append(float(outside.norm() / dW.norm()))
        opt.zero_grad()
    return {"calls": [], "monitor": mon, "residuals": residuals}


def main() -> None:
    ap = script_args.parser(steps=6)
    ap.add_argument("--faults", required=True, help="JSON: mode -> DELTAWATCH_FAULT value")
    a = script_args.parse(ap, hang_seconds=120)
    plans = json.loads(a.faults)

    def run_one(mode: str) -> dict:
        os.environ[FAULT_ENV] = plans[mode]
        result = (run_project if mode == "tp_project" else run_checks)(mode, a)
        mon = result.pop("monitor")
        result["acknowledged"] = mon.close(timeout=60)
        result["stats"] = mon.stats()
        return result

    run_each(list(plans), a.out, run_one)


if __name__ == "__main__":
    main()
