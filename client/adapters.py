"""PEFT LoRA adapters: a base matrix with active LoRA adapters is monitored as one matrix, under the
base parameter's name, whose update is the adapters' exact contribution (DESIGN §2 "Adapters").

    ΔW = Σ_a s_a · B_a · A_a  =  L · R,   L = [s_1 B_1, s_2 B_2, …] (m×q),  R = [A_1; A_2; …] (q×n)

with q = Σ_a r_a. The update is never formed as an m×n matrix for the geometry: `LowRank` is an
operator the tracker's power step multiplies with (P = L·(R·V), G = Rᵀ·(Lᵀ·P), 4·(m+n)·q·r flops)
and its Frobenius norm comes from the q×q Gram products, cross terms between adapters included:

    ‖L·R‖_F² = tr((LᵀL)(RRᵀ)) = Σ_ij (LᵀL)_ij (RRᵀ)_ij      (float64, exact)

The counting keys need the weights a merged bf16 checkpoint holds: `AdapterUpdate.merged_rows`
forms W0 + Σ_a (B_a·A_a)·s_a (PEFT's `get_delta_weight` order) for one chunk of rows at a time, in
float32, and the tracker rounds it to bf16 and compares it bitwise with bf16(W0); no merged copy is
kept. The base weight is frozen, so the live base parameter is W0 itself.

Names: PEFT's wrappers are removed (`base_model.model.` and `.base_layer`), so
`base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` is reported as
`model.layers.0.self_attn.q_proj.weight`, the name the merged checkpoint uses. The factors
`lora_A`/`lora_B` are never monitored as matrices.

Sharded (FSDP2 `fully_shard`, any layout whose base weight has its rows split and its columns
whole): each rank holds a row block of W0 (m×n) and the same rows of each B_a (FSDP2 chunks dim 0
of both by torch.chunk's rule), and a row block of each A_a (r_a×n: tiny, possibly empty). The
local rows of the update are

    ΔW[rows] = Σ_a s_a · B_a[rows] · A_a,    A_a whole on every rank

so each check assembles every A_a from its row blocks with one all-reduce of r_a·n elements
through the check's fault-isolated session (client/collectives.py `CheckSession`) — never a
gathered W0 or B. Everything else is the rows layout the tracker already runs for DTensors:
‖ΔW‖_F² is the local Gram formula summed over the row group, the counts come from the local
merged rows, P = L_local·(R·V) stays local and G = Rᵀ·(L_localᵀ·P) is summed over the rows.

Refused at construction, with the reason (never a wrong number): adapters whose update is not
s·B·A (DoRA and the other LoRA variants, IA³, LoHa, LoKr, … — any PEFT tuner layer other than plain
LoRA), adapters already merged into the base weight, LoRA on embeddings or convolutions, base
weights that are trainable or quantized, and sharded layouts other than the one above: a base
weight with columns split (tensor parallel `RowwiseParallel`, `Shard(1)`), lora_B rows split
differently from the base weight's, lora_A columns split, sharded factors on an unsharded base,
and `fan_in_fan_out` bases that are sharded.

PEFT is detected by the attributes its layers carry (`base_layer`, `lora_A`, `scaling`,
`adapter_layer_names`), so importing this module never imports peft.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .collectives import PLAIN, Reductions
from .sharding import describe_layout, is_dtensor, local_block

PEFT_PREFIX = "base_model.model."
BASE_LAYER = ".base_layer"
# The adapter attributes of a plain PEFT LoRA layer (peft.tuners.lora.LoraLayer.adapter_layer_names)
LORA_ATTRIBUTES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
LORA_ONLY = "deltawatch monitors plain LoRA adapters, whose update is scaling·B·A"

Factor = tuple[torch.Tensor, torch.Tensor, float]  # (B_a (m, r_a), A_a (r_a, n), s_a)


class UnsupportedAdapterError(ValueError):
    """An adapter whose update deltawatch cannot compute exactly."""


def base_name(name: str) -> str:
    """The parameter's name with PEFT's wrappers removed: no leading `base_model.model.`, no
    `.base_layer` segment (`…q_proj.base_layer.weight` → `…q_proj.weight`)."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    return name.replace(BASE_LAYER + ".", ".")


