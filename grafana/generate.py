"""Build deltawatch's Grafana dashboards as JSON (the files in grafana/ are what users import).

    .venv/bin/python grafana/generate.py          # rewrite grafana/*.json
    .venv/bin/python grafana/generate.py --check  # exit 1 when the committed JSON is stale

Metric names come from sidecar/keys.py and sidecar/metrics.py, never spelled here. Two dashboards:

* deltawatch-overview.json: one run at a glance (lock status, stable-rank band, subspace and
  horizon alignment, channel energy, bf16 visibility, overlaps, rotation, spectral shift, norms,
  a layer x time heatmap, firing alerts, ingest health);
* deltawatch-matrices.json: the drill-down, one series per matrix for every per-matrix metric,
  filtered by module and layer, with layer x time heatmaps and a table of the latest values.

Plain dictionaries in Grafana's dashboard JSON model (schemaVersion 39), so nothing beyond the
standard library and the deltawatch package is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from deltawatch.sidecar import keys as K
from deltawatch.sidecar import metrics as M
from deltawatch.sidecar.alerts.rules import ChannelLeakRule, SubspaceDriftRule

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}
# Where the alerts fire by default (their thresholds, from the alert engine).
DRIFT = SubspaceDriftRule().threshold
LEAK = ChannelLeakRule().threshold


# ------------------------------------------------------------------------------------------
# Metric names (from the code that exports them)
# ------------------------------------------------------------------------------------------


def matrix_metric(key: str) -> str:
    """The per-matrix metric of a §2 key (labels run, matrix, layer, module)."""
    return K.BINDING_BY_KEY[key].metric


def run_metric(key: str) -> str:
    """The run-level aggregate of a §2 key (label run)."""
    return M.run_metric(K.BINDING_BY_KEY[key].metric)


def experts_metric(key: str) -> str:
    """The per-(layer, module) aggregate over an MoE module's experts of a §2 key (labels run,
    layer, module)."""
    return M.experts_metric(K.BINDING_BY_KEY[key].metric)


# (key, title, unit, min, max) of the MoE experts panels (aggregates over each module's experts).
EXPERT_PANELS: tuple[tuple[str, str, str, float | None, float | None], ...] = (
    ("stable_rank", "Stable rank, mean over the experts", "none", 0, None),
    ("subspace_alignment", "Subspace alignment, mean over the experts", "percentunit", 0, 1),
    ("bf16_visible_ratio", "bf16-visible share, pooled over the experts", "percentunit", 0, 1),
)


def service_metrics() -> dict[str, str]:
    """The service's own series names as the sidecar exposes them ({short: name}), read from a
    real ServiceCollector: counters gain their ``_total`` suffix."""
    collector = M.ServiceCollector(None, alerts_firing=dict)
    out = {}
    for family in collector.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name.removeprefix("deltawatch_")] = name
    return out


def exported_metrics() -> set[str]:
    """Every deltawatch_* series name the sidecar exports (matrix, run and service level)."""
    names = {b.metric for b in K.BINDINGS}
    names |= {K.VISIBLE_PARAMETERS_METRIC, K.MATRIX_PARAMETERS_METRIC}
    names |= {M.run_metric(b.metric) for b in K.BINDINGS if b.key != "locked"}
    names |= {M.run_metric(K.VISIBLE_PARAMETERS_METRIC), M.run_metric(K.MATRIX_PARAMETERS_METRIC)}
    names |= {M.LOCKED_RATIO_METRIC, M.RUN_MATRICES_METRIC}
    names |= {M.experts_metric(b.metric) for b in K.BINDINGS if b.key != "locked"}
    names |= {M.experts_metric(K.VISIBLE_PARAMETERS_METRIC)}
    names |= {M.experts_metric(K.MATRIX_PARAMETERS_METRIC)}
    names |= {M.EXPERTS_LOCKED_RATIO_METRIC, M.EXPERTS_MATRICES_METRIC}
    names |= set(service_metrics().values())
    names |= set(audit_metrics())
    return names


def audit_metrics() -> list[str]:
    """The live self-audit's series names (sidecar/metrics.py `AuditCollector`)."""
    families = M.AuditCollector(None).collect()
    return [f.name + ("_total" if f.type == "counter" else "") for f in families]


