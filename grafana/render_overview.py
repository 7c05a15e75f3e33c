"""Draw a picture of the overview dashboard from REAL query results (not a Grafana screenshot).

    .venv/bin/python grafana/render_overview.py [--out grafana/overview.svg] [--png]

What it does, end to end on this machine:
1. starts a real `deltawatch serve` (ephemeral ports, temporary data dir) and the real Prometheus
   (/usr/bin/prometheus, 1 s scrapes) on it;
2. runs a monitored toy run (a torch model with 4 blocks x 2 matrices, a real Monitor): every matrix
   updates inside its own fixed rank-16 channel (OPD-like); at step 50 the channels of layers 2 and
   3 move to new subspaces, so those layers drift after their lock;
3. evaluates the overview dashboard's own panel queries (grafana/deltawatch-overview.json, variables
   substituted: run, module = layer = All, $__rate_interval = 4s) with Prometheus's query_range,
   and draws them as SVG panels (plus a PNG through headless chromium with --png, when installed).

The picture's numbers are whatever the sidecar computed and Prometheus stored; nothing is made up.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from html import escape
from pathlib import Path
from typing import Any

from deltawatch.sidecar.process import PrometheusServer, SidecarProcess

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


# ------------------------------------------------------------------------------------------
# SVG
# ------------------------------------------------------------------------------------------


def _fmt(v: float, unit: str) -> str:
    if unit == "percentunit":
        return f"{100 * v:.0f}%"
    if unit == "degree":
        return f"{v:.2g}°"
    return f"{v:.3g}"


def line_panel(
    x: float,
    y: float,
    w: float,
    h: float,
    title: str,
    series,
    t0: float,
    t1: float,
    unit: str = "none",
    lo: float | None = None,
    hi: float | None = None,
    hline: float | None = None,
) -> str:
    parts = [
        f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3" fill="#181b1f" stroke="#2c3235"/>',
        f'<text x="{x + 10}" y="{y + 20}" fill="#ccccdc" font-size="13" '
        f'font-weight="600">{escape(title)}</text>',
    ]
    values = [v for _, pts in series for _, v in pts if math.isfinite(v)]
    if not values:
        return "".join(parts)
    vmin = lo if lo is not None else min(values)
    vmax = hi if hi is not None else max(values)
    if vmax - vmin < 1e-12:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    px, py, pw, ph = x + 48, y + 32, w - 60, h - 80

    def X(t: float) -> float:
        return px + (t - t0) / max(t1 - t0, 1e-9) * pw

    def Y(v: float) -> float:
        return py + ph - (v - vmin) / (vmax - vmin) * ph

    for frac in (0.0, 0.5, 1.0):
        v = vmin + frac * (vmax - vmin)
        parts.append(
            f'<line x1="{px}" x2="{px + pw}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#2c3235"/>'
        )
        parts.append(
            f'<text x="{px - 6}" y="{Y(v) + 4:.1f}" fill="#8e8e8e" font-size="10" '
            f'text-anchor="end">{_fmt(v, unit)}</text>'
        )
    for frac in (0.0, 0.5, 1.0):
        t = t0 + frac * (t1 - t0)
        parts.append(
            f'<text x="{X(t):.1f}" y="{py + ph + 14}" fill="#8e8e8e" font-size="10" '
            f'text-anchor="middle">{t - t0:.0f} s</text>'
        )
    if hline is not None and vmin <= hline <= vmax:
        parts.append(
            f'<line x1="{px}" x2="{px + pw}" y1="{Y(hline):.1f}" y2="{Y(hline):.1f}" '
            f'stroke="#f2495c" stroke-dasharray="4 3"/>'
        )
    lx = px
    for i, (name, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{X(t):.1f},{Y(v):.1f}" for t, v in pts if math.isfinite(v))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        label = escape(name or title)
        parts.append(
            f'<rect x="{lx}" y="{py + ph + 24}" width="10" height="3" fill="{color}"/>'
            f'<text x="{lx + 14}" y="{py + ph + 29}" fill="#ccccdc" '
            f'font-size="10">{label}</text>'
        )
        lx += 24 + 6 * len(name or title)
    return "".join(parts)


def rdylgn(v: float) -> str:
    """Red (0) -> yellow (0.5) -> green (1)."""
    v = min(max(v, 0.0), 1.0)
    if v < 0.5:
        r, g, b = 215, int(48 + (v / 0.5) * (200 - 48)), 39
    else:
        f = (v - 0.5) / 0.5
        r, g, b = int(215 - f * (215 - 26)), int(200 - f * (200 - 152)), int(39 + f * (80 - 39))
    return f"rgb({r},{g},{b})"


def heatmap_panel(
    x: float, y: float, w: float, h: float, title: str, series, t0: float, t1: float
) -> str:
    parts = [
        f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3" fill="#181b1f" stroke="#2c3235"/>',
        f'<text x="{x + 10}" y="{y + 20}" fill="#ccccdc" font-size="13" '
        f'font-weight="600">{escape(title)}</text>',
    ]
    rows = sorted(series, key=lambda s: int(s[0]) if s[0].isdigit() else -1, reverse=True)
    if not rows:
        return "".join(parts)
    px, py, pw, ph = x + 48, y + 32, w - 60, h - 56
    rh = ph / len(rows)
    for i, (name, pts) in enumerate(rows):
        parts.append(
            f'<text x="{px - 6}" y="{py + (i + 0.5) * rh + 4:.1f}" fill="#8e8e8e" '
            f'font-size="10" text-anchor="end">layer {escape(name)}</text>'
        )
        for j, (t, v) in enumerate(pts):
            t_next = pts[j + 1][0] if j + 1 < len(pts) else t + 1
            t_next = min(t_next, t1)
            cx = px + (t - t0) / max(t1 - t0, 1e-9) * pw
            cw = max((t_next - t) / max(t1 - t0, 1e-9) * pw - 0.5, 0.5)
            parts.append(
                f'<rect x="{cx:.1f}" y="{py + i * rh + 0.5:.1f}" width="{cw:.1f}" '
                f'height="{rh - 1:.1f}" fill="{rdylgn(v)}"/>'
            )
    for frac in (0.0, 0.5, 1.0):
        t = t0 + frac * (t1 - t0)
        parts.append(
            f'<text x="{px + frac * pw:.1f}" y="{py + ph + 14}" fill="#8e8e8e" '
            f'font-size="10" text-anchor="middle">{t - t0:.0f} s</text>'
        )
    return "".join(parts)


def stat_panel(x: float, y: float, w: float, h: float, title: str, value: str, color: str) -> str:
    return (
        f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3" fill="#181b1f" '
        f'stroke="#2c3235"/><text x="{x + 10}" y="{y + 20}" fill="#ccccdc" font-size="12">'
        f'{escape(title)}</text><text x="{x + w / 2}" y="{y + h - 16}" fill="{color}" '
        f'font-size="26" font-weight="600" text-anchor="middle">{escape(value)}</text>'
    )


def last(series) -> float | None:
    values = [pts[-1][1] for _, pts in series if pts]
    return values[0] if values else None


def render(data: dict[str, list], t0: float, t1: float) -> str:
    W, H = 1200, 1010
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'font-family="Inter, Helvetica, Arial, sans-serif">',
        f'<rect width="{W}" height="{H}" fill="#111217"/>',
        f'<text x="16" y="28" fill="#ccccdc" font-size="18" font-weight="600">'
        f"deltawatch / overview — run {RUN}</text>",
        '<text x="16" y="48" fill="#8e8e8e" font-size="11">Drawn by '
        "grafana/render_overview.py from Prometheus query_range results of the dashboard's "
        "own queries on a real sidecar fed by a monitored toy run (channels of layers 2-3 "
        f"move at step {MOVE_AT}); not a Grafana screenshot.</text>",
    ]
    step = last(data["Last step"])
    locked = last(data["Locked"])
    visible = last(data["bf16-visible weights"])
    firing = sum(pts[-1][1] for _, pts in data["Alerts firing"] if pts)
    y = 62
    for i, (title, value, color) in enumerate(
        (
            ("Last step", f"{step:.0f}" if step is not None else "-", "#5794f2"),
            ("Locked", f"{100 * locked:.0f}%" if locked is not None else "-", "#73bf69"),
            (
                "bf16-visible weights",
                f"{100 * visible:.1f}%" if visible is not None else "-",
                "#5794f2",
            ),
            ("Alerts firing (matrices)", f"{firing:.0f}", "#f2495c" if firing else "#73bf69"),
        )
    ):
        parts.append(stat_panel(16 + i * 296, y, 288, 70, title, value, color))
    y = 142
    band = [s for s in data["Stable-rank band"] if s[0] in ("p10", "median", "p90", "run mean")]
    panels = [
        ("Stable-rank band", band, "none", None, None, None),
        (
            "Subspace and horizon alignment",
            data["Subspace and horizon alignment"],
            "percentunit",
            0,
            1,
            0.7,
        ),
        ("Channel energy", data["Channel energy"], "percentunit", 0, 1, 0.4),
        (
            "bf16-visible weights (run and spread)",
            [s for s in data["bf16-visible weights"] if s[0] in ("run", "p10", "p90")],
            "percentunit",
            0,
            1,
            None,
        ),
        ("Alerts firing", data["Alerts firing"], "none", 0, None, None),
        (
            "Overlaps of the visible update",
            data["Overlaps of the visible update"],
            "percentunit",
            0,
            1,
            None,
        ),
    ]
    for i, (title, series, unit, lo, hi, hline) in enumerate(panels):
        col, row = i % 2, i // 2
        parts.append(
            line_panel(
                16 + col * 592, y + row * 215, 584, 205, title, series, t0, t1, unit, lo, hi, hline
            )
        )
    parts.append(
        heatmap_panel(
            16,
            y + 3 * 215,
            1176,
            200,
            "Subspace alignment by layer",
            data["Subspace alignment by layer"],
            t0,
            t1,
        )
    )
    parts.append("</svg>")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "overview.svg"))
    ap.add_argument("--png", action="store_true", help="also screenshot it with chromium")
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
        svg = render(data, t0, t1)
        Path(args.out).write_text(svg, encoding="utf-8")
        print(f"wrote {args.out}")
        if args.png:
            chromium = shutil.which("chromium") or shutil.which("chromium-browser")
            if chromium is None:
                print("chromium not installed: no PNG", file=sys.stderr)
            else:
                png = str(Path(args.out).with_suffix(".png"))
                subprocess.run(
                    [
                        chromium,
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--hide-scrollbars",
                        f"--screenshot={png}",
                        "--window-size=1200,1010",
                        Path(args.out).resolve().as_uri(),
                    ],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                print(f"wrote {png}")
    finally:
        if prometheus is not None:
            prometheus.stop()
        if sidecar is not None:
            sidecar.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
