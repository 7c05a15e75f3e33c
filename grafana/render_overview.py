"""Draw a picture of the overview dashboard from REAL query results (not a Grafana screenshot).

    .venv/bin/python grafana/render_overview.py [--out grafana/overview.png]   (needs the plots extra)

What it does, end to end on this machine:
1. starts a real `deltawatch serve` (ephemeral ports, temporary data dir) and the real Prometheus
   (/usr/bin/prometheus, 1 s scrapes) on it;
2. runs a monitored toy run (a torch model with 4 blocks x 2 matrices, a real Monitor): every matrix
   updates inside its own fixed rank-16 channel (OPD-like); at step 50 the channels of layers 2 and
   3 move to new subspaces, so those layers drift after their lock;
3. evaluates the overview dashboard's own panel queries (grafana/deltawatch-overview.json, variables
   substituted: run, module = layer = All, $__rate_interval = 4s) with Prometheus's query_range,
   and draws them with matplotlib as grafana/overview.png and .svg.

The picture's numbers are whatever the sidecar computed and Prometheus stored; nothing is made up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deltawatch.sidecar.process import SidecarProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import PrometheusServer  # noqa: E402  (the tests' Prometheus launcher)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUN = "opd-demo"
LAYERS, STEPS, MOVE_AT = 4, 90, 50
COLORS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff"]


def monitored_run(grpc_port: int) -> None:
    """The toy run (see the module docstring): the test suite's `drifting_run` (tests/support.py),
    a quarter second between steps so Prometheus (1 s scrapes) sees it unfold."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support import drifting_run

    drifting_run(
        f"127.0.0.1:{grpc_port}", RUN, layers=LAYERS, steps=STEPS, move_at=MOVE_AT, pause=0.25
    )


def query_range(
    prometheus: PrometheusServer, expr: str, start: float, end: float
) -> list[dict[str, Any]]:
    body = prometheus.get("/query_range", query=expr, start=str(start), end=str(end), step="1")
    return body["data"]["result"]


def substitute(expr: str) -> str:
    for k, v in (("$__rate_interval", "4s"), ("$run", RUN), ("$module", ".*"), ("$layer", ".*")):
        expr = expr.replace(k, v)
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return "" if out == "__auto" else out


def collect(
    prometheus: PrometheusServer, start: float, end: float
) -> dict[str, list[tuple[str, list]]]:
    """Panel title -> [(legend, [(t, value), ...])] for the overview's panels."""
    d = json.loads((HERE / "deltawatch-overview.json").read_text())
    out: dict[str, list[tuple[str, list]]] = {}
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        series = []
        for t in p["targets"]:
            for s in query_range(prometheus, substitute(t["expr"]), start, end):
                pts = [(float(a), float(b)) for a, b in s["values"]]
                series.append((legend(t["legendFormat"], s["metric"]), pts))
        out[p["title"]] = series
    return out


def last(series) -> float | None:
    values = [pts[-1][1] for _, pts in series if pts]
    return values[0] if values else None


