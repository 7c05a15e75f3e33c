"""Checkpoints on disk for `deltawatch replay`, read one tensor at a time (never pickle).

A checkpoint is one of:
  * a Hugging Face model directory: `model.safetensors`, or shards listed by
    `model.safetensors.index.json` (`weight_map`: tensor -> file), or any `*.safetensors` in it;
  * a single `.safetensors` file;
  * a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`) on top of
    the anchor: W_t = W0 + Σ scaling·B·A (client/lora.py); other adapter types are refused.
Tensors are read with `safe_open` one at a time, so memory stays at a few matrices whatever the
checkpoint's size. A checkpoint's step is `global_step` from its `trainer_state.json`, else the
integer after the last `-` or `_` of its name (`checkpoint-500` -> 500), else its position
(1, 2, ...) on the command line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deltawatch.client.checkpoint import CONVERT_HINT, TensorFiles, model_files
from deltawatch.client.lora import lora_scaling, lora_update

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.json"
_NAME_STEP = re.compile(r"[-_](\d+)$")
# PEFT's saved factor names: base_model.model.<module>.lora_A[.<adapter>].weight
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)


@dataclass
class LoraFactors:
    """One adapted matrix: its factors' names in the adapter file and the scaling."""

    A: str
    B: str
    scaling: float


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter directory: the factors of each adapted base weight."""

    path: Path
    files: TensorFiles
    fan_in_fan_out: bool
    factors: dict[str, LoraFactors] = field(default_factory=dict)  # base weight name -> factors

    def update(self, base_name: str) -> torch.Tensor | None:
        """ΔW = scaling·B·A of a base weight (float64), None when the adapter leaves it alone."""
        f = self.factors.get(base_name)
        if f is None:
            return None
        return lora_update(
            self.files.get(f.A),
            self.files.get(f.B),
            f.scaling,
            fan_in_fan_out=self.fan_in_fan_out,
            dtype=torch.float64,
        )


def is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).exists()


def load_adapter(path: Path) -> LoraAdapter:
    """Read a PEFT adapter's config and factor names; refuse anything that is not plain LoRA."""
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ValueError(
            f"{path}: peft_type {kind!r}; replay handles LoRA adapters (ΔW = scaling·B·A) only"
        )
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise ValueError(f"{path}: {flag}=true; replay handles plain LoRA (ΔW = scaling·B·A)")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            raise ValueError(
                f"{path}: {pattern} is set; replay handles one r and lora_alpha per adapter"
            )
    weights = path / ADAPTER_WEIGHTS
    if not weights.exists():
        raise ValueError(f"{path}: no {ADAPTER_WEIGHTS}. {CONVERT_HINT}")
    files = TensorFiles([weights])
    pairs: dict[str, dict[str, str]] = {}
    for key in files.names():
        m = _LORA_KEY.match(key)
        if m is None:
            raise ValueError(
                f"{path}: tensor {key!r} is not a LoRA factor (lora_A / lora_B); adapters with "
                f"modules_to_save or other trained tensors are not supported by replay"
            )
        pairs.setdefault(m["module"] + ".weight", {})[m["ab"]] = key
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    scaling = lora_scaling(alpha, r, bool(config.get("use_rslora", False)))
    adapter = LoraAdapter(path, files, bool(config.get("fan_in_fan_out", False)))
    for base, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: {base} has lora_{''.join(ab)} but not both A and B")
        adapter.factors[base] = LoraFactors(ab["A"], ab["B"], scaling)
    return adapter


def checkpoint_step(path: Path, position: int) -> int:
    """`global_step` of trainer_state.json, else the integer after the last -/_ of the name,
    else `position`."""
    state = (path if path.is_dir() else path.parent) / TRAINER_STATE
    if path.is_dir() and state.exists():
        step = json.loads(state.read_text()).get("global_step")
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    m = _NAME_STEP.search(path.stem if path.is_file() else path.name)
    return int(m.group(1)) if m else position


def match_names(wanted: list[str], available: list[str], where: str) -> dict[str, str]:
    """anchor name -> the checkpoint's name for it: the same name, else the one name that differs
    only by a leading prefix (`bert.encoder...` vs `encoder...`). Raises naming what is missing."""
    have = set(available)
    out: dict[str, str] = {}
    missing = []
    for name in wanted:
        if name in have:
            out[name] = name
            continue
        near = [k for k in available if k.endswith("." + name) or name.endswith("." + k)]
        if len(near) == 1:
            out[name] = near[0]
        else:
            missing.append(name)
    if missing:
        raise ValueError(
            f"{where}: no tensor for {len(missing)} anchor matrices (first: {missing[0]!r}); "
            "the checkpoint must hold the anchor's parameters under the same names"
        )
    return out


@dataclass
class Checkpoint:
    """One CKPT argument: where it is, its step, and how to read W_t of a matrix."""

    path: Path
    step: int
    files: TensorFiles | None = None  # full weights
    adapter: LoraAdapter | None = None
    names: dict[str, str] = field(default_factory=dict)  # anchor name -> name in `files`

    @property
    def kind(self) -> str:
        return "adapter" if self.adapter is not None else "weights"

    def weight(self, name: str, W0: torch.Tensor) -> torch.Tensor:
        """W_t of anchor matrix `name`; an adapter's as W0 + ΔW in float64 (exact to the view)."""
        if self.adapter is None:
            return self.files.get(self.names[name])
        D = self.adapter.update(name)
        W0 = W0.double()
        return W0 if D is None else W0 + D.to(W0.device)


def open_checkpoint(path: Path, position: int, anchor_names: list[str]) -> Checkpoint:
    """A CKPT argument as a Checkpoint whose names are matched to the anchor's."""
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    step = checkpoint_step(path, position)
    if is_adapter(path):
        adapter = load_adapter(path)
        renamed = match_names(list(adapter.factors), anchor_names, f"{path} (adapter)")
        adapter.factors = {renamed[k]: v for k, v in adapter.factors.items()}
        return Checkpoint(path, step, adapter=adapter)
    files = model_files(path)
    return Checkpoint(
        path, step, files=files, names=match_names(anchor_names, files.names(), str(path))
    )
