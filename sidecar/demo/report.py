"""The demo's comparison table and its JSON (DESIGN §4 "Demo")."""

from __future__ import annotations

from typing import Any

# Rows of the comparison table: (label, aggregate key). The paper's ordering for the first rows is
# SFT > OPD > RLVR (visible updates, rotation, spectral shift).
TABLE_ROWS: tuple[tuple[str, str], ...] = (
    ("bf16_visible_ratio", "bf16_visible_ratio"),
    ("rotation_max_degrees", "rotation_max_degrees"),
    ("rotation_mean_degrees", "rotation_mean_degrees"),
    ("spectral_shift_topk", "spectral_shift_topk"),
    ("stable_rank", "stable_rank"),
    ("topk_energy_ratio", "topk_energy_ratio"),
    ("horizon_alignment", "horizon_alignment"),
    ("low_magnitude_overlap", "low_magnitude_overlap"),
    ("principal_overlap", "principal_overlap"),
    ("frobenius_norm", "frobenius_norm"),
    ("locked_ratio", "locked_ratio"),
    ("lock_step (median)", "lock_step"),
)


def fmt(v: Any) -> str:
    """A table cell: null for None, 4 significant digits for floats."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if v == 0.0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.3e}"
    return f"{v:.4g}"


def regime_entry(
    aggregate: dict[str, Any], accuracy: float, alerts: list[dict[str, Any]]
) -> dict[str, Any]:
    """One regime's part of the demo JSON; ``alerts`` as the trainer received them (rule, matrix,
    state, and the trainer's step when it arrived)."""
    return {
        "aggregate": dict(aggregate),
        "lock_step": aggregate.get("lock_step"),
        "accuracy": accuracy,
        "alerts": list(alerts),
    }


def alerts_table(regimes: dict[str, dict[str, Any]]) -> str:
    """Every alert the runs' trainers received, in order: regime, rule, state, step."""
    rows = [["regime", "alert", "state", "step (trainer)"]]
    for regime, entry in regimes.items():
        for a in entry["alerts"]:
            rows.append([regime, a["rule"], a["state"], str(a["step"])])
    if len(rows) == 1:
        rows.append(["(none)", "", "", ""])
    return _render(rows)


def table(regimes: dict[str, dict[str, Any]], anchor_accuracy: float | None = None) -> str:
    """Rows = diagnostics, columns = regimes, plus held-out accuracy."""
    names = list(regimes)
    rows = [["key", *names]]
    for label, key in TABLE_ROWS:
        rows.append([label, *(fmt(regimes[r]["aggregate"].get(key)) for r in names)])
    rows.append(["accuracy (held-out exact match)", *(fmt(regimes[r]["accuracy"]) for r in names)])
    if anchor_accuracy is not None:
        rows.append(["  anchor accuracy", *(fmt(anchor_accuracy) for _ in names)])
    return _render(rows)


def bottleneck_table(bottleneck: dict[str, Any]) -> str:
    """Accuracy without and with the rank-K gradient projection, side by side."""
    rows = [["regime", "accuracy free", "accuracy bottleneck", "change", "channel_energy_ratio"]]
    for regime, entry in bottleneck["regimes"].items():
        free, held = entry["accuracy_free"], entry["accuracy_bottleneck"]
        rows.append(
            [regime, fmt(free), fmt(held), fmt(held - free), fmt(entry["channel_energy_ratio"])]
        )
    return _render(rows)


def _render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [
            r[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