@dataclass(frozen=True)
class LowRank:
    """The operator ΔW = L·R (L m×q, R q×n, float32) for the power step: `@` and `.T` as a dense
    matrix has them, at O((m+n)·q) per column instead of O(m·n)."""

    L: torch.Tensor
    R: torch.Tensor

    def __matmul__(self, X: torch.Tensor) -> torch.Tensor:
        return self.L @ (self.R @ X)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.L.shape[0], self.R.shape[1])

    @property
    def T(self) -> LowRank:  # noqa: N802 - the matrix transpose, as torch.Tensor.T
        return LowRank(self.R.T, self.L.T)

    def frobenius_sq(self) -> float:
        """‖L·R‖_F² = Σ_ij (LᵀL)_ij (RRᵀ)_ij from the q×q Grams, float64."""
        L, R = self.L.double(), self.R.double()
        return float(((L.T @ L) * (R @ R.T)).sum())


@dataclass(frozen=True)
class AdapterUpdate:
    """One check's view of an adapted base matrix: the frozen base block W0 and the active
    adapters' factors as PEFT applies them, ΔW = Σ (B_a·A_a)·s_a (rows of a fused part sliced)."""

    W0: torch.Tensor  # the base weight's block (m, n), its own dtype
    factors: tuple[Factor, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W0.shape)

    def merged_rows(self, rows: slice) -> torch.Tensor:
        """W0[rows] + Σ_a (B_a[rows]·A_a)·s_a in float32: the rows of the merged weight."""
        W = self.W0[rows].to(torch.float32, copy=True)  # never an alias of the base weight
        for B, A, s in self.factors:
            W += (B[rows].float() @ A.float()) * s
        return W

    def operator(self, dtype: torch.dtype = torch.float32) -> LowRank:
        """ΔW as `LowRank` in `dtype`: L = [s_a B_a], R = [A_a] stacked over adapters."""
        (m, n), device = self.shape, self.W0.device
        if not self.factors:  # no active adapter on this layer (any more): ΔW = 0, q = 0
            return LowRank(
                torch.zeros(m, 0, dtype=dtype, device=device),
                torch.zeros(0, n, dtype=dtype, device=device),
            )
        L = torch.cat([B.to(device, dtype) * s for B, _, s in self.factors], dim=1)
        R = torch.cat([A.to(device, dtype) for _, A, _ in self.factors], dim=0)
        return LowRank(L, R)

    def frobenius_sq(self) -> float:
        """‖ΔW‖_F² exactly: the Gram formula on the factors in float64 (s applied in float64)."""
        return self.operator(torch.float64).frobenius_sq()


class LoraMatrix:
    """A PEFT LoRA layer whose base weight is monitored: reads the active adapters' factors at
    check time (they are the parameters the optimizer updates)."""

    def __init__(self, name: str, layer_name: str, layer: nn.Module) -> None:
        self.name = name  # the reported name (PEFT's wrappers removed)
        self.layer_name = layer_name
        self.layer = layer
        self.fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))

    def validate(self) -> None:
        """Raise `UnsupportedAdapterError` unless every active adapter is plain LoRA on an
        unmerged, frozen, floating-point 2-D base weight, unsharded or sharded by rows with its
        factors (called once the matrix is selected)."""
        _check_lora(self.layer_name, self.layer, _active(self.layer))

    def update(
        self,
        W0: torch.Tensor | None,
        rows: tuple[int, int] | None = None,
        reductions: Reductions = PLAIN,
    ) -> AdapterUpdate | None:
        """The update of `W0`, this rank's base block (rows `rows` of the matrix for a fused part).

        B_a's local rows are W0's (`local_block`, the same rule as the base weight); a sharded A_a
        is assembled whole (`whole_rows`). With a check's `CheckSession` as `reductions`, nothing
        raises and every rank issues the same all-reduces (one per sharded A_a, decided from the
        active adapters and the factors' layouts, the same on every rank) whatever failed here;
        the result is None on a rank whose local work failed (W0 None included)."""
        reductions.seam("start")  # before the factors are read and gathered
        factors = []
        with torch.no_grad():
            for a in _active(self.layer):
                A = whole_rows(self.layer.lora_A[a].weight, reductions)
                factors.append(reductions.local(lambda a=a, A=A: self._factor(a, A, rows)))
        return reductions.local(lambda: AdapterUpdate(W0, tuple(factors)))

    def _factor(self, a: str, A: torch.Tensor, rows: tuple[int, int] | None) -> Factor:
        """(B_a's rows of this rank's block, A_a whole, s_a) in the base weight's layout."""
        B = self.layer.lora_B[a].weight
        if self.fan_in_fan_out:  # the base stores Wᵀ: ΔW_param = (B·A)ᵀ = Aᵀ·Bᵀ (never sharded)
            B, A = A.T, B.detach().T
        return (local_block(B, rows), A, float(self.layer.scaling[a]))


