"""A PEFT LoRA fine-tune of the tiny Qwen3 through a real Monitor, in one process or under FSDP2.

    python tests/dist/run_lora.py --faults '{"single": "", "single_faults": "..."}' \
        --endpoint HOST:PORT --run-prefix P --out DIR
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist/run_lora.py \
        --faults '{"fsdp2": "", "fsdp2_faults": "start:1:2,..."}' --endpoint HOST:PORT ...

The model is run_hf's tiny_qwen3 with intermediate size 97 (gate_proj is 97 x 64: 49 + 48 rows
over 2 ranks) and two active adapters: "default" (r 3 on q, v, gate, down; lora_A's 3 rows are
2 + 1) and "second" (r 1, rsLoRA, on q and gate: rank 1 holds an empty lora_A block). Modes
fsdp2* apply `fully_shard` to every decoder layer and to the PEFT model (Shard(0) on every base
weight and factor). Every rank trains on the same batches, so FSDP2's averaged gradient is the
single process's and the trajectories are bit-identical; AdamW steps, the Monitor checks in its
optimizer post-hook (`attach`). Each mode runs under its fault plan (DELTAWATCH_FAULT, set before
its Monitor is built; "" for none).

Each rank writes DIR/<mode>-rank<k>.json: the manifest, the Monitor's stats, whether close() saw
every report acknowledged, the element count of every collective issued during optimizer steps
(the checks run there; a counting wrapper around the real calls), and, per sharded parameter of
the first block, its global shape and local block; rank 0 writes DIR/<mode>.safetensors with the
base weights and the final factors (gathered by DTensor's own `full_tensor()`), and the single
modes also PEFT's own merged weights (`merge_and_unload`, prefix "merged."). With --refusals
(distributed), each rank then writes DIR/refusals-rank<k>.json: the Monitor's refusal message for
each sharded layout it does not read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import script_args  # noqa: E402
from deltawatch.client import sharding  # noqa: E402
from deltawatch.client.collectives import FAULT_ENV  # noqa: E402
from deltawatch.client.monitor import Monitor  # noqa: E402
from run_hf import tiny_qwen3  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from toy import CollectiveCounter  # noqa: E402

MONITOR = dict(every=1, channel_rank=4, oversample=4, max_power_steps=4)
ADAPTERS = {
    "default": dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    "second": dict(r=1, lora_alpha=2, target_modules=["q_proj", "gate_proj"], use_rslora=True),
}
INTERMEDIATE = 97  # gate/up 97 x 64 and down 64 x 97: uneven row blocks over 2 ranks


def lora_model() -> torch.nn.Module:
    """tiny_qwen3 (intermediate size 97) with both adapters of ADAPTERS active and trainable."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3().config
    config.intermediate_size = INTERMEDIATE
    torch.manual_seed(0)
    model = get_peft_model(Qwen3ForCausalLM(config), LoraConfig(**ADAPTERS["default"]))
    model.add_adapter("second", LoraConfig(**ADAPTERS["second"]))
    model.base_model.set_adapter(list(ADAPTERS))
    return model


