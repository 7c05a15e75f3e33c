"""Safetensors checkpoints on disk, read one tensor at a time (never pickle): the anchor a Monitor
reads with `anchor_checkpoint` and the checkpoints `deltawatch replay` reads
(sidecar/checkpoints.py). A model directory holds `model.safetensors`, or shards listed by
`model.safetensors.index.json` (`weight_map`: tensor -> file), or any `*.safetensors`; a single
`.safetensors` file is read as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
CONVERT_HINT = (
    "deltawatch reads safetensors only (never pickle): convert first, e.g. "
    "`model.save_pretrained(dir, safe_serialization=True)`, or verl's model merger "
    "(`python -m verl.model_merger merge --backend fsdp --local_dir ... --target_dir ...`)"
)


def safe_open_pt(path: Path):
    """safetensors' `safe_open` on one file, torch tensors (imported here: the client does not
    depend on safetensors unless a checkpoint is read)."""
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise ValueError("reading checkpoints needs the safetensors package") from exc
    return safe_open(str(path), framework="pt")


class TensorFiles:
    """The tensors of one or more safetensors files, by name: shapes from the headers, tensors
    read one at a time."""

    def __init__(self, files: list[Path], where: dict[str, Path] | None = None) -> None:
        if where is None:
            where = {}
            for f in files:
                with safe_open_pt(f) as h:
                    for key in h.keys():  # noqa: SIM118 - safe_open handles are not mappings
                        where[key] = f
        self.where = where

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open_pt(self.where[name]) as h:
            return tuple(h.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The tensor's dtype as torch names it ("bfloat16", "float32", ...), from the header."""
        with safe_open_pt(self.where[name]) as h:
            code = h.get_slice(name).get_dtype()
        return _DTYPES.get(code, code.lower())

    def get(self, name: str) -> torch.Tensor:
        with safe_open_pt(self.where[name]) as h:
            return h.get_tensor(name)


def model_files(path: Path) -> TensorFiles:
    """The weights of a model directory (index, single file, or every *.safetensors) or file."""
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: not a .safetensors file. {CONVERT_HINT}")
        return TensorFiles([path])
    index = path / SAFETENSORS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: expected a non-empty 'weight_map' of tensor -> file")
        where = {k: path / v for k, v in weight_map.items()}
        missing = sorted({str(f) for f in where.values() if not f.exists()})
        if missing:
            raise ValueError(f"{index} names shard files that are missing: {missing}")
        return TensorFiles(sorted(set(where.values())), where)
    files = sorted(path.glob("*.safetensors"))
    if (path / SAFETENSORS_SINGLE).exists():
        files = [path / SAFETENSORS_SINGLE]
    if not files:
        other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        found = f" (found {other})" if other else ""
        raise ValueError(f"{path}: no .safetensors weights{found}. {CONVERT_HINT}")
    return TensorFiles(files)
