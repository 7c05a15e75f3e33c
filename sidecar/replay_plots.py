"""`deltawatch replay --plots DIR`: the figures of a replayed run, PNG and SVG, with matplotlib
(the optional extra `plots`).

  * `<key>.png/.svg`, one per key: the key against the step, one line per layer (the mean over the
    layer's matrices), coloured by depth (viridis: shallow dark, deep light); audit-tier keys are
    plotted from the `exact` blocks as `exact_<key>`;
  * `layers_<key>.png/.svg`: a layer × module heatmap of the last checkpoint, values written in;
  * `live_vs_exact.png/.svg` (with --exact): each live key against its float64 value, one point
    per matrix and checkpoint, with the diagonal.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

LINE_KEYS = (
    "stable_rank",
    "topk_energy_ratio",
    "frobenius_norm",
    "horizon_alignment",
    "bf16_visible_ratio",
    "low_magnitude_overlap",
    "rotation_mean_degrees",
    "spectral_shift_topk",
)
EXACT_LINE_KEYS = (
    "rotation_k512_mean_degrees",
    "rotation_left_mean_sine",
    "spectral_shift",
    "final_alignment",
    "principal_projection_energy_ratio",
)
HEATMAP_KEYS = ("stable_rank", "bf16_visible_ratio", "rotation_mean_degrees")
SCATTER_KEYS = (
    "frobenius_norm",
    "spectral_norm",
    "stable_rank",
    "topk_energy_ratio",
    "rotation_mean_degrees",
    "spectral_shift_topk",
)
FORMATS = ("png", "svg")


def require_matplotlib() -> None:
    """Fail early, with the fix, when the `plots` extra is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "--plots needs matplotlib: pip install 'deltawatch[plots]' (or matplotlib)"
        ) from None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # SVG text stays text: searchable, editable in a paper

    return plt


def _value(item: dict[str, Any], key: str, exact: bool) -> float | None:
    v = (item.get("exact") or {}).get(key) if exact else item.get(key)
    return None if v is None or not math.isfinite(float(v)) else float(v)


def layer_series(doc: dict[str, Any], key: str, exact: bool) -> dict[int, list[tuple]]:
    """layer -> [(step, mean of the key over the layer's matrices)] (layers without a block
    index are left out)."""
    out: dict[int, list[tuple]] = defaultdict(list)
    for ckpt in doc["checkpoints"]:
        by_layer: dict[int, list[float]] = defaultdict(list)
        for item in ckpt["matrices"]:
            v = _value(item, key, exact)
            if item["layer"] is not None and v is not None:
                by_layer[item["layer"]].append(v)
        for layer, values in by_layer.items():
            out[layer].append((ckpt["step"], sum(values) / len(values)))
    return dict(out)


def _save(fig, folder: Path, stem: str) -> list[Path]:
    paths = []
    for ext in FORMATS:
        path = folder / f"{stem}.{ext}"
        fig.savefig(path, dpi=130, bbox_inches="tight")
        paths.append(path)
    return paths


def line_plot(plt, doc: dict[str, Any], key: str, exact: bool, folder: Path) -> list[Path]:
    series = layer_series(doc, key, exact)
    if not series:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    layers = sorted(series)
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        steps, values = zip(*series[layer], strict=True)
        colour = cmap(0.85 * i / max(1, len(layers) - 1))  # stop before viridis' pale yellow
        ax.plot(steps, values, marker="o", ms=3, lw=1.4, color=colour, label=f"layer {layer}")
    label = f"{key} (exact float64)" if exact else key
    ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(label)
    ax.set_title(f"{doc['run']}: {label}, per layer (mean over its matrices)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(layers) > 8 else 1, loc="best")
    paths = _save(fig, folder, ("exact_" if exact else "") + key)
    plt.close(fig)
    return paths


def heatmap(plt, doc: dict[str, Any], key: str, folder: Path) -> list[Path]:
    """Layer × module of the last checkpoint."""
    last = doc["checkpoints"][-1]
    items = [i for i in last["matrices"] if i["layer"] is not None]
    layers = sorted({i["layer"] for i in items})
    modules = sorted({i["module"] for i in items})
    if not layers:
        return []
    grid = [[math.nan] * len(modules) for _ in layers]
    for i in items:
        v = _value(i, key, False)
        if v is not None:
            grid[layers.index(i["layer"])][modules.index(i["module"])] = v
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(modules), 1.0 + 0.4 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(modules)), modules, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(f"{doc['run']}: {key} at step {last['step']}", fontsize=9)
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            if not math.isnan(v):  # dark text on the light end of magma, light on the dark end
                ink = "black" if im.norm(v) > 0.6 else "white"
                ax.text(x, y, f"{v:.3g}", ha="center", va="center", fontsize=7, color=ink)
    fig.colorbar(im, ax=ax)
    paths = _save(fig, folder, f"layers_{key}")
    plt.close(fig)
    return paths


def scatter(plt, doc: dict[str, Any], folder: Path) -> list[Path]:
    """Live against exact, one panel per key."""
    cols = 3
    rows = math.ceil(len(SCATTER_KEYS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.6 * rows))
    for ax, key in zip(axes.flat, SCATTER_KEYS, strict=False):
        pts = [
            (e, v)
            for c in doc["checkpoints"]
            for i in c["matrices"]
            if (e := _value(i, key, True)) is not None and (v := _value(i, key, False)) is not None
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, s=10, alpha=0.7)
            lo, hi = min(xs + ys), max(xs + ys)
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("exact (float64)", fontsize=8)
        ax.set_ylabel("live", fontsize=8)
    fig.suptitle(f"{doc['run']}: live estimates against the float64 audit tier")
    fig.tight_layout()
    paths = _save(fig, folder, "live_vs_exact")
    plt.close(fig)
    return paths


def write_plots(doc: dict[str, Any], folder: Path) -> list[Path]:
    """Every figure of the module docstring into `folder`; the paths written."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    exact = any(i.get("exact") for c in doc["checkpoints"] for i in c["matrices"])
    paths: list[Path] = []
    for key in LINE_KEYS:
        paths += line_plot(plt, doc, key, False, folder)
    if exact:
        for key in EXACT_LINE_KEYS:
            paths += line_plot(plt, doc, key, True, folder)
        paths += scatter(plt, doc, folder)
    for key in HEATMAP_KEYS:
        paths += heatmap(plt, doc, key, folder)
    return paths