def render(data: dict[str, list], t0: float, t1: float, out: Path) -> list[Path]:
    """The overview as a matplotlib figure (stat row, six time-series panels, the layer heatmap),
    written as `out` with the .png and .svg suffixes; the drift and leak thresholds drawn are the
    alert rules' defaults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from deltawatch.sidecar.alerts.rules import ChannelLeakRule, SubspaceDriftRule

    plt.style.use("dark_background")
    fig = plt.figure(figsize=(12, 10.1), dpi=100, facecolor="#111217")
    grid = fig.add_gridspec(5, 4, height_ratios=[0.45, 1, 1, 1, 1], hspace=0.55, wspace=0.3)
    fig.suptitle(f"deltawatch / overview — run {RUN}", x=0.02, ha="left", fontsize=15)
    fig.text(
        0.02,
        0.935,
        "Drawn by grafana/render_overview.py from Prometheus query_range results of the "
        "dashboard's own queries on a real sidecar\nfed by a monitored toy run (channels of "
        f"layers 2-3 move at step {MOVE_AT}); not a Grafana screenshot.",
        fontsize=8,
        color="#8e8e8e",
    )
    step, locked = last(data["Last step"]), last(data["Locked"])
    visible = last(data["bf16-visible weights"])
    firing = sum(pts[-1][1] for _, pts in data["Alerts firing"] if pts)
    stats = (
        ("Last step", "-" if step is None else f"{step:.0f}", "#5794f2"),
        ("Locked", "-" if locked is None else f"{100 * locked:.0f}%", "#73bf69"),
        ("bf16-visible weights", "-" if visible is None else f"{100 * visible:.1f}%", "#5794f2"),
        ("Alerts firing (matrices)", f"{firing:.0f}", "#f2495c" if firing else "#73bf69"),
    )
    for i, (title, value, color) in enumerate(stats):
        ax = fig.add_subplot(grid[0, i])
        ax.set_axis_off()
        ax.set_title(title, fontsize=10, loc="left", color="#ccccdc")
        ax.text(0.5, 0.3, value, fontsize=22, color=color, ha="center", transform=ax.transAxes)

    def seconds(pts) -> list[float]:
        return [t - t0 for t, _ in pts]

    panels = (
        ("Stable-rank band", ("p10", "median", "p90", "run mean"), None, None),
        ("Subspace and horizon alignment", None, (0, 1), SubspaceDriftRule().threshold),
        ("Channel energy", None, (0, 1), ChannelLeakRule().threshold),
        ("bf16-visible weights", ("run", "p10", "p90"), (0, 1), None),
        ("Alerts firing", None, None, None),
        ("Overlaps of the visible update", None, (0, 1), None),
    )
    for i, (title, keep, ylim, threshold) in enumerate(panels):
        ax = fig.add_subplot(grid[1 + i // 2, 2 * (i % 2) : 2 * (i % 2) + 2])
        ax.set_title(title, fontsize=10, loc="left")
        for name, pts in data[title]:
            if keep is None or name in keep:
                ax.plot(seconds(pts), [v for _, v in pts], lw=1.4, label=name or title)
        if threshold is not None:
            ax.axhline(threshold, color="#f2495c", ls="--", lw=1)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlim(0, t1 - t0)
        ax.set_xlabel("s", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(color="#2c3235", lw=0.6)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2, loc="best", framealpha=0.6, facecolor="#181b1f")
    ax = fig.add_subplot(grid[4, :])
    ax.set_title("Subspace alignment by layer", fontsize=10, loc="left")
    rows = sorted(
        data["Subspace alignment by layer"], key=lambda s: int(s[0]) if s[0].isdigit() else -1
    )
    for y, (_, pts) in enumerate(rows):
        edges = seconds(pts) + [t1 - t0]
        ax.pcolormesh(
            edges, [y - 0.5, y + 0.5], [[v for _, v in pts]], cmap="RdYlGn", vmin=0, vmax=1
        )
    ax.set_yticks(range(len(rows)), [f"layer {name}" for name, _ in rows], fontsize=8)
    ax.set_xlim(0, t1 - t0)
    ax.tick_params(labelsize=8)
    written = [out.with_suffix(".png"), out.with_suffix(".svg")]
    for path in written:
        fig.savefig(path, facecolor=fig.get_facecolor())
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "overview.png"), help="the .png and .svg beside it")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="deltawatch-render-"))
    sidecar = prometheus = None
    try:
        sidecar = SidecarProcess(tmp / "data").start()
        prometheus = PrometheusServer(tmp, [f"127.0.0.1:{sidecar.http_port}"]).start()
        prometheus.wait_for_scrapes(1, timeout=60)
        t0 = time.time()
        monitored_run(sidecar.grpc_port)
        time.sleep(3)  # two more scrapes after the last check
        t1 = time.time()
        data = collect(prometheus, t0, t1)
        for path in render(data, t0, t1, Path(args.out)):
            print(f"wrote {path}")
    finally:
        if prometheus is not None:
            prometheus.stop()
        if sidecar is not None:
            sidecar.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
