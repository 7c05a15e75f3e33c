"""The README's examples run, so they cannot rot: the trainer snippet against a real sidecar, and
the `deltawatch serve` command line through the real argument parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch
from deltawatch.sidecar.cli import build_parser, serve_config
from deltawatch.sidecar.process import SidecarProcess

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


class Output:
    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss


class TinyLM(torch.nn.Module):
    """Two blocks with `model.layers.{i}.mlp.up_proj.weight`, called like a transformers model."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        for _ in range(2):
            block = torch.nn.Module()
            block.mlp = torch.nn.Module()
            block.mlp.up_proj = torch.nn.Linear(48, 48, bias=False)
            with torch.no_grad():
                block.mlp.up_proj.weight.copy_(torch.randn(48, 48, generator=g) / 7)
            self.model.layers.append(block)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Output:
        for block in self.model.layers:
            x = torch.tanh(block.mlp.up_proj(x))
        return Output(torch.nn.functional.mse_loss(x, y))


def test_the_trainer_snippet_reports_to_a_real_sidecar():
    (snippet,) = [b for b in code_blocks("python") if "Monitor(" in b]
    with SidecarProcess() as sidecar:
        g = torch.Generator().manual_seed(1)
        model = TinyLM()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loader = [
            {"x": torch.randn(8, 48, generator=g), "y": torch.randn(8, 48, generator=g)}
            for _ in range(20)
        ]
        code = snippet.replace('"127.0.0.1:50051"', repr(sidecar.endpoint))
        assert code != snippet, "the snippet no longer names the default endpoint"
        exec(
            compile(code, "README.md", "exec"),
            {"model": model, "optimizer": optimizer, "loader": loader},
        )
        run = sidecar.run("qwen3-opd-1")
    assert run["last_step"] == 20  # every=10: checks at steps 10 and 20
    names = [m["matrix"] for m in run["matrices"]]
    assert names == [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)]
    assert all(m["step"] == 20 and m["frobenius_norm"] > 0 for m in run["matrices"])


def test_the_serve_command_line_parses():
    (block,) = [b for b in code_blocks("bash") if "deltawatch serve" in b]
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:2] == ["deltawatch", "serve"]
    config = serve_config(build_parser(with_demo=False).parse_args(argv[1:]), environ={})
    assert config.grpc_address == "127.0.0.1:50051" and config.http_address == "127.0.0.1:9400"
    assert config.device == "cpu" and config.threads == 1
