"""The live page: `GET /` (the runs) and `GET /runs/{run}` (one run's step-indexed charts), drawn
in the browser as SVG by the sidecar's own script (`sidecar/static/page.js`, no library, nothing
fetched from elsewhere), from the JSON API plus one endpoint made for it:

    GET /api/v1/runs/{run}/series   {run, steps, aggregate: {key: [per step]},
                                     stable_rank: {min, q25, median, q75, max: [per step]},
                                     layers: [block index], layer_keys: {key: [[per step] per layer]},
                                     alerts: [{..the alert item.., start_step, end_step}]}

The value at step s is over every matrix's latest visible check at or before s (a matrix that has
not reported by s is left out): `aggregate` is `aggregate_rows` of those checks, the run aggregate
of DESIGN §2 (so at the last step it equals `GET /api/v1/runs/{run}`'s); `stable_rank` is the band
over matrices (minimum, 25th percentile, median, 75th percentile, maximum; percentiles by linear
interpolation between order statistics); `layer_keys` the plain mean over a layer's matrices of
`horizon_alignment`, `subspace_alignment` and `channel_energy_ratio` (nulls ignored; null when all
are). An alert is placed on the step axis by time: `start_step` is the last step (of its matrix,
or of the run for a run-level alert) received at or before its `started_at`, `end_step` likewise
for `ended_at` (null while firing). The series is computed in a thread from the store's visible
history (O(checks stored) per request); the page asks for it again only when the run changed.

The run page shows the first page of the matrices (`PAGE_SIZE`) and a per-(layer, module) table
from `/api/v1/runs/{run}/modules` (the §2 aggregate over an MoE module's experts), filterable by
layer; choosing a module lists its matrices (its experts) through the API's `layer` / `module`
filters, so an 18k-matrix run never sends every matrix to the browser.

The HTML embeds the first data it shows (so the page draws without waiting for a fetch) and then
polls the JSON API every few seconds while the tab is visible.
"""

from __future__ import annotations

import asyncio
import html
import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from . import http_api  # a module import: http_api imports this module too (make_app registers us)
from .alerts.state import epoch_seconds
from .engine import Engine, aggregate_rows

STATIC_DIR = Path(__file__).with_name("static")
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}
LAYER_KEYS: tuple[str, ...] = ("horizon_alignment", "subspace_alignment", "channel_energy_ratio")
BAND = ("min", "q25", "median", "q75", "max")
POLL_SECONDS = 3

AlertsProvider = Callable[[], Iterable[Mapping[str, Any]]]


# -------------------------------------------------------------------- the series


