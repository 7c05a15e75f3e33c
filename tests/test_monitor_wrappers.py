"""A Monitor given a wrapped model (DistributedDataParallel, torch.compile) reports the same matrix
names as one given the bare model, so runs line up across launch modes."""

from __future__ import annotations

import torch
import torch.distributed as dist
from deltawatch.client import Monitor
from deltawatch.client.monitor import unwrap


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.up_proj = torch.nn.Linear(40, 24, bias=False)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(Block() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.model.layers:
            x = torch.nn.functional.pad(block.mlp.up_proj(x), (0, 16))
        return x


EXPECTED = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]


def names(model: torch.nn.Module) -> list[str]:
    # an endpoint nothing listens on: the sender thread retries in the background, never raising
    mon = Monitor(model, run="wrappers", endpoint="127.0.0.1:9", close_timeout=0.1)
    try:
        return [m.name for m in mon.matrices]
    finally:
        mon.close(timeout=0.1)


def test_compiled_model_reports_the_bare_names():
    model = Tiny()
    compiled = torch.compile(model)  # nothing is compiled until it is called
    assert unwrap(compiled) is model
    assert names(compiled) == EXPECTED


def test_ddp_model_reports_the_bare_names(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = Tiny()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert unwrap(ddp) is model
        assert names(ddp) == EXPECTED
    finally:
        dist.destroy_process_group()