# Exported but deliberately on no panel, with the reason (the dashboards test reads this).
NOT_SHOWN: dict[str, str] = {
    M.experts_metric(b.metric): (
        "the MoE experts row shows the stable rank, alignment, visibility and lock share over "
        "each module's experts; the other keys' expert aggregates are for queries and alerts"
    )
    for b in K.BINDINGS
    if b.key != "locked" and b.key not in {key for key, *_ in EXPERT_PANELS}
} | {
    M.experts_metric(K.VISIBLE_PARAMETERS_METRIC): "the counts behind the pooled visible share",
    M.experts_metric(K.MATRIX_PARAMETERS_METRIC): "the counts behind the pooled visible share",
}
NOT_SHOWN |= dict.fromkeys(
    audit_metrics(),
    "the live self-audit is read in the API's audit block and the AuditError alert "
    "(docs/audit.md); audits are rare (one matrix every audit_every checks), a poor time series",
)


# ------------------------------------------------------------------------------------------
# Panel builders
# ------------------------------------------------------------------------------------------


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping to new rows."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1
        self.panels: list[dict[str, Any]] = []

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["id"] = self.next_id
        self.next_id += 1
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append(
            {
                "id": self.next_id,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.next_id += 1
        self.y += 1


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    t = {
        "datasource": DS,
        "refId": ref,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": True,
        "instant": False,
        "editorMode": "code",
    }
    t.update(extra)
    return t


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(pairs)]


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def timeseries(
    title: str,
    description: str,
    tgts: list[dict[str, Any]],
    *,
    unit: str = "none",
    min_: float | None = None,
    max_: float | None = None,
    decimals: int | None = None,
    threshold_line: tuple[float, str] | None = None,
    overrides: list[dict[str, Any]] | None = None,
    log_scale: bool = False,
) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "lineInterpolation": "linear",
        "lineWidth": 1,
        "fillOpacity": 0,
        "showPoints": "never",
        "spanNulls": True,
        "axisPlacement": "auto",
        "scaleDistribution": {"type": "log", "log": 10} if log_scale else {"type": "linear"},
        "thresholdsStyle": {"mode": "dashed" if threshold_line else "off"},
    }
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": custom,
        "color": {"mode": "palette-classic"},
        "thresholds": thresholds((None, "green"))
        if not threshold_line
        else thresholds((None, threshold_line[1]), (threshold_line[0], "green")),
    }
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": tgts,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    description: str,
    tgts: list[dict[str, Any]],
    *,
    unit: str = "none",
    decimals: int | None = None,
    steps: tuple[tuple[float | None, str], ...] = ((None, "blue"),),
    graph: bool = True,
    text_mode: str = "auto",
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "thresholds"},
        "thresholds": thresholds(*steps),
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": tgts,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "auto",
            "textMode": text_mode,
            "colorMode": "value",
            "graphMode": "area" if graph else "none",
            "justifyMode": "auto",
            "wideLayout": True,
        },
    }


def heatmap(
    title: str,
    description: str,
    expr: str,
    *,
    unit: str = "none",
    scheme: str = "RdYlGn",
    reverse: bool = False,
    min_: float | None = None,
    max_: float | None = None,
) -> dict[str, Any]:
    """Layer x time: one row per layer (the series' legend), cells coloured by value."""
    color: dict[str, Any] = {
        "mode": "scheme",
        "scheme": scheme,
        "scale": "linear",
        "steps": 64,
        "reverse": reverse,
        "fill": "dark-orange",
    }
    if min_ is not None:
        color["min"] = min_
    if max_ is not None:
        color["max"] = max_
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(expr, "{{layer}}", format="time_series")],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {
                    "hideFrom": {"legend": False, "tooltip": False, "viz": False},
                    "scaleDistribution": {"type": "linear"},
                },
            },
            "overrides": [],
        },
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": color,
            "rowsFrame": {"layout": "auto", "value": "value"},
            "yAxis": {"axisPlacement": "left", "axisLabel": "layer", "reverse": False},
            "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": True},
            "legend": {"show": True},
            "showValue": "never",
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
        },
    }