def whole_rows(X: torch.Tensor, reductions: Reductions = PLAIN) -> torch.Tensor | None:
    """X whole on every rank, detached: a plain tensor as it is; a DTensor whose rows are split
    (columns whole) by placing this rank's row block into zeros and summing over the row group,
    one all-reduce of X's r×n elements (uneven and empty blocks included). On a rank whose local
    work failed: None, or the zeros it contributed (`CheckSession` skips what follows)."""
    if not is_dtensor(X):
        return reductions.local(lambda: X.detach())
    d = describe_layout(X)
    (r0, r1), shape = d["rows"], d["shape"]

    def placed() -> torch.Tensor:
        local = X.to_local().detach()
        full = torch.zeros(shape, dtype=X.dtype, device=local.device)
        full[r0:r1] = local
        return full

    return reductions.all_reduce(placed, shape, (d["row_group"],), X.dtype)


def find_lora(model: nn.Module) -> tuple[dict[str, LoraMatrix], set[int]]:
    """The adapted base weights of `model` and the ids of every adapter parameter.

    Returns ({parameter name of the base weight: LoraMatrix}, {id of each adapter parameter}).
    Any PEFT tuner layer with active adapters is listed; `LoraMatrix.validate` refuses those
    whose update is not s·B·A."""
    adapted: dict[str, LoraMatrix] = {}
    adapter_params: set[int] = set()
    for name, module in model.named_modules():
        kinds = getattr(module, "adapter_layer_names", None)
        if kinds is None or not hasattr(module, "base_layer"):
            continue
        for kind in kinds:
            holder = getattr(module, kind, None)
            if isinstance(holder, (nn.Module, nn.ParameterDict)):
                adapter_params.update(id(p) for p in holder.parameters())
        if not _active(module):
            continue
        weight_name = f"{name}.base_layer.weight" if name else "base_layer.weight"
        adapted[weight_name] = LoraMatrix(base_name(weight_name), name, module)
    return adapted, adapter_params


def _active(module: nn.Module) -> list[str]:
    """The active adapters (PEFT's `active_adapters`, set model-wide) this layer holds."""
    names = getattr(module, "active_adapters", None) or []
    names = [names] if isinstance(names, str) else list(names)
    holders = [getattr(module, k, {}) for k in getattr(module, "adapter_layer_names", ())]
    return [a for a in names if any(a in h for h in holders)]


