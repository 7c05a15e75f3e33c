"""The sidecar's HTTP side (aiohttp): the JSON API of DESIGN §4, `/metrics`, `/healthz`, `/readyz`.

    GET /api/v1/runs                          {"runs": [{run, last_step, matrices, locked_ratio,
                                                          created_at, updated_at}]}
    GET /api/v1/runs/{run}?offset=&limit=&layer=&module=&expert=
                                              {run, last_step, aggregate: {keys}, matrices: [...],
                                              audit: {matrices, pending, skipped}} (docs/audit.md)
                                              one page of matrices in manifest order (default
                                              limit PAGE_SIZE), only those with that layer /
                                              module / expert when given; a partial page adds
                                              page: {offset, limit, total, next_offset}
    GET /api/v1/runs/{run}/modules?layer=     {run, modules: [{layer, module, matrices, experts,
                                              reported, step, aggregate: {keys}}]}: the §2
                                              aggregate per (layer, module), over the experts of
                                              an MoE expert module
    GET /api/v1/runs/{run}/history?matrix=M   {matrix, points: [{step, keys}]}
    GET /api/v1/alerts                        {"alerts": [...]} from the alerts provider
    GET /metrics                              Prometheus / OpenMetrics text of the registry
    GET /healthz                              200 while the process serves
    GET /readyz                               200 once the engine is loaded, `ready()` holds and
                                              the store can write; else 503 with the reason.
                                              Quarantined runs are listed in the body
    GET /, /runs/{run}, /api/v1/runs/{run}/series   the live page (sidecar/page.py)

Unknown values are null. An unknown run or matrix is a 404 with a JSON body
`{"error": "...", "status": 404}`. Handlers read the engine's published state; anything that
touches the store or formats a large exposition runs in a thread, so the event loop never waits.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from . import page
from .engine import Engine

AlertsProvider = Callable[[], list[dict[str, Any]]]

PAGE_SIZE = 1000  # matrices in one /api/v1/runs/{run} page unless ?limit= says otherwise
MAX_PAGE_SIZE = 10_000


def _clean(v: Any) -> Any:
    """JSON-safe: non-finite floats become null (JSON has no NaN)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def json_text(body: Any) -> str:
    """Compact JSON with `allow_nan=False` (non-finite values nulled first)."""
    return json.dumps(_clean(body), allow_nan=False, separators=(",", ":"))


def json_response(body: Any, status: int = 200) -> web.Response:
    """A JSON response of `json_text(body)`."""
    return web.Response(text=json_text(body), status=status, content_type="application/json")


def json_error(status: int, message: str) -> web.Response:
    """`{"error": message, "status": status}` with that HTTP status."""
    return json_response({"error": message, "status": status}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown paths and wrong methods answer JSON too: {"error", "status"}."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return json_error(e.status, f"{e.reason}: {request.method} {request.path}")


def _query_int(request: web.Request, name: str, default: int, low: int, high: int | None) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"query parameter {name}={raw[:40]!r}, expected an integer {bound}")
    return value


def _matrix_filter(request: web.Request) -> dict[str, Any]:
    """The manifest fields `?layer=&module=&expert=` ask for (those given)."""
    where: dict[str, Any] = {}
    for name in ("layer", "expert"):
        if request.query.get(name, "") != "":
            where[name] = _query_int(request, name, 0, 0, None)
    if request.query.get("module", "") != "":
        where["module"] = request.query["module"]
    return where


def make_app(
    engine: Engine,
    *,
    registry: CollectorRegistry,
    alerts: AlertsProvider | None = None,
    middlewares: Iterable[Any] = (),
    ready: Callable[[], bool] | None = None,
) -> web.Application:
    """The aiohttp application over an engine and a dedicated Prometheus registry.

    `alerts`: a callable returning the DESIGN §4 alert items (e.g. the AlertEngine); without one
    `/api/v1/alerts` answers `{"alerts": []}`. `middlewares`: e.g. the bearer-token check of
    sidecar/auth.py. `ready`: extra readiness condition (e.g. the gRPC port is bound)."""
    app = web.Application(middlewares=[*middlewares, json_errors])

    async def list_runs(request: web.Request) -> web.Response:
        return json_response({"runs": await asyncio.to_thread(engine.runs)})

    async def run_detail(request: web.Request) -> web.Response:
        run = request.match_info["run"]
        try:
            offset = _query_int(request, "offset", 0, 0, None)
            limit = _query_int(request, "limit", PAGE_SIZE, 1, MAX_PAGE_SIZE)
            where = _matrix_filter(request)
        except ValueError as exc:
            return json_error(400, str(exc))
        detail = await asyncio.to_thread(
            engine.run_detail, run, offset=offset, limit=limit, where=where
        )
        if detail is None:
            return json_error(404, f"unknown run {run!r}")
        return await asyncio.to_thread(json_response, detail)

    async def modules(request: web.Request) -> web.Response:
        run = request.match_info["run"]
        try:
            layer = _query_int(request, "layer", -1, 0, None)
        except ValueError as exc:
            return json_error(400, str(exc))
        body = await asyncio.to_thread(engine.modules, run, None if layer < 0 else layer)
        if body is None:
            return json_error(404, f"unknown run {run!r}")
        return await asyncio.to_thread(json_response, body)

    async def history(request: web.Request) -> web.Response:
        run = request.match_info["run"]
        matrix = request.query.get("matrix")
        if matrix is None or matrix == "":
            return json_error(400, "the query parameter matrix=NAME is required")
        if engine.manifest(run) is None:
            return json_error(404, f"unknown run {run!r}")
        body = await asyncio.to_thread(engine.history, run, matrix)
        if body is None:
            return json_error(404, f"run {run!r} has no matrix {matrix!r}")
        return json_response(body)

    async def list_alerts(request: web.Request) -> web.Response:
        if alerts is None:
            return json_response({"alerts": []})
        items = await asyncio.to_thread(alerts)
        return json_response({"alerts": list(items)})

    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        output = await asyncio.to_thread(encoder, registry)
        resp = web.Response(body=output)
        resp.headers["Content-Type"] = content_type
        return resp

    async def healthz(request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if ready is not None and not ready():
            return json_response({"status": "not ready"}, status=503)
        store = engine.store
        if not store.writable:  # a tiny write tells whether it came back (space freed)
            await asyncio.to_thread(store.probe)
        body: dict[str, Any] = {"status": "ready", "runs": len(engine.run_names())}
        if engine.quarantined:
            body["quarantined"] = dict(engine.quarantined)
        if not store.writable:
            body.update(status="store cannot write", reason=store.unwritable_reason)
            return json_response(body, status=503)
        return json_response(body)

    app.router.add_get("/api/v1/runs", list_runs)
    app.router.add_get("/api/v1/runs/{run}", run_detail)
    app.router.add_get("/api/v1/runs/{run}/history", history)
    app.router.add_get("/api/v1/runs/{run}/modules", modules)
    app.router.add_get("/api/v1/alerts", list_alerts)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    page.register(app, engine, alerts)  # GET /, /runs/{run}, /static/*, /api/v1/runs/{run}/series
    return app