def fill_between(upper: str, lower: str) -> dict[str, Any]:
    return {
        "matcher": {"id": "byName", "options": upper},
        "properties": [
            {"id": "custom.fillBelowTo", "value": lower},
            {"id": "custom.fillOpacity", "value": 20},
        ],
    }


def variable(name: str, label: str, query: str, *, multi: bool, include_all: bool) -> dict:
    v: dict[str, Any] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable", "qryType": 1},
        "refresh": 2,
        "sort": 3,
        "multi": multi,
        "includeAll": include_all,
        "current": {},
        "hide": 0,
        "regex": "",
        "options": [],
    }
    if include_all:
        v["allValue"] = ".*"
    return v


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "options": [],
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    layout: Layout,
    variables: list[dict],
    links: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["deltawatch", "training"],
        "timezone": "browser",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": links,
        "templating": {"list": variables},
        "panels": layout.panels,
    }


# ------------------------------------------------------------------------------------------
# The dashboards
# ------------------------------------------------------------------------------------------

SEL = 'run="$run", module=~"$module", layer=~"$layer"'
# Heatmap rows are layers: matrices outside the repeated blocks (layer "") have no row, and with
# every row name numeric Grafana sorts the rows by layer number.
LAYERED = SEL + ', layer!=""'
RUN = 'run="$run"'


def common_variables() -> list[dict[str, Any]]:
    last = matrix_metric("step")
    return [
        datasource_variable(),
        variable(
            "run", "Run", f"label_values({run_metric('step')}, run)", multi=False, include_all=False
        ),
        variable(
            "module",
            "Module",
            f"label_values({last}{{{RUN}}}, module)",
            multi=True,
            include_all=True,
        ),
        variable(
            "layer",
            "Layer",
            f'label_values({last}{{{RUN}, module=~"$module"}}, layer)',
            multi=True,
            include_all=True,
        ),
    ]


def spread(key: str) -> list[tuple[str, str]]:
    """min / p10 / median / p90 / max over the selected matrices of a per-matrix metric."""
    m = f"{matrix_metric(key)}{{{SEL}}}"
    return [
        (f"min({m})", "min"),
        (f"quantile(0.1, {m})", "p10"),
        (f"quantile(0.5, {m})", "median"),
        (f"quantile(0.9, {m})", "p90"),
        (f"max({m})", "max"),
    ]


