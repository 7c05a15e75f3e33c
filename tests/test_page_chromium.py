"""The live page in the real headless Chromium, against a real sidecar fed by a real monitored run.

The run (tests/support.py `drifting_run`): 4 blocks × 2 matrices, 40 checks; every matrix locks
onto its channel, and after step 22 the upper two layers move along new channels, so SubspaceDrift
fires for their matrices. The `/series` endpoint is checked against the per-matrix histories of
the API (whose numbers are tested against float64 elsewhere); the page's DOM after its scripts ran
against the API's numbers (every shown number carries its exact value in data-value); the token
rule through a browser (the sidecar has a token: every page is opened with `?token=` once, then
the cookie carries it); and a screenshot is taken (set
DELTAWATCH_PAGE_PNG=path to keep it: that is how docs/live-page.png is made).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import urllib.error
import urllib.request

import numpy as np
import pytest
from deltawatch.sidecar.engine import MEAN_KEYS
from deltawatch.sidecar.page import LAYER_KEYS
from support import SidecarProcess, chromium, drifting_run, parse_dom, wait_for

pytestmark = pytest.mark.timeout(300)  # ./dev test installs chromium like prometheus

RUN, LAYERS, STEPS, MOVE_AT = "drift-toy", 4, 40, 22


TOKEN = "page-token-0123456789"


def api(base: str, path: str, **headers: str):
    """GET base + path as JSON with the bearer token (or the given headers instead)."""
    headers = headers or {"Authorization": f"Bearer {TOKEN}"}
    req = urllib.request.Request(base + path, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A sidecar with a token that watched the drifting run; its API's answers, fetched once."""
    directory = tmp_path_factory.mktemp("page")
    (directory / "token").write_text(TOKEN + "\n")
    with SidecarProcess(directory / "data", f"--token-file={directory / 'token'}") as side:
        stats = drifting_run(
            side.endpoint,
            RUN,
            layers=LAYERS,
            steps=STEPS,
            move_at=MOVE_AT,
            token_file=str(directory / "token"),
        )
        assert stats["unacknowledged"] == 0 and stats["errors"] == {}, stats
        base = side.http_url

        def drift_firing() -> bool:
            alerts = api(base, "/api/v1/alerts")["alerts"]
            return any(a["rule"] == "SubspaceDrift" and a["matrix"] for a in alerts)

        wait_for(drift_firing, "SubspaceDrift firing", proc=side)
        detail = api(base, f"/api/v1/runs/{RUN}")
        histories = {
            m["matrix"]: {
                p["step"]: p
                for p in api(base, f"/api/v1/runs/{RUN}/history?matrix={m['matrix']}")["points"]
            }
            for m in detail["matrices"]
        }
        yield {
            "base": base,
            "runs": api(base, "/api/v1/runs")["runs"],
            "alerts": api(base, "/api/v1/alerts")["alerts"],
            "detail": detail,
            "series": api(base, f"/api/v1/runs/{RUN}/series"),
            "histories": histories,
        }


def carried(histories: dict, step: int) -> dict[str, dict]:
    """matrix -> its latest point at or before `step`."""
    out = {}
    for matrix, points in histories.items():
        before = [s for s in points if s <= step]
        if before:
            out[matrix] = points[max(before)]
    return out


def test_series_equals_the_histories(served):
    """Per step: the aggregate, the stable-rank band and the per-layer means recomputed from the
    per-matrix histories; at the last step the aggregate is the run detail's, exactly."""
    series, histories, detail = served["series"], served["histories"], served["detail"]
    assert series["steps"] == list(range(1, STEPS + 1))
    assert series["layers"] == list(range(LAYERS))
    numel = {m["matrix"]: math.prod(m["shape"]) for m in detail["matrices"]}
    layer = {m["matrix"]: m["layer"] for m in detail["matrices"]}
    for i, step in enumerate(series["steps"]):
        points = carried(histories, step)
        for key in MEAN_KEYS:
            values = [p[key] for p in points.values() if p[key] is not None]
            want = math.fsum(values) / len(values) if values else None
            assert series["aggregate"][key][i] == want, (key, step)
        visible = sum(p["bf16_visible_ratio"] * numel[m] for m, p in points.items())
        assert series["aggregate"]["bf16_visible_ratio"][i] == pytest.approx(
            visible / sum(numel[m] for m in points), rel=1e-12
        )
        locked = sum(1 for p in points.values() if p["locked"])
        assert series["aggregate"]["locked_ratio"][i] == locked / len(points)
        ranks = np.array([p["stable_rank"] for p in points.values()])
        band = series["stable_rank"]
        assert band["median"][i] == statistics.median(ranks.tolist())
        assert band["min"][i] == ranks.min() and band["max"][i] == ranks.max()
        for q, name in ((25, "q25"), (75, "q75")):
            assert band[name][i] == pytest.approx(np.percentile(ranks, q), rel=1e-12, abs=1e-15)
        for key in LAYER_KEYS:
            for li, lay in enumerate(series["layers"]):
                values = [
                    p[key] for m, p in points.items() if layer[m] == lay and p[key] is not None
                ]
                want = math.fsum(values) / len(values) if values else None
                assert series["layer_keys"][key][li][i] == want, (key, lay, step)
    last = {k: v[-1] for k, v in series["aggregate"].items()}
    assert last == detail["aggregate"]