def quantile(sorted_values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics x_(1) ≤ … ≤ x_(n):
    h = (n − 1)·q, x_(⌊h⌋) + (h − ⌊h⌋)·(x_(⌊h⌋+1) − x_(⌊h⌋)) (numpy's default, "linear")."""
    h = (len(sorted_values) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (h - lo) * (sorted_values[hi] - sorted_values[lo])


def band(values: list[float]) -> dict[str, float | None]:
    """Minimum, quartiles, median and maximum of `values` (all None when empty)."""
    if not values:
        return dict.fromkeys(BAND)
    v = sorted(values)
    return {
        "min": v[0],
        "q25": quantile(v, 0.25),
        "median": statistics.median(v),
        "q75": quantile(v, 0.75),
        "max": v[-1],
    }


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _epoch_ms(rfc3339: str | None) -> int | None:
    """ "2026-11-26T15:00:00.123Z" -> Unix milliseconds (the alert items' precision)."""
    if not rfc3339:
        return None
    return round(epoch_seconds(rfc3339) * 1000)


def _step_at(times: list[tuple[int, int]], ms: int | None) -> int | None:
    """The last step of (received ms, step) pairs (ascending) received at or before `ms`."""
    if ms is None:
        return None
    found = None
    for t, step in times:
        if t > ms:
            break
        found = step
    return found


def run_series(
    history: Iterable[Any], layers_of: Mapping[str, int | None], alerts: Iterable[Mapping[str, Any]]
) -> dict[str, Any]:
    """The body of `/series` (see the module docstring) from a run's visible history rows
    (sidecar/store.py HistoryRow), its matrices' layers, and the alert items of the run."""
    by_step: dict[int, list[Any]] = {}
    for h in history:
        by_step.setdefault(h.step, []).append(h)
    steps = sorted(by_step)
    latest: dict[str, Any] = {}
    aggregate: dict[str, list[Any]] = {}
    stable: dict[str, list[Any]] = {k: [] for k in BAND}
    layers = sorted({v for v in layers_of.values() if v is not None})
    per_layer = {k: [[] for _ in layers] for k in LAYER_KEYS}
    run_times: list[tuple[int, int]] = []
    matrix_times: dict[str, list[tuple[int, int]]] = {}
    for step in steps:
        rows = by_step[step]
        for h in rows:
            latest[h.matrix] = h
            matrix_times.setdefault(h.matrix, []).append((math.floor(h.received_at * 1000), step))
        run_times.append((min(math.floor(h.received_at * 1000) for h in rows), step))
        current = list(latest.values())
        for key, value in aggregate_rows(current).items():
            aggregate.setdefault(key, []).append(value)
        ranks = [
            float(h.keys["stable_rank"]) for h in current if h.keys.get("stable_rank") is not None
        ]
        for key, value in band(ranks).items():
            stable[key].append(value)
        in_layer: dict[int | None, list[Any]] = {}
        for h in current:
            in_layer.setdefault(layers_of.get(h.matrix), []).append(h)
        for key in LAYER_KEYS:
            for i, layer in enumerate(layers):
                values = [
                    float(h.keys[key])
                    for h in in_layer.get(layer, ())
                    if h.keys.get(key) is not None
                ]
                per_layer[key][i].append(_mean(values))
    run_times.sort()
    placed = []
    for a in alerts:
        times = matrix_times.get(a["matrix"], []) if a.get("matrix") else run_times
        placed.append(
            {
                **a,
                "start_step": _step_at(times, _epoch_ms(a.get("started_at"))),
                "end_step": _step_at(times, _epoch_ms(a.get("ended_at"))),
            }
        )
    return {
        "steps": steps,
        "aggregate": aggregate,
        "stable_rank": stable,
        "layers": layers,
        "layer_keys": per_layer,
        "alerts": placed,
    }


def series(engine: Engine, run: str, alerts: AlertsProvider | None) -> dict[str, Any] | None:
    """`/api/v1/runs/{run}/series` (None for an unknown run); reads the store: call it in a thread."""
    manifest = engine.manifest(run)
    if manifest is None:
        return None
    items = [a for a in (alerts() if alerts is not None else []) if a.get("run") == run]
    layers_of = {e.matrix: e.layer for e in manifest}
    return {"run": run, **run_series(engine.store.history(run), layers_of, items)}


# -------------------------------------------------------------------- HTML


def _json_script(element_id: str, body: Any) -> str:
    """A <script type="application/json"> holding `body` ("</" escaped so it cannot end it)."""
    return (
        f'<script id="{element_id}" type="application/json">'
        + http_api.json_text(body).replace("</", "<\\/")
        + "</script>"
    )


def _document(title: str, data: Mapping[str, Any]) -> str:
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        '<link rel="stylesheet" href="/static/page.css">'
        "</head><body>"
        '<header><a class="home" href="/">deltawatch</a>'
        f"<h1>{html.escape(title)}</h1>"
        '<span id="status" class="status"></span></header>'
        '<main id="app"></main>'
        + _json_script("dw-data", {**data, "poll_seconds": POLL_SECONDS})
        + '<script src="/static/page.js"></script>'
        "</body></html>"
    )


def _html(text: str) -> web.Response:
    resp = web.Response(text=text, content_type="text/html", charset="utf-8")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def register(app: web.Application, engine: Engine, alerts: AlertsProvider | None) -> None:
    """Add the page's routes (`/`, `/runs/{run}`, `/static/{name}`, `/api/v1/runs/{run}/series`)."""
    static = {
        p.name: (p.read_bytes(), STATIC_TYPES[p.suffix])
        for p in STATIC_DIR.iterdir()
        if p.suffix in STATIC_TYPES
    }

    async def alert_items() -> list[dict[str, Any]]:
        return list(await asyncio.to_thread(alerts)) if alerts is not None else []

    async def index(request: web.Request) -> web.Response:
        data = {"page": "index", "runs": engine.runs(), "alerts": await alert_items()}
        return _html(_document("runs", data))

    async def run_page(request: web.Request) -> web.Response:
        run = request.match_info["run"]
        detail = await asyncio.to_thread(engine.run_detail, run, limit=http_api.PAGE_SIZE)
        if detail is None:
            return http_api.json_error(404, f"unknown run {run!r}")
        body = await asyncio.to_thread(series, engine, run, alerts)
        modules = await asyncio.to_thread(engine.modules, run)
        data = {"page": "run", "run": run, "detail": detail, "series": body, "modules": modules}
        return _html(await asyncio.to_thread(_document, run, data))

    async def run_series_json(request: web.Request) -> web.Response:
        run = request.match_info["run"]
        body = await asyncio.to_thread(series, engine, run, alerts)
        if body is None:
            return http_api.json_error(404, f"unknown run {run!r}")
        return http_api.json_response(body)

    async def asset(request: web.Request) -> web.Response:
        found = static.get(request.match_info["name"])
        if found is None:
            return http_api.json_error(404, f"no static file {request.match_info['name']!r}")
        resp = web.Response(body=found[0], content_type=found[1], charset="utf-8")
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    app.router.add_get("/", index)
    app.router.add_get("/runs/{run}", run_page)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/api/v1/runs/{run}/series", run_series_json)