def overview() -> dict[str, Any]:
    L = Layout()
    svc = service_metrics()
    L.row("Run")
    L.add(
        stat(
            "Last step",
            "Latest training step any matrix of the run reported.",
            targets((f"{run_metric('step')}{{{RUN}}}", "step")),
            decimals=0,
        ),
        4,
        4,
    )
    L.add(
        stat(
            "Matrices",
            "Monitored matrices that have reported.",
            targets((f"{M.RUN_MATRICES_METRIC}{{{RUN}}}", "matrices")),
            decimals=0,
            graph=False,
        ),
        3,
        4,
    )
    L.add(
        stat(
            "Locked",
            "Share of the run's matrices locked into their channel (the horizon "
            "lock of DESIGN §2).",
            targets((f"{M.LOCKED_RATIO_METRIC}{{{RUN}}}", "locked")),
            unit="percentunit",
            decimals=0,
            steps=((None, "orange"), (0.5, "yellow"), (0.9, "green")),
        ),
        3,
        4,
    )
    L.add(
        stat(
            "Lock step (median)",
            "Median step at which the locked matrices locked.",
            targets((f"{run_metric('lock_step')}{{{RUN}}}", "lock step")),
            decimals=0,
            graph=False,
        ),
        4,
        4,
    )
    L.add(
        stat(
            "bf16-visible weights",
            "Share of the run's weights whose bf16 value differs "
            "from the anchor's (pooled over matrices).",
            targets((f"{run_metric('bf16_visible_ratio')}{{{RUN}}}", "visible")),
            unit="percentunit",
            decimals=1,
        ),
        4,
        4,
    )
    L.add(
        stat(
            "Alerts firing",
            "The sidecar's alert engine: matrices (or the run, for RunStalled) firing each rule.",
            targets((f"sum by (rule) ({svc['alerts_firing']}{{{RUN}}})", "{{rule}}")),
            decimals=0,
            steps=((None, "green"), (1, "red")),
            graph=False,
            text_mode="value_and_name",
        ),
        6,
        4,
    )

    L.row("Channel")
    band = spread("stable_rank")
    L.add(
        timeseries(
            "Stable-rank band",
            "Stable rank ‖ΔW‖²_F/σ₁² of the selected matrices: the p10–p90 band, "
            "median and extremes, and the run mean. OPD keeps a low, steady band; SFT's climbs.",
            targets(*band, (f"{run_metric('stable_rank')}{{{RUN}}}", "run mean")),
            overrides=[fill_between("p90", "p10")],
            log_scale=True,
        ),
        12,
        8,
    )
    L.add(
        timeseries(
            "Subspace and horizon alignment",
            "Sim_K(t, ref) against the locked reference and "
            "Sim_K(t, h(t)) against the subspace at half the steps so far (run means, and the worst "
            f"selected matrix). The drift alert fires below {DRIFT}.",
            targets(
                (f"{run_metric('subspace_alignment')}{{{RUN}}}", "subspace (mean)"),
                (f"min({matrix_metric('subspace_alignment')}{{{SEL}}})", "subspace (worst matrix)"),
                (f"{run_metric('horizon_alignment')}{{{RUN}}}", "horizon (mean)"),
                (f"min({matrix_metric('horizon_alignment')}{{{SEL}}})", "horizon (worst matrix)"),
            ),
            unit="percentunit",
            min_=0,
            max_=1,
            threshold_line=(DRIFT, "red"),
        ),
        12,
        8,
    )
    L.add(
        timeseries(
            "Channel energy",
            "‖ΔW·V_ref‖²_F/‖ΔW‖²_F: the share of the update inside the locked "
            "channel (exact), and the top-K energy share of the update itself.",
            targets(
                (f"{run_metric('channel_energy_ratio')}{{{RUN}}}", "channel energy (mean)"),
                (
                    f"min({matrix_metric('channel_energy_ratio')}{{{SEL}}})",
                    "channel energy (worst)",
                ),
                (f"{run_metric('topk_energy_ratio')}{{{RUN}}}", "top-K energy (mean)"),
            ),
            unit="percentunit",
            min_=0,
            max_=1,
            threshold_line=(LEAK, "red"),
        ),
        12,
        8,
    )
    L.add(
        timeseries(
            "Lock status",
            "Share of the selected matrices locked, and the run's share.",
            targets(
                (f"avg({matrix_metric('locked')}{{{SEL}}})", "locked (selected)"),
                (f"{M.LOCKED_RATIO_METRIC}{{{RUN}}}", "locked (run)"),
            ),
            unit="percentunit",
            min_=0,
            max_=1,
        ),
        12,
        8,
    )
    L.add(
        heatmap(
            "Subspace alignment by layer",
            "Mean Sim_K(t, ref) of each layer's selected matrices "
            "over time (red: the layer's update left its channel).",
            f"avg by (layer) ({matrix_metric('subspace_alignment')}{{{LAYERED}}})",
            unit="percentunit",
            min_=0,
            max_=1,
        ),
        24,
        8,
    )

    L.row("Where the update lands (bf16)")
    L.add(
        timeseries(
            "bf16-visible weights",
            "Share of weights whose bf16 value differs from the anchor: "
            "the run (pooled) and the spread over the selected matrices.",
            targets(
                (f"{run_metric('bf16_visible_ratio')}{{{RUN}}}", "run"),
                *spread("bf16_visible_ratio")[1:4],
            ),
            unit="percentunit",
            min_=0,
            max_=1,
            overrides=[fill_between("p90", "p10")],
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "Visible weights (count)",
            "Weights visibly changed in bf16 against all monitored weights of the run.",
            targets(
                (f"{M.run_metric(K.VISIBLE_PARAMETERS_METRIC)}{{{RUN}}}", "visible"),
                (f"{M.run_metric(K.MATRIX_PARAMETERS_METRIC)}{{{RUN}}}", "monitored"),
            ),
            unit="short",
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "Overlaps of the visible update",
            "Share of visible updates in W0's low-magnitude mask "
            "and in its principal (rank-64) mask; the random baseline is α = 0.5.",
            targets(
                (f"{run_metric('low_magnitude_overlap')}{{{RUN}}}", "low-magnitude"),
                (f"{run_metric('principal_overlap')}{{{RUN}}}", "principal"),
            ),
            unit="percentunit",
            min_=0,
            max_=1,
        ),
        8,
        8,
    )

    L.row("The weights themselves")
    L.add(
        timeseries(
            "Rotation of W's top-k subspace",
            "Principal angles between the top-k right singular "
            "subspaces of W0 and W_t (run means): OPD ≈ 1°, SFT > 10° in the paper.",
            targets(
                (f"{run_metric('rotation_max_degrees')}{{{RUN}}}", "max angle (mean)"),
                (f"{run_metric('rotation_mean_degrees')}{{{RUN}}}", "mean angle (mean)"),
                (f"max({matrix_metric('rotation_max_degrees')}{{{SEL}}})", "max angle (worst)"),
            ),
            unit="degree",
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "Spectral shift (top-k)",
            "‖σ₁..ₖ(W_t) − σ₁..ₖ(W0)‖₂/‖σ₁..ₖ(W0)‖₂ (run mean).",
            targets((f"{run_metric('spectral_shift_topk')}{{{RUN}}}", "shift")),
            unit="none",
            log_scale=True,
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "Update norms",
            "‖ΔW‖_F (exact) and σ₁(ΔW) (tracked), run means.",
            targets(
                (f"{run_metric('frobenius_norm')}{{{RUN}}}", "Frobenius"),
                (f"{run_metric('spectral_norm')}{{{RUN}}}", "spectral"),
            ),
            unit="none",
        ),
        8,
        8,
    )

    L.row("Alerts and ingest")
    L.add(
        timeseries(
            "Alerts firing",
            "deltawatch_alerts_firing by rule: matrices firing (RunStalled: 1).",
            targets((f"sum by (rule) ({svc['alerts_firing']}{{{RUN}}})", "{{rule}}")),
            unit="none",
            decimals=0,
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "Ingest rate",
            "Messages and bytes the sidecar receives (all runs).",
            targets(
                (f"rate({svc['ingest_messages_total']}[$__rate_interval])", "messages/s"),
                (f"rate({svc['ingest_bytes_total']}[$__rate_interval])", "bytes/s"),
            ),
            unit="short",
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "bytes/s"},
                    "properties": [
                        {"id": "unit", "value": "Bps"},
                        {"id": "custom.axisPlacement", "value": "right"},
                    ],
                }
            ],
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "Ingest problems",
            "Refused messages by reason, reports the run's clients dropped "
            "(queue full), and the time from a report's arrival to its acknowledgement.",
            targets(
                (
                    f"sum by (reason) (rate({svc['ingest_errors_total']}[$__rate_interval])) "
                    "or vector(0)",
                    "refused/s {{reason}}",
                ),
                (
                    f"increase({svc['client_dropped_reports_total']}{{{RUN}}}[$__rate_interval])",
                    "dropped",
                ),
                (f"{svc['ingest_lag_seconds']}", "ack lag (s)"),
            ),
            unit="short",
        ),
        8,
        8,
    )

    return dashboard(
        "deltawatch-overview",
        "deltawatch / overview",
        "One post-training run at a glance: is the update in its locked low-rank channel?",
        L,
        common_variables(),
        [
            {
                "title": "Matrices drill-down",
                "type": "link",
                "url": "/d/deltawatch-matrices",
                "keepTime": True,
                "includeVars": True,
                "icon": "dashboard",
            }
        ],
    )


