"""Peak extra memory of the deltawatch hook per rank, against the model's own weights.

Builds a transformer-shaped stack of linear layers (q/k/v/o, gate/up/down per block; fp32 or bf16
weights), measures the process before and after `Monitor(...)` attaches and around checks, and
prints one table per rank: what the hook holds (the anchor copy of the local shard, the packed
principal mask, the tracker bases and lock state) as accounted from its tensors, and what the
process actually gained (held) and peaked at (transient) while attaching and checking, in bytes
and bytes per monitored local parameter. The baseline is the model's own weights, measured the
same way in the same process.

Measurement: on the CPU the resident set (VmRSS) and its peak (VmHWM), the peak reset before each
phase through /proc/self/clear_refs (Linux), with glibc's freed blocks handed back (malloc_trim)
before every reading so that neither "held" nor the next peak hides in the allocator's arenas; with --device cuda, torch.cuda.memory_allocated and
max_memory_allocated (reset per phase), plus the host RSS for anchor="host". No sidecar is
needed: the endpoint refuses, reports wait in the bounded queue (their bytes are counted in
"held after checks").

    python bench/bench_memory.py                                   # single process, CPU
    python bench/bench_memory.py --hidden 512 --layers 1 --dtype bfloat16
    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/bench_memory.py \
        --mode fsdp2                                               # per rank, FSDP2 (gloo)
    python bench/bench_memory.py --device cuda --anchor host       # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os

import torch
import torch.distributed as dist
from deltawatch.client.settings import VIEWS
from deltawatch.sidecar.process import free_port
from torch import nn


def rss_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value, _unit = line.split()
                out[key[:-1]] = int(value) * 1024
    return out["VmRSS"], out["VmHWM"]


def settle() -> None:
    """Hand memory freed by torch back to the OS (glibc keeps freed blocks in its arenas, which
    would hide both what is really held and the next phase's transient peak)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak(device: str) -> None:
    """Reset the peak (VmHWM to the current RSS; CUDA's max_memory_allocated)."""
    settle()
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # not every sandbox allows it; the host peak then spans the whole run
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def used(device: str) -> tuple[int, int]:
    """(current, peak since the last reset) of the memory the device holds, after `settle()`."""
    settle()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    return rss_bytes()


class Block(nn.Module):
    def __init__(self, h: int, f: int, kv: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = nn.ModuleDict(
            {
                "q_proj": nn.Linear(h, h, bias=False, dtype=dtype),
                "k_proj": nn.Linear(h, kv, bias=False, dtype=dtype),
                "v_proj": nn.Linear(h, kv, bias=False, dtype=dtype),
                "o_proj": nn.Linear(h, h, bias=False, dtype=dtype),
            }
        )
        self.mlp = nn.ModuleDict(
            {
                "gate_proj": nn.Linear(h, f, bias=False, dtype=dtype),
                "up_proj": nn.Linear(h, f, bias=False, dtype=dtype),
                "down_proj": nn.Linear(f, h, bias=False, dtype=dtype),
            }
        )


class Stack(nn.Module):
    def __init__(self, layers: int, h: int, f: int, kv: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(h, f, kv, dtype) for _ in range(layers)])


def local_numel(model: nn.Module) -> int:
    from deltawatch.client import sharding

    return sum(sharding.local_block(p).numel() for p in model.parameters())


def nudge(model: nn.Module, step: int) -> None:
    """An in-place update of every local block (no new memory): W += 1e-3·sign-ish noise."""
    from deltawatch.client import sharding

    g = torch.Generator(device="cpu").manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            local = sharding.local_block(p)
            noise = torch.randn(local.shape, generator=g).to(local.device, local.dtype)
            local.add_(noise, alpha=1e-3)
            del noise


def tracker_bytes(mon) -> dict[str, int]:
    """Bytes the hook's tensors hold, accounted component by component."""
    out = {"anchor copy W0": 0, "principal mask (packed)": 0, "tracker bases and lock": 0}
    for m in mon.matrices:
        t = m.tracker
        if t is None:
            continue
        a = t.anchor
        out["anchor copy W0"] += a.W0.numel() * a.W0.element_size()
        out["principal mask (packed)"] += a.principal_packed.numel()
        state = [a.V0] + [v for v in t.state_dict().values() if isinstance(v, torch.Tensor)]
        out["tracker bases and lock"] += sum(v.numel() * v.element_size() for v in state)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("single", "fsdp2"), default="single")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--kv", type=int, default=256)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--view", choices=VIEWS, default="bf16")
    ap.add_argument("--anchor", choices=("host", "device"), default="host")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--checks", type=int, default=2)
    ap.add_argument("--json", help="also write the figures here (rank 0)")
    a = ap.parse_args()
    from deltawatch.client.monitor import Monitor

    if a.mode == "fsdp2":
        dist.init_process_group("gloo" if a.device == "cpu" else "nccl")
        if a.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = "cuda" if a.device == "cuda" else "cpu"
    dtype = getattr(torch, a.dtype)

    warm_up(Monitor, device, dtype, a)
    reset_peak(device)
    before_model, _ = used(device)
    with torch.device(device):
        model = Stack(a.layers, a.hidden, a.ffn, a.kv, dtype)
    if a.mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device, (dist.get_world_size(),))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    numel = local_numel(model)
    model_held, _ = used(device)
    model_held -= before_model
    weight_bytes = sum(t.numel() * t.element_size() for t in sharding_local(model))

    reset_peak(device)
    base, _ = used(device)
    host_base, _ = rss_bytes()
    mon = Monitor(
        model,
        run="bench-memory",
        endpoint=f"127.0.0.1:{free_port()}",
        every=1,
        view=a.view,
        anchor=a.anchor,
    )
    attach_held, attach_peak = used(device)
    host_attach, _ = rss_bytes()
    check_peaks = []
    for step in range(1, a.checks + 1):
        nudge(model, step)
        reset_peak(device)
        start, _ = used(device)
        mon.step(step)
        _, peak = used(device)
        check_peaks.append(peak - start)
    after_checks, _ = used(device)
    accounted = tracker_bytes(mon)
    queued = mon.stats()["queued_bytes"]
    mon.close(timeout=0.1)

    rows = [("model weights (baseline, local shard)", weight_bytes)]
    rows += [(k, v) for k, v in accounted.items()]
    rows += [
        ("  accounted total", sum(accounted.values())),
        ("held after attach (measured)", attach_held - base),
        ("peak during attach (measured)", attach_peak - base),
        ("peak during a check (measured, max)", max(check_peaks)),
        ("held after checks (measured)", after_checks - base),
        ("queued reports (host memory)", queued),
    ]
    if device == "cuda":
        rows.append(("host RSS gained at attach", host_attach - host_base))
    figures = {
        "rank": rank,
        "mode": a.mode,
        "device": device,
        "anchor": a.anchor,
        "view": a.view,
        "dtype": a.dtype,
        "local_params": numel,
        "model_measured_bytes": model_held,
        "rows": {name.strip(): b for name, b in rows},
    }
    lines = [
        f"rank {rank} | {a.mode} | {device} | weights {a.dtype} | view={a.view} "
        f"anchor={a.anchor} | monitored local parameters {numel:,} (model RSS delta "
        f"{model_held / 2**20:.1f} MiB)",
        f"{'':40s} {'MiB':>9s} {'B/param':>8s} {'x weights':>9s}",
    ]
    for name, b in rows:
        lines.append(
            f"{name:40s} {b / 2**20:9.2f} {b / numel:8.3f} {b / max(weight_bytes, 1):9.3f}"
        )
    if dist.is_initialized():
        for k in range(dist.get_world_size()):
            if k == rank:
                print("\n".join(lines), flush=True)
            dist.barrier()
        dist.destroy_process_group()
    else:
        print("\n".join(lines), flush=True)
    if a.json and rank == 0:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=1)


def warm_up(Monitor, device: str, dtype: torch.dtype, a: argparse.Namespace) -> None:
    """Attach to and check a tiny model once, so library code, thread pools and the allocator's
    first arenas are in place before anything is measured."""
    with torch.device(device):
        tiny = Stack(1, 64, 128, 32, dtype)
    mon = Monitor(
        tiny, run="warm-up", endpoint=f"127.0.0.1:{free_port()}", view=a.view, anchor=a.anchor
    )
    nudge(tiny, 0)
    mon.step(10)
    mon.close(timeout=0.1)
    del mon, tiny


def sharding_local(model: nn.Module):
    from deltawatch.client import sharding

    return [sharding.local_block(p) for p in model.parameters()]


if __name__ == "__main__":
    main()
