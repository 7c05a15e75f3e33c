"""Feed the toy model's fixed weight trajectory through a real Monitor, sharded or not.

    python tests/dist/run_toy.py --modes single --endpoint HOST:PORT --run-prefix P --out DIR
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist/run_toy.py \
        --modes fsdp2,tp,ddp,fsdp1 --endpoint HOST:PORT --run-prefix P --out DIR
    python -m torch.distributed.run --standalone --nproc-per-node 4 tests/dist/run_toy.py \
        --modes fsdp2_tp,hsdp ...    # 2 x 2 meshes: (dp, tp) and (replicate, shard)

Each mode is its own run, named P-<mode>. Each rank writes DIR/<mode>-rank<k>.json: the element
count of every torch.distributed collective issued during checks (through a counting wrapper
around the real calls), the Monitor's manifest, its error counters, the wall time of each
`Monitor.step`, and whether close() saw every report acknowledged. Mode fsdp2_down is fsdp2 with
rank 1's sidecar down (its endpoint refuses connections). Mode fsdp1 writes the refusal message
instead. The weights are written, not trained: every mode sees bit-identical float32 weights at
every step (tests/dist/toy.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import script_args  # noqa: E402
from deltawatch.client import sharding  # noqa: E402
from deltawatch.client.monitor import Monitor  # noqa: E402
from toy import FUSED, CollectiveCounter, Toy, initial_weights, weights_at  # noqa: E402

MONITOR = dict(
    every=1, channel_rank=4, oversample=4, max_power_steps=4, lock_at_step=3, fused=FUSED
)
FSDP1 = ("fsdp1", "fsdp1_orig", "fsdp1_hybrid")
FLAT = (*FSDP1, "zero3")  # flat shards: after the written trajectory, one real optimizer step
# DeepSpeed ZeRO-3 in fp32 with plain SGD (no mixed precision: the written trajectory's bits are
# the single process's); its shared-memory allreduce is a C++ op JIT-built on first use (minutes
# on 2 cores), turned off so DeepSpeed's collectives go through gloo.
ZERO3 = {
    "train_micro_batch_size_per_gpu": 1,
    "optimizer": {"type": "SGD", "params": {"lr": 0.05}},
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
}


def build(mode: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model handed to the Monitor, the module whose parameters carry the plain names)."""
    torch.manual_seed(0)
    toy = Toy()
    W0 = initial_weights()
    with torch.no_grad():
        for name, p in toy.named_parameters():
            if name in W0:
                p.copy_(W0[name])
    if mode == "single":
        return toy, toy
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if mode in ("fsdp2", "fsdp2_down"):
        from torch.distributed.fsdp import fully_shard

        for block in toy.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(toy, mesh=mesh)
        return toy, toy
    if mode == "tp":
        from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

        plan = {
            name.rpartition(".")[0]: RowwiseParallel()
            for name, p in toy.named_parameters()
            if p.dim() == 2
        }
        parallelize_module(toy, mesh, plan)
        return toy, toy
    if mode == "fsdp2_tp":  # 2-D mesh: FSDP2 over tensor parallel, as torchtitan builds it
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("dp", "tp"))
        plan = {
            name.rpartition(".")[0]: RowwiseParallel() if "down_proj" in name else ColwiseParallel()
            for name, p in toy.named_parameters()
            if p.dim() == 2
        }
        parallelize_module(toy, mesh["tp"], plan)
        for block in toy.model.layers:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(toy, mesh=mesh["dp"])
        return toy, toy
    if mode == "hsdp":  # 2 replicas x 2 shards: (Replicate(), Shard(0)) on a 2-D mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(
            "cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard")
        )
        for block in toy.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(toy, mesh=mesh)
        return toy, toy
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(toy)
        return ddp.module, ddp.module  # replicated weights; the Monitor gets the plain names
    if mode in FSDP1:
        return _fsdp1(mode, toy), toy
    if mode == "zero3":
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see ZERO3
        engine, *_ = deepspeed.initialize(model=toy, config=ZERO3, dist_init_required=False)
        return engine, toy
    raise SystemExit(f"unknown mode {mode}")


def _fsdp1(mode: str, toy: torch.nn.Module) -> torch.nn.Module:
    """FSDP1 (FullyShardedDataParallel): fsdp1 = use_orig_params=False, a unit per block inside
    the root unit, FULL_SHARD; fsdp1_orig = use_orig_params=True, one root unit (one
    FlatParameter for the whole model), SHARD_GRAD_OP; fsdp1_hybrid (4 ranks) = a unit per block,
    HYBRID_SHARD on a (replicate 2, shard 2) mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from toy import Block

    kwargs: dict = {"device_id": torch.device("cpu"), "use_orig_params": mode != "fsdp1"}
    if mode != "fsdp1_orig":
        kwargs["auto_wrap_policy"] = ModuleWrapPolicy({Block})
    if mode == "fsdp1_orig":
        kwargs["sharding_strategy"] = ShardingStrategy.SHARD_GRAD_OP
    if mode == "fsdp1_hybrid":
        kwargs["sharding_strategy"] = ShardingStrategy.HYBRID_SHARD
        kwargs["device_mesh"] = init_device_mesh(
            "cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard")
        )
    return FullyShardedDataParallel(toy, **kwargs)


@contextlib.contextmanager
def full_weights(mode: str, model: torch.nn.Module, named: torch.nn.Module, writeback: bool):
    """The whole weights of a flat-sharded model, by the framework's own means (FSDP1
    `summon_full_params`, DeepSpeed `GatheredParameters`, rank 0's changes kept), so the test
    writes and reads them independently of client/flat.py; yields {name: weight tensor}."""
    names = list(initial_weights())
    if mode in FSDP1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=writeback):
            yield {n: _resolve(named, n) for n in names}
        return
    import deepspeed

    params = [_resolve(named, n) for n in names]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if writeback else None):
        yield dict(zip(names, params, strict=True))


def _resolve(module: torch.nn.Module, name: str) -> torch.Tensor:
    """module.<name> through FSDP1's attribute forwarding (the unsharded view in summon)."""
    path, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(path), attr)