def shard(model: torch.nn.Module) -> None:
    """FSDP2: `fully_shard` on every decoder layer, then on the whole PEFT model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def blocks(model: torch.nn.Module) -> dict[str, dict]:
    """Per sharded parameter of block 0: global shape, this rank's local shape, and whether the
    local tensor equals rows [start, stop) of DTensor's own full_tensor(), with [start, stop)
    torch.chunk's block for this rank (independent of client/sharding.py)."""
    rank, world = sharding.world()
    out = {}
    for name, p in model.named_parameters():
        if ".layers.0." not in name or not sharding.is_dtensor(p):
            continue
        chunks = torch.arange(p.shape[0]).chunk(world)
        rows = chunks[rank] if rank < len(chunks) else torch.arange(0)
        start, stop = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (p.shape[0], p.shape[0])
        full = p.full_tensor()
        out[name] = {
            "shape": list(p.shape),
            "local_shape": list(p.to_local().shape),
            "rows": [start, stop],
            "matches": bool(torch.equal(p.to_local(), full[start:stop])),
        }
    return out


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every 2-D parameter whole (DTensor's full_tensor() on every rank), and each layer's
    scaling per adapter as a 0-d float64 tensor under "<layer>.scaling.<adapter>"."""
    state = {}
    for name, p in model.named_parameters():
        if p.dim() == 2:
            state[name] = (p.full_tensor() if sharding.is_dtensor(p) else p).detach().clone()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):  # a PEFT LoRA layer: scaling = {adapter: s}
            for adapter, s in module.scaling.items():
                state[f"{name}.scaling.{adapter}"] = torch.tensor(float(s), dtype=torch.float64)
    return state


def run_mode(mode: str, plan: str, a: argparse.Namespace) -> dict:
    """One monitored fine-tune in `mode` under fault plan `plan`; what this rank saw."""
    rank, world = sharding.world()
    os.environ[FAULT_ENV] = plan
    model = lora_model()
    if mode.startswith("fsdp2"):
        shard(model)
    out: dict = {"rank": rank, "world_size": world, "mode": mode, "blocks": blocks(model)}
    W0 = full_state(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    mon = Monitor(model, run=f"{a.run_prefix}-{mode}", endpoint=a.endpoint, **MONITOR)
    mon.attach(opt)
    counter = CollectiveCounter()
    counter.install()
    g = torch.Generator().manual_seed(1)
    try:
        for _ in range(a.steps):
            ids = torch.randint(0, 128, (4, 16), generator=g)  # the same batch on every rank
            model(input_ids=ids, labels=ids).loss.backward()
            counter.active = True
            opt.step()  # the check runs in the Monitor's step post-hook
            counter.active = False
            opt.zero_grad()
    finally:
        counter.uninstall()
    out["calls"] = counter.calls
    out["manifest"] = mon.manifest
    out["computed"] = [m.name for m in mon.matrices if m.tracker is not None]
    out["acknowledged"] = mon.close(timeout=60)
    out["stats"] = mon.stats()
    state = {n: t for n, t in full_state(model).items() if ".lora_" in n or ".scaling." in n}
    state |= {n: t for n, t in W0.items() if n.endswith("base_layer.weight")}
    if world == 1:  # PEFT's own merge, for the bf16 counts of the merged weights
        merged = model.merge_and_unload()
        state |= {f"merged.{n}": p.detach() for n, p in merged.named_parameters() if p.dim() == 2}
    if rank == 0:
        save_file(state, os.path.join(a.out, f"{mode}.safetensors"))
    return out


def refusals() -> dict[str, str]:
    """The Monitor's refusal of sharded layouts it does not read (each message; "" when built):
    tensor parallel RowwiseParallel on a base weight (columns split), and a base weight sharded
    by FSDP2 while its lora_B is not."""
    from deltawatch.client.adapters import UnsupportedAdapterError
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out = {}
    for case in ("rowwise", "base_only"):
        model = lora_model()
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        if case == "rowwise":
            parallelize_module(q_proj.base_layer, mesh, RowwiseParallel())
        else:
            fully_shard(q_proj.base_layer, mesh=mesh)
        try:
            Monitor(model, run="refused", endpoint="127.0.0.1:9", **MONITOR).close(timeout=0.1)
            out[case] = ""
        except UnsupportedAdapterError as exc:
            out[case] = str(exc)
    return out


def main() -> None:
    ap = script_args.parser(steps=4)
    ap.add_argument("--faults", required=True, help='JSON: mode -> DELTAWATCH_FAULT ("" none)')
    ap.add_argument("--refusals", action="store_true", help="also write refusals-rank<k>.json")
    a = script_args.parse(ap, hang_seconds=120)
    plans = json.loads(a.faults)
    distributed = any(mode.startswith("fsdp2") for mode in plans)
    if distributed:
        dist.init_process_group("gloo")
    os.makedirs(a.out, exist_ok=True)
    for mode, plan in plans.items():
        out = run_mode(mode, plan, a)
        with open(os.path.join(a.out, f"{mode}-rank{out['rank']}.json"), "w") as f:
            json.dump(out, f)
        if distributed:
            dist.barrier()
    if a.refusals:
        with open(os.path.join(a.out, f"refusals-rank{sharding.world()[0]}.json"), "w") as f:
            json.dump(refusals(), f)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
