"""Matrices with a side below r = K + p (a LoRA factor 64×4, its transpose 4×64, a 1×n gate, an
n×1 column) go end to end: Monitor -> gRPC -> a real `deltawatch serve` -> HTTP API, every value
against the exact float64 reference (`sidecar/exact.py`).

They take the exact path (one power step, `exact=True`); with n < r the basis is I_n, so G and C
are n×n: r = min(K + p, n) columns, what the sidecar accepts.
"""

from __future__ import annotations

import math

import pytest
import torch
from deltawatch.client import Monitor
from deltawatch.sidecar.exact import exact_counts, exact_keys
from support import SidecarProcess

SHAPES = {"lora_b": (64, 4), "lora_a": (4, 64), "gate": (1, 64), "column": (64, 1)}
STEPS = 3


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name, (m, n) in SHAPES.items():
            self.register_parameter(name + "_weight", torch.nn.Parameter(torch.zeros(m, n)))


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([Block()])


def weights(step: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """W_t = W0 + step·(a rank-1 direction) + faint noise, entries well above bf16's resolution."""
    g = torch.Generator().manual_seed(seed)
    W0 = 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
    u = torch.randn(shape[0], 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, shape[1], generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + step))
    return (W0 + step * 4e-3 * (u @ v) + step * 1e-3 * noise.double()).float()


def test_narrow_matrices_equal_the_float64_reference(tmp_path):
    model = Toy()
    names = {f"layers.0.{k}_weight": (k, shape) for k, shape in SHAPES.items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for i, (name, (_, shape)) in enumerate(names.items()):
            params[name].copy_(weights(0, shape, 10 * i))
    W0 = {name: p.detach().clone() for name, p in params.items()}
    with SidecarProcess(tmp_path).start() as side:
        mon = Monitor(model, run="narrow", endpoint=side.endpoint, every=1, include=r"_weight$")
        seen = {}
        for step in range(1, STEPS + 1):
            with torch.no_grad():
                for i, (name, (_, shape)) in enumerate(names.items()):
                    params[name].copy_(weights(step, shape, 10 * i))
            seen[step] = {name: p.detach().clone() for name, p in params.items()}
            mon.step(step)
        assert mon.close(timeout=60) is True
        assert mon.stats()["errors"] == {} and mon.stats()["refused"] == 0
        detail = side.get("/api/v1/runs/narrow")
        assert sorted(m["matrix"] for m in detail["matrices"]) == sorted(names)
        for name, (_, shape) in names.items():
            row = next(m for m in detail["matrices"] if m["matrix"] == name)
            assert row["shape"] == list(shape)
            hist = side.history("narrow", name)
            assert sorted(hist) == list(range(1, STEPS + 1))
            for step in hist:
                _assert_exact(hist[step], W0[name], seen[step][name], f"{name} step {step}")


def _assert_exact(got: dict, W0: torch.Tensor, Wt: torch.Tensor, where: str) -> None:
    """The exact path's keys equal float64's: norms, σ1, stable rank, top-K energy to 1e-5
    relative (float32 products), counts exactly, rotation to 1e-3°."""
    ref = exact_keys(W0, Wt, view="bf16", channel_rank=16)
    counts = exact_counts(W0, Wt, view="bf16")
    numel = W0.numel()
    assert got["convergence"] == 0.0, where
    for key in ("frobenius_norm", "spectral_norm", "stable_rank", "topk_energy_ratio"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5), f"{where} {key}"
    assert got["bf16_visible_ratio"] == counts["visible"] / numel, where
    assert counts["visible"] > 0, where
    assert got["low_magnitude_overlap"] == counts["visible_low"] / counts["visible"], where
    assert got["principal_overlap"] == counts["visible_principal"] / counts["visible"], where
    assert got["rotation_mean_degrees"] == pytest.approx(ref["rotation_mean_degrees"], abs=1e-3)
    assert got["spectral_shift_topk"] == pytest.approx(ref["spectral_shift_topk"], abs=5e-6)
    assert not math.isnan(got["frobenius_norm"])