def _check_lora(name: str, module: nn.Module, active: list[str]) -> None:
    """Raise unless every active adapter of `module` is plain LoRA on an unmerged, frozen,
    floating-point 2-D base weight, laid out as `_check_sharding` reads it."""
    kind = type(module).__name__
    variants = getattr(module, "lora_variant", {}) or {}
    for a in active:
        if a in variants or getattr(module, "use_dora", {}).get(a, False):
            variant = type(variants[a]).__name__ if a in variants else "DoRA"
            raise UnsupportedAdapterError(
                f"{name}: adapter {a!r} is a LoRA variant ({variant}) whose update is not "
                f"scaling·B·A; {LORA_ONLY}"
            )
    extra = [k for k in dict.fromkeys(module.adapter_layer_names) if k not in LORA_ATTRIBUTES]
    extra = [k for k in extra if any(a in getattr(module, k, {}) for a in active)]
    if not hasattr(module, "lora_A") or extra:
        raise UnsupportedAdapterError(
            f"{name}: PEFT adapter layer {kind} ({', '.join(extra or module.adapter_layer_names)}) "
            f"has an update that is not scaling·B·A (IA³, LoHa, LoKr, DoRA, …); {LORA_ONLY}. "
            f"Monitor the merged model instead, or train plain LoRA"
        )
    for a in active:
        if a not in module.lora_A:
            raise UnsupportedAdapterError(
                f"{name}: adapter {a!r} is LoRA on an embedding or a layer without lora_A "
                f"({kind}); {LORA_ONLY} on linear layers"
            )
        if not isinstance(module.lora_A[a], nn.Linear):
            raise UnsupportedAdapterError(
                f"{name}: adapter {a!r} is LoRA on a {type(module.lora_A[a]).__name__}; "
                f"{LORA_ONLY} on linear layers"
            )
    if getattr(module, "merged_adapters", None):
        raise UnsupportedAdapterError(
            f"{name}: adapters {module.merged_adapters} are merged into the base weight, so it no "
            f"longer holds W0; call model.unmerge_adapter() before creating the Monitor"
        )
    W = getattr(module.base_layer, "weight", None)
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        what = "missing" if W is None else f"{getattr(W, 'dtype', None)} {tuple(W.shape)}"
        raise UnsupportedAdapterError(
            f"{name}: the base weight is {what}; deltawatch needs a floating-point 2-D base "
            f"weight (quantized bases such as bitsandbytes 4/8-bit are not supported)"
        )
    if W.requires_grad:
        raise UnsupportedAdapterError(
            f"{name}: the base weight has requires_grad=True beside LoRA adapters, so the update "
            f"is not the adapters' alone; freeze it (PEFT does by default)"
        )
    _check_sharding(name, module, W, active)


ROWS_ONLY = (
    "deltawatch monitors sharded LoRA when the base weight's rows are split and its columns whole "
    "(FSDP2 fully_shard, Shard(0)), lora_B's rows are split as the base weight's and lora_A's "
    "columns are whole"
)


def _check_sharding(name: str, module: nn.Module, W: torch.Tensor, active: list[str]) -> None:
    """Raise unless the factors can be read as ΔW's local rows (module docstring, "Sharded"):
    nothing sharded, or a base weight with whole columns, every B_a with the base weight's row
    block and row group on its mesh, every A_a plain or a DTensor with whole columns on it."""
    factors = [(f"lora_A[{a!r}]", module.lora_A[a].weight) for a in active]
    factors += [(f"lora_B[{a!r}]", module.lora_B[a].weight) for a in active]
    if not is_dtensor(W):
        sharded = [what for what, f in factors if is_dtensor(f)]
        if sharded:
            raise UnsupportedAdapterError(
                f"{name}: {', '.join(sharded)} are sharded DTensors but the base weight is not; "
                f"{ROWS_ONLY}"
            )
        return
    if getattr(module, "fan_in_fan_out", False):
        raise UnsupportedAdapterError(
            f"{name}: a sharded fan_in_fan_out base weight (stored as Wᵀ, so its split rows are "
            f"ΔW's columns); {ROWS_ONLY}"
        )
    base = describe_layout(W)
    if base["col_group"] is not None:
        raise UnsupportedAdapterError(
            f"{name}: the base weight's columns are split ({tuple(W.placements)}, tensor parallel "
            f"RowwiseParallel); {ROWS_ONLY}"
        )
    for what, f in factors:
        layout = describe_layout(f) if is_dtensor(f) else None
        if what.startswith("lora_B"):
            same = layout is not None and f.device_mesh == W.device_mesh
            same = same and (layout["rows"], layout["row_group"], layout["col_group"]) == (
                base["rows"],
                base["row_group"],
                None,
            )
            if not same:
                where = "not sharded" if layout is None else f"rows {layout['rows']}"
                raise UnsupportedAdapterError(
                    f"{name}: {what} is {where}, the base weight holds rows {base['rows']} here "
                    f"({tuple(W.placements)}); {ROWS_ONLY}"
                )
        elif layout is not None and (f.device_mesh != W.device_mesh or layout["col_group"]):
            raise UnsupportedAdapterError(
                f"{name}: {what} is laid out as {tuple(f.placements)} on mesh "
                f"{f.device_mesh.mesh.tolist()}, the base weight as {tuple(W.placements)} on "
                f"{W.device_mesh.mesh.tolist()}; {ROWS_ONLY}"
            )