def test_series_places_the_drift_alerts_on_their_steps(served):
    """SubspaceDrift fires on the 3rd consecutive check with subspace_alignment < 0.7 (the
    default rule): the alert's start_step is that check's step, read from the matrix's history;
    only the matrices of the layers that moved drift."""
    drift = [a for a in served["series"]["alerts"] if a["rule"] == "SubspaceDrift" and a["matrix"]]
    assert drift
    for a in drift:
        assert int(a["matrix"].split(".")[2]) >= LAYERS // 2
        points = served["histories"][a["matrix"]]
        run_of_bad, fired = 0, None
        for step in sorted(points):
            v = points[step]["subspace_alignment"]
            run_of_bad = run_of_bad + 1 if v is not None and v < 0.7 else 0
            if run_of_bad == 3:
                fired = step
                break
        assert a["start_step"] == fired > MOVE_AT
        assert a["end_step"] is None and a["state"] == "firing"


def dom(url: str, budget_ms: int = 3000, login: bool = True) -> list:
    """The DOM of `url` after its scripts ran (`login`: with ?token= added before any #part)."""
    return parse_dom(chromium(with_token(url) if login else url, "--dump-dom", budget_ms=budget_ms))


def with_token(url: str) -> str:
    address, hash_, fragment = url.partition("#")
    return f"{address}?token={TOKEN}{hash_}{fragment}"