# (key, title, unit, min, max, log) of every per-matrix panel in the drill-down.
MATRIX_PANELS: tuple[tuple[str, str, str, float | None, float | None, bool], ...] = (
    ("stable_rank", "Stable rank", "none", None, None, True),
    ("topk_energy_ratio", "Top-K energy share", "percentunit", 0, 1, False),
    ("subspace_alignment", "Subspace alignment Sim_K(t, ref)", "percentunit", 0, 1, False),
    ("horizon_alignment", "Horizon alignment Sim_K(t, h(t))", "percentunit", 0, 1, False),
    ("channel_energy_ratio", "Channel energy share", "percentunit", 0, 1, False),
    ("locked", "Locked", "none", 0, 1, False),
    ("lock_step", "Lock step", "none", None, None, False),
    ("bf16_visible_ratio", "bf16-visible share", "percentunit", 0, 1, False),
    ("low_magnitude_overlap", "Visible ∩ low-magnitude", "percentunit", 0, 1, False),
    ("principal_overlap", "Visible ∩ principal", "percentunit", 0, 1, False),
    ("rotation_max_degrees", "Rotation, max angle", "degree", None, None, False),
    ("rotation_mean_degrees", "Rotation, mean angle", "degree", None, None, False),
    ("spectral_shift_topk", "Spectral shift (top-k)", "none", None, None, True),
    ("frobenius_norm", "‖ΔW‖_F", "none", None, None, False),
    ("spectral_norm", "σ₁(ΔW)", "none", None, None, False),
    ("step", "Last step", "none", None, None, False),
)