def write_weights(named: torch.nn.Module, W: dict[str, torch.Tensor], verify: bool = False) -> None:
    """Write W_t into every rank's local block of each weight (no optimizer: the same bits as the
    single-process run). `verify`: gather each DTensor back with DTensor's own `full_tensor()`
    and compare, so the block layout is checked independently of client/sharding.py (a wrong
    row order would not change singular values, so the geometry alone would not show it)."""
    with torch.no_grad():
        for name, p in named.named_parameters():
            if name not in W:
                continue
            if sharding.is_dtensor(p):
                d = sharding.describe_layout(p)
                (r0, r1), (c0, c1) = d["rows"], d["cols"]
                p.to_local().copy_(W[name][r0:r1, c0:c1])
                if verify and not torch.equal(p.full_tensor(), W[name]):
                    raise AssertionError(f"{name}: local blocks do not reassemble W")
            else:
                p.copy_(W[name])


def real_step(mode, model, named, mon, step: int, W0: dict, counter) -> dict:
    """One real optimizer step (SGD on the toy's loss; DeepSpeed's engine.step() for ZeRO-3), then
    a check at `step`; returns the exact float64 ‖ΔW‖_F and bf16-visible ratio of every reported
    matrix from the framework's own gathered weights (W0 = the written trajectory's anchor)."""
    from deltawatch.client import fused
    from deltawatch.sidecar.exact import exact_counts, exact_keys

    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(7))
    if mode == "zero3":
        loss = model(x)
        model.backward(loss)
        model.step()
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        model(x).backward()
        opt.step()
    counter.active = True
    mon.step(step)
    counter.active = False
    rules = fused.parse_fused(FUSED)
    exact = {}
    with full_weights(mode, model, named, writeback=False) as full:
        for name, W in W0.items():
            for part in fused.split(name, tuple(W.shape), rules):
                r0, r1 = part.rows or (0, W.shape[0])
                w0, wt = W[r0:r1], full[name].detach()[r0:r1].clone()
                ref = exact_keys(w0, wt, view="bf16", channel_rank=MONITOR["channel_rank"])
                visible = exact_counts(w0, wt, view="bf16")["visible"]
                exact[part.name] = {
                    "frobenius_norm": ref["frobenius_norm"],
                    "bf16_visible_ratio": visible / w0.numel(),
                }
    return exact


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(mode: str, a: argparse.Namespace) -> dict:
    """One monitored run of the trajectory in `mode`; returns what this rank saw."""
    rank, world = sharding.world()
    model, named = build(mode)
    out: dict = {"rank": rank, "world_size": world, "mode": mode}
    endpoint = a.endpoint
    if mode == "fsdp2_down" and rank == 1:  # this node's sidecar is down: nothing listens there
        endpoint = f"127.0.0.1:{free_port()}"
    try:
        settings = MONITOR | json.loads(a.settings)
        mon = Monitor(model, run=f"{a.run_prefix}-{mode}", endpoint=endpoint, **settings)
    except ValueError as exc:
        out["refused"] = str(exc)
        return out
    counter = CollectiveCounter()
    counter.install()
    W0 = initial_weights()
    step_seconds = []
    try:
        for step in range(1, a.steps + 1):
            if mode in FLAT:
                with full_weights(mode, model, named, True) as full, torch.no_grad():
                    for name, W in weights_at(step, W0).items():
                        full[name].copy_(W)
            else:
                write_weights(named, weights_at(step, W0), verify=step == 1)
            counter.active = True
            t0 = time.perf_counter()
            mon.step(step)
            step_seconds.append(time.perf_counter() - t0)
            counter.active = False
        if mode in FLAT:
            out["after_step"] = real_step(mode, model, named, mon, a.steps + 1, W0, counter)
    finally:
        counter.uninstall()
    out["step_seconds"] = step_seconds
    out["calls"] = counter.calls
    out["manifest"] = mon.manifest
    out["computed"] = [m.name for m in mon.matrices if m.tracker is not None]
    out["acknowledged"] = mon.close(timeout=2 if endpoint != a.endpoint else 60)
    out["stats"] = mon.stats()
    return out


def main() -> None:
    ap = script_args.parser(steps=5)
    ap.add_argument("--modes", required=True, help="comma-separated: single | fsdp2,tp,ddp,fsdp1")
    ap.add_argument("--settings", default="{}", help="JSON object: Monitor keywords over MONITOR")
    a = script_args.parse(ap, hang_seconds=150)
    run_each(a.modes.split(","), a.out, lambda mode: run_mode(mode, a))


def run_each(modes: list[str], out_dir: str, run_one) -> None:
    """Each mode in turn (a gloo process group unless the only mode is "single"): `run_one(mode)`
    returns this rank's output, written as <out_dir>/<mode>-rank<rank>.json; the ranks wait for
    each other after each mode."""
    distributed = modes != ["single"]
    if distributed:
        dist.init_process_group("gloo")
    os.makedirs(out_dir, exist_ok=True)
    for mode in modes:
        out = run_one(mode)
        rank = dist.get_rank() if distributed else 0
        with open(os.path.join(out_dir, f"{mode}-rank{rank}.json"), "w") as f:
            json.dump(out, f, default=str)
        if distributed:
            dist.barrier()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