def one(elements, tag=None, **attrs):
    found = [
        e
        for e in elements
        if (tag is None or e.tag == tag)
        and all(e.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
    ]
    assert len(found) == 1, (tag, attrs, len(found))
    return found[0]


def shown(e) -> float | None:
    """A shown number's exact value (data-value), after checking its text is that value rounded."""
    raw = e.attrs["data-value"]
    if raw == "null":
        assert e.text == "–"
        return None
    v = float(raw)
    if e.text not in ("yes", "no"):
        assert float(e.text) == pytest.approx(v, rel=5e-4), (e.text, raw)
    return v


def test_index_page_shows_the_runs(served):
    els = dom(served["base"] + "/")
    run = next(r for r in served["runs"] if r["run"] == RUN)
    row = one(els, "tr", data_run=RUN)
    cells = els[els.index(row) :]
    spans = [e for e in cells if e.tag == "span" and "data-value" in e.attrs][:4]
    assert [shown(s) for s in spans[:3]] == [run["last_step"], run["matrices"], run["locked_ratio"]]
    firing = [a for a in served["alerts"] if a["run"] == RUN and a["state"] == "firing"]
    assert int(spans[3].attrs["data-value"]) == len(firing) > 0
    link = next(e for e in cells if e.tag == "a")
    assert link.attrs["href"] == f"/runs/{RUN}"
    assert {e.attrs["data-rule"] for e in els if e.tag == "tr" and "data-rule" in e.attrs} == {
        a["rule"] for a in served["alerts"]
    }
    # Everything the page loaded came from the sidecar itself.
    sources = [
        e.attrs.get("src") or e.attrs.get("href") for e in els if e.tag in ("script", "link")
    ]
    assert all(s and s.startswith("/static/") for s in sources if s), sources


def test_run_page_charts_heatmap_and_alerts_show_the_api_numbers(served, tmp_path):
    series, detail = served["series"], served["detail"]
    els = dom(f"{served['base']}/runs/{RUN}")
    summary = {e.attrs["data-key"]: e for e in els if e.tag == "dd"}
    spans = {k: next(x for x in els[els.index(e) :] if x.tag == "span") for k, e in summary.items()}
    assert shown(spans["last_step"]) == detail["last_step"] == STEPS
    assert shown(spans["locked_ratio"]) == detail["aggregate"]["locked_ratio"]
    assert shown(spans["stable_rank"]) == detail["aggregate"]["stable_rank"]
    assert shown(spans["bf16_visible_ratio"]) == detail["aggregate"]["bf16_visible_ratio"]
    # Every chart's legend shows its series' latest value; each line has one point per step.
    legends = [e for e in els if e.tag == "span" and e.attrs.get("data-step")]
    keys = {e.attrs["data-key"] for e in legends}
    assert {
        "median",
        "horizon_alignment",
        "subspace_alignment",
        "channel_energy_ratio",
        "bf16_visible_ratio",
        "low_magnitude_overlap",
        "principal_overlap",
        "spectral_shift_topk",
        "locked_ratio",
    } <= keys
    # the rotation is shown where the sidecar certified it, and never made up where it is null
    for key in ("rotation_max_degrees", "rotation_mean_degrees"):
        certified = any(v is not None for v in series["aggregate"][key])
        assert (key in keys) == certified, key
    for e in legends:
        key = e.attrs["data-key"]
        values = series["stable_rank"]["median"] if key == "median" else series["aggregate"][key]
        assert shown(e) == values[-1] and int(e.attrs["data-step"]) == STEPS, key
    for path in (e for e in els if e.tag == "path" and e.attrs.get("data-key")):
        key = path.attrs["data-key"]
        values = series["stable_rank"]["median"] if key == "median" else series["aggregate"][key]
        assert int(path.attrs["data-points"]) == sum(v is not None for v in values), key
    # The alerts on the step axis: a bar per alert from its start step, shading on every chart.
    bars = {e.attrs["data-id"]: e for e in els if e.tag == "rect" and "data-start-step" in e.attrs}
    assert set(bars) == {a["id"] for a in series["alerts"]}
    for a in series["alerts"]:
        assert int(bars[a["id"]].attrs["data-start-step"]) == a["start_step"]
        assert bars[a["id"]].attrs["data-end-step"] == "null" and a["end_step"] is None
    assert sum(1 for e in els if e.tag == "rect" and e.attrs.get("class") == "alert-span") >= 8
    # The layer × step heatmap: one cell per (layer, step), each the series' per-layer mean.
    cells = [e for e in els if e.tag == "rect" and e.attrs.get("class") == "cell"]
    assert len(cells) == LAYERS * STEPS
    heat = series["layer_keys"]["subspace_alignment"]
    for c in cells:
        li, si = int(c.attrs["data-layer"]), series["steps"].index(int(c.attrs["data-step"]))
        want = heat[li][si]
        assert (None if c.attrs["data-value"] == "null" else float(c.attrs["data-value"])) == want
    # The alerts, on the step axis.
    rows = [e for e in els if e.tag == "tr" and "data-rule" in e.attrs]
    assert {r.attrs["data-id"] for r in rows} == {a["id"] for a in series["alerts"]}
    # Every matrix of the run, with its latest keys.
    for m in detail["matrices"]:
        row = one(els, "tr", data_matrix=m["matrix"])
        cell = next(
            x
            for x in els[els.index(row) :]
            if x.tag == "td" and x.attrs.get("data-key") == "stable_rank"
        )
        value = next(x for x in els[els.index(cell) :] if x.tag == "span")
        assert shown(value) == m["stable_rank"]
    png = tmp_path / "page.png"
    url = with_token(f"{served['base']}/runs/{RUN}")
    chromium(url, f"--screenshot={png}", "--window-size=1400,1900")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    if os.environ.get("DELTAWATCH_PAGE_PNG"):
        shutil.copy(png, os.environ["DELTAWATCH_PAGE_PNG"])


def test_matrix_drill_down_shows_its_history(served):
    matrix = next(a["matrix"] for a in served["series"]["alerts"] if a["matrix"])
    points = served["histories"][matrix]
    els = dom(f"{served['base']}/runs/{RUN}#matrix={matrix}", budget_ms=5000)
    one(els, "h2", data_matrix=matrix)
    drill = els[els.index(one(els, "h2", data_matrix=matrix)) :]
    legends = [e for e in drill if e.tag == "span" and e.attrs.get("data-step")]
    assert {e.attrs["data-key"] for e in legends} >= {
        "stable_rank",
        "subspace_alignment",
        "frobenius_norm",
        "bf16_visible_ratio",
    }
    for e in legends:
        key = e.attrs["data-key"]
        last = max(s for s in points if points[s][key] is not None)
        assert shown(e) == points[last][key] and int(e.attrs["data-step"]) == last, key


def test_the_page_needs_the_token_and_takes_it_once_from_the_address(served):
    """Without the token every page address is a 401, and so is a wrong ?token=; the right one
    once in the address sets the cookie, which the page's own polls of the API carry (the status
    line says "updated" only after a poll succeeded; a 401 would show there)."""
    base = served["base"]
    for path in ("/", f"/runs/{RUN}", "/static/page.js", f"/api/v1/runs/{RUN}/series"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + path, timeout=30)
        assert e.value.code == 401, path
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/?token=wrong", timeout=30)
    assert e.value.code == 401
    els = dom(f"{base}/runs/{RUN}?token={TOKEN}", budget_ms=8000, login=False)
    status = one(els, "span", id="status")
    assert status.attrs["class"] == "status" and status.text.startswith("updated"), status.text
    cookie = api(base, f"/api/v1/runs/{RUN}/series", Cookie=f"deltawatch_token={TOKEN}")
    assert cookie["steps"] == served["series"]["steps"]