def matrices() -> dict[str, Any]:
    L = Layout()
    L.row("Selected matrices")
    L.add(
        stat(
            "Matrices selected",
            "Matrices of the run matching the module and layer filters.",
            targets((f"count({matrix_metric('step')}{{{SEL}}})", "matrices")),
            decimals=0,
            graph=False,
        ),
        6,
        4,
    )
    L.add(
        stat(
            "Locked",
            "Share of the selected matrices that are locked.",
            targets((f"avg({matrix_metric('locked')}{{{SEL}}})", "locked")),
            unit="percentunit",
            decimals=0,
            steps=((None, "orange"), (0.5, "yellow"), (0.9, "green")),
        ),
        6,
        4,
    )
    L.add(
        stat(
            "Worst subspace alignment",
            f"Lowest Sim_K(t, ref) among the selected matrices (the drift alert fires below {DRIFT}).",
            targets((f"min({matrix_metric('subspace_alignment')}{{{SEL}}})", "worst")),
            unit="percentunit",
            decimals=1,
            steps=((None, "red"), (DRIFT, "yellow"), (0.9, "green")),
        ),
        6,
        4,
    )
    L.add(
        stat(
            "Most bf16-visible",
            "Highest bf16-visible share among the selected matrices.",
            targets((f"max({matrix_metric('bf16_visible_ratio')}{{{SEL}}})", "max")),
            unit="percentunit",
            decimals=1,
        ),
        6,
        4,
    )
    L.row("Layer × time")
    for key, title, scheme, reverse in (
        ("subspace_alignment", "Subspace alignment", "RdYlGn", False),
        ("channel_energy_ratio", "Channel energy share", "RdYlGn", False),
        ("bf16_visible_ratio", "bf16-visible share", "Blues", False),
        ("stable_rank", "Stable rank", "Oranges", False),
    ):
        L.add(
            heatmap(
                f"{title} by layer",
                f"Mean {key} of each layer's selected matrices.",
                f"avg by (layer) ({matrix_metric(key)}{{{LAYERED}}})",
                scheme=scheme,
                reverse=reverse,
                unit="percentunit" if key.endswith("ratio") or "alignment" in key else "none",
            ),
            12,
            8,
        )
    L.row("Latest values")
    table_keys = (
        "step",
        "stable_rank",
        "subspace_alignment",
        "channel_energy_ratio",
        "bf16_visible_ratio",
        "rotation_max_degrees",
        "lock_step",
    )
    tgts = [
        target(
            f"{matrix_metric(k)}{{{SEL}}}",
            k,
            chr(ord("A") + i),
            format="table",
            instant=True,
            range=False,
        )
        for i, k in enumerate(table_keys)
    ]
    L.add(
        {
            "type": "table",
            "title": "Matrices (latest check)",
            "description": "One row per selected matrix: its latest values.",
            "datasource": DS,
            "targets": tgts,
            "transformations": [
                {"id": "merge", "options": {}},
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True, "__name__": True},
                        "renameByName": {
                            f"Value #{chr(ord('A') + i)}": k for i, k in enumerate(table_keys)
                        },
                    },
                },
            ],
            "fieldConfig": {
                "defaults": {"custom": {"align": "auto", "filterable": True}},
                "overrides": [],
            },
            "options": {
                "showHeader": True,
                "cellHeight": "sm",
                "sortBy": [{"displayName": "layer", "desc": False}],
            },
        },
        24,
        10,
    )
    L.row("Per matrix")
    for key, title, unit, lo, hi, log in MATRIX_PANELS:
        L.add(
            timeseries(
                title,
                f"{K.BINDING_BY_KEY[key].help} One series per selected matrix.",
                targets((f"{matrix_metric(key)}{{{SEL}}}", "{{layer}} {{module}}")),
                unit=unit,
                min_=lo,
                max_=hi,
                log_scale=log,
            ),
            8,
            8,
        )
    L.add(
        timeseries(
            "bf16-visible weights (count)",
            "Weights visibly changed in bf16, per matrix, against its size.",
            targets(
                (f"{K.VISIBLE_PARAMETERS_METRIC}{{{SEL}}}", "{{layer}} {{module}}"),
                (f"{K.MATRIX_PARAMETERS_METRIC}{{{SEL}}}", "{{layer}} {{module}} (size)"),
            ),
            unit="short",
        ),
        8,
        8,
    )
    L.row("MoE experts (per layer and module, over the experts)")
    experts_sel = 'run="$run", layer=~"$layer"'
    for key, title, unit, lo, hi in EXPERT_PANELS:
        L.add(
            timeseries(
                title,
                f"{K.BINDING_BY_KEY[key].help} The DESIGN §2 aggregate over each MoE expert "
                "module's experts (one series per layer and module).",
                targets((f"{experts_metric(key)}{{{experts_sel}}}", "{{layer}} {{module}}")),
                unit=unit,
                min_=lo,
                max_=hi,
            ),
            6,
            8,
        )
    L.add(
        timeseries(
            "Locked share of the experts",
            "Share of each expert module's experts that are locked, and how many reported.",
            targets(
                (f"{M.EXPERTS_LOCKED_RATIO_METRIC}{{{experts_sel}}}", "{{layer}} {{module}}"),
                (f"{M.EXPERTS_MATRICES_METRIC}{{{experts_sel}}}", "{{layer}} {{module}} experts"),
            ),
            unit="short",
        ),
        6,
        8,
    )
    return dashboard(
        "deltawatch-matrices",
        "deltawatch / matrices",
        "Drill-down: every per-matrix diagnostic by layer and module.",
        L,
        common_variables(),
        [
            {
                "title": "Overview",
                "type": "link",
                "url": "/d/deltawatch-overview",
                "keepTime": True,
                "includeVars": True,
                "icon": "dashboard",
            }
        ],
    )


DASHBOARDS = {
    "deltawatch-overview.json": overview,
    "deltawatch-matrices.json": matrices,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the JSON is stale")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = HERE / name
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python grafana/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
