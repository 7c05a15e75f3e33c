"""The tiny Qwen3-MoE (tests/dist/moe.py) trained under FSDP2 with a real Monitor.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist/run_moe.py \
        --endpoint HOST:PORT --run-name NAME --out DIR

`fully_shard` on every decoder layer and the root (gloo, CPU) shards each packed expert parameter
Shard(0) over the experts. Each rank writes DIR/rank<k>.json: the manifest, the matrices its
Monitor computed, its counters and whether close() saw every report acknowledged.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import script_args  # noqa: E402
from deltawatch.client.monitor import Monitor  # noqa: E402
from moe import MONITOR, starve, tiny_qwen3_moe, tokens, train  # noqa: E402


def main() -> None:
    a = script_args.parse(script_args.parser(run="--run-name"), hang_seconds=150)
    dist.init_process_group("gloo")
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = tiny_qwen3_moe()
    starve(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    mon = Monitor(model, run=a.run_name, endpoint=a.endpoint, **MONITOR)
    train(model, mon, tokens())
    acknowledged = mon.close(timeout=60)
    out = {
        "manifest": mon.manifest,
        "computed": [m.name for m in mon.matrices if m.tracker is not None],
        "stats": mon.stats(),
        "acknowledged": acknowledged,
    }
    with open(os.path.join(a.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
