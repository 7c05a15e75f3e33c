"""Prometheus export: a custom collector over the engine's published state, following the binding
table of sidecar/keys.py, plus the service's own metrics.

Series scheme (documented in docs/sidecar.md):

* per matrix (`--metrics-detail matrix`, the default): the binding table's metric names with labels
  `run`, `matrix`, `layer`, `module` (layer "" when a name has no block index) for every matrix
  that is not an MoE expert; expert matrices are exported per (layer, module) over their experts
  instead (below), so a 128-expert model stays within what Prometheus holds;
* per expert (`--metrics-detail expert`): every matrix's series, experts included, with the
  label `expert` added ("" for a matrix that is not an expert);
* per module over experts (`matrix` and `expert` detail): `deltawatch_experts_<name>` with labels
  `run`, `layer`, `module`, the aggregate of DESIGN §2 over the module's experts (geometry keys:
  mean; count ratios: pooled; counts: sums), plus `deltawatch_experts_subspace_locked_ratio` and
  `deltawatch_experts_matrices` (the experts that have reported);
* per layer (`--metrics-detail layer`): the same metric names with labels `run`, `layer` only, the
  aggregate of DESIGN §2 over the layer's matrices (geometry keys: mean; count ratios: pooled;
  counts: sums);
* per run (always): `deltawatch_run_<name>` with the label `run` only, where `<name>` is the
  binding's metric name without its `deltawatch_` prefix (`deltawatch_run_update_stable_rank`,
  `deltawatch_run_bf16_visible_ratio`, ...), plus `deltawatch_run_subspace_locked_ratio` and
  `deltawatch_run_matrices`. `--metrics-detail run` exports only these.

Never a `step` label (the step is the value of `deltawatch_last_step`); a null value is not
exported. Booleans export as 0/1.

Service metrics: `deltawatch_ingest_messages_total`, `deltawatch_ingest_bytes_total`,
`deltawatch_ingest_errors_total{reason}`, `deltawatch_ingest_lag_seconds` (read from the
ingest's stats object, duck-typed: `messages`, `bytes_total`, `errors`, `last_lag_seconds`,
`lock`), `deltawatch_client_dropped_reports_total{run}` (the engine's persisted counts, so it
survives restarts), `deltawatch_store_writable` (1 while the store's last write succeeded, 0 while
it cannot write: disk full, locked), `deltawatch_runs_quarantined` (runs whose stored rows could not
be loaded at start-up), `deltawatch_ingest_inflight_bytes` (received, unacknowledged report bytes),
`deltawatch_event_loop_lag_max_seconds` (the event loop's largest delay since start),
`deltawatch_alerts_firing{run,rule}` (from a provider returning
{(run, rule): count}, e.g. `AlertEngine.firing_counts`).

The live self-audit (`AuditCollector`, docs/audit.md): `deltawatch_audit_error_ratio{run,matrix,key}`
(each matrix's latest audit: the live estimate's error over its stated bound, > 1 out of bound),
`deltawatch_audits_total`, `deltawatch_audit_assemblies_evicted_total`,
`deltawatch_audit_assemblies_pending`, `deltawatch_audit_pending_bytes`,
`deltawatch_audit_last_seconds` (the latest audit's float64 SVD time) and
`deltawatch_client_skipped_audits_total{run}` (audit blocks clients skipped, queue full).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine import AGGREGATE_KEYS, Engine, MatrixRow, aggregate_rows
from .keys import BINDINGS, MATRIX_PARAMETERS_METRIC, VISIBLE_PARAMETERS_METRIC

log = logging.getLogger("deltawatch.metrics")

DETAILS = ("matrix", "expert", "layer", "run")
MATRIX_LABELS = ("run", "matrix", "layer", "module")
EXPERT_LABELS = (*MATRIX_LABELS, "expert")
LAYER_LABELS = ("run", "layer")
MODULE_LABELS = ("run", "layer", "module")
RUN_LABELS = ("run",)
LOCKED_RATIO_METRIC = "deltawatch_run_subspace_locked_ratio"
RUN_MATRICES_METRIC = "deltawatch_run_matrices"
EXPERTS_LOCKED_RATIO_METRIC = "deltawatch_experts_subspace_locked_ratio"
EXPERTS_MATRICES_METRIC = "deltawatch_experts_matrices"

AlertsFiring = Callable[[], Mapping[tuple[str, str], int]]


def run_metric(metric: str) -> str:
    """The run-level name of a binding's metric: deltawatch_X -> deltawatch_run_X."""
    assert metric.startswith("deltawatch_")
    return "deltawatch_run_" + metric[len("deltawatch_") :]


def experts_metric(metric: str) -> str:
    """The per-module-over-experts name of a binding's metric: deltawatch_X ->
    deltawatch_experts_X."""
    assert metric.startswith("deltawatch_")
    return "deltawatch_experts_" + metric[len("deltawatch_") :]


def _number(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    return float(v)


def _row_value(row: MatrixRow, key: str) -> float | None:
    if key == "step":
        return float(row.step)
    return _number(row.keys.get(key))


def _layer_label(layer: int | None) -> str:
    return "" if layer is None else str(layer)


class EngineCollector(Collector):
    """Yields the diagnostics' metric families from `engine.latest()` at scrape time."""

    def __init__(self, engine: Engine, *, detail: str = "matrix") -> None:
        if detail not in DETAILS:
            raise ValueError(f"metrics detail must be one of {DETAILS}, got {detail!r}")
        self.engine = engine
        self.detail = detail

    def describe(self) -> list[Metric]:
        return []  # dynamic series: no up-front description (the registry calls collect lazily)

    def collect(self) -> Iterator[Metric]:
        rows = self.engine.latest()
        by_run: dict[str, list[MatrixRow]] = {}
        for row in rows:
            by_run.setdefault(row.run, []).append(row)
        if self.detail == "matrix":
            yield from self._per_matrix([r for r in rows if r.expert is None], MATRIX_LABELS)
        elif self.detail == "expert":
            yield from self._per_matrix(rows, EXPERT_LABELS)
        elif self.detail == "layer":
            yield from self._per_layer(by_run)
        if self.detail in ("matrix", "expert"):
            yield from self._per_module_over_experts(by_run)
        yield from self._per_run(by_run)

    def _per_matrix(self, rows: list[MatrixRow], labels: tuple[str, ...]) -> Iterator[Metric]:
        def values(row: MatrixRow) -> list[str]:
            if labels == MATRIX_LABELS:
                return _matrix_labels(row)
            return [*_matrix_labels(row), "" if row.expert is None else str(row.expert)]

        for b in BINDINGS:
            fam = GaugeMetricFamily(b.metric, b.help, labels=labels)
            for row in rows:
                v = _row_value(row, b.key)
                if v is not None:
                    fam.add_metric(values(row), v)
            yield fam
        vis = GaugeMetricFamily(
            VISIBLE_PARAMETERS_METRIC,
            "Weights whose bf16 value differs from the anchor's.",
            labels=labels,
        )
        par = GaugeMetricFamily(
            MATRIX_PARAMETERS_METRIC, "Parameters in the matrix.", labels=labels
        )
        for row in rows:
            vis.add_metric(values(row), float(row.visible_count))
            par.add_metric(values(row), float(row.numel))
        yield vis
        yield par

    def _per_module_over_experts(self, by_run: dict[str, list[MatrixRow]]) -> Iterator[Metric]:
        """deltawatch_experts_*{run, layer, module}: DESIGN §2 aggregates over each expert
        module's experts (`aggregate_rows`)."""
        groups: list[tuple[list[str], dict[str, Any], list[MatrixRow]]] = []
        for run, rows in sorted(by_run.items()):
            modules: dict[tuple[str, str], list[MatrixRow]] = {}
            for row in rows:
                if row.expert is not None:
                    modules.setdefault((_layer_label(row.layer), row.module), []).append(row)
            for (layer, module), members in sorted(modules.items()):
                agg = aggregate_rows(members)
                agg["step"] = max(r.step for r in members)
                groups.append(([run, layer, module], agg, members))
        for b in BINDINGS:
            if b.key == "locked":
                continue  # exported as the share of locked experts below
            fam = GaugeMetricFamily(
                experts_metric(b.metric),
                b.help + " (over the module's experts)",
                labels=MODULE_LABELS,
            )
            for labels, agg, _ in groups:
                v = _number(agg.get(b.key))
                if v is not None:
                    fam.add_metric(labels, v)
            yield fam
        yield from _count_families(
            (EXPERTS_LOCKED_RATIO_METRIC, EXPERTS_MATRICES_METRIC, experts_metric),
            MODULE_LABELS,
            groups,
            (
                "Share of the module's experts that are locked.",
                "Experts of the module that have reported.",
                "Weights whose bf16 value differs from the anchor's (sum over the experts).",
                "Parameters (sum over the module's reported experts).",
            ),
        )

    def _per_layer(self, by_run: dict[str, list[MatrixRow]]) -> Iterator[Metric]:
        groups: list[tuple[tuple[str, str], dict[str, Any], list[MatrixRow]]] = []
        for run, rows in sorted(by_run.items()):
            layers: dict[str, list[MatrixRow]] = {}
            for row in rows:
                layers.setdefault(_layer_label(row.layer), []).append(row)
            for layer, members in sorted(layers.items()):
                agg = aggregate_rows(members)
                agg["step"] = max(r.step for r in members)
                groups.append(((run, layer), agg, members))
        for b in BINDINGS:
            fam = GaugeMetricFamily(
                b.metric, b.help + " (mean over the layer)", labels=LAYER_LABELS
            )
            for labels, agg, _ in groups:
                v = _number(agg.get(b.key))
                if v is not None:
                    fam.add_metric(list(labels), v)
            yield fam
        vis = GaugeMetricFamily(
            VISIBLE_PARAMETERS_METRIC,
            "Weights whose bf16 value differs from the anchor's (sum over the layer).",
            labels=LAYER_LABELS,
        )
        par = GaugeMetricFamily(
            MATRIX_PARAMETERS_METRIC, "Parameters (sum over the layer).", labels=LAYER_LABELS
        )
        for labels, _, members in groups:
            vis.add_metric(list(labels), float(sum(r.visible_count for r in members)))
            par.add_metric(list(labels), float(sum(r.numel for r in members)))
        yield vis
        yield par

    def _per_run(self, by_run: dict[str, list[MatrixRow]]) -> Iterator[Metric]:
        aggs = {}
        for run, rows in sorted(by_run.items()):
            agg = aggregate_rows(rows)
            agg["step"] = max(r.step for r in rows)
            aggs[run] = (agg, rows)
        for b in BINDINGS:
            if b.key == "locked":
                continue  # exported as deltawatch_run_subspace_locked_ratio below
            help_ = b.help + (
                " Run aggregate: "
                + (
                    "pooled over matrices."
                    if b.key.endswith("overlap") or b.key == "bf16_visible_ratio"
                    else "median over locked matrices."
                    if b.key == "lock_step"
                    else "latest step of any matrix."
                    if b.key == "step"
                    else "mean over matrices."
                )
            )
            fam = GaugeMetricFamily(run_metric(b.metric), help_, labels=RUN_LABELS)
            for run, (agg, _) in aggs.items():
                v = _number(agg.get(b.key))
                if v is not None:
                    fam.add_metric([run], v)
            yield fam
        yield from _count_families(
            (LOCKED_RATIO_METRIC, RUN_MATRICES_METRIC, run_metric),
            RUN_LABELS,
            [([run], agg, rows) for run, (agg, rows) in aggs.items()],
            (
                "Share of the run's reported matrices that are locked.",
                "Matrices of the run that have reported.",
                "Weights whose bf16 value differs from the anchor's (sum over the run).",
                "Monitored parameters (sum over the run's reported matrices).",
            ),
        )


def _count_families(
    names: tuple[str, str, Callable[[str], str]],
    labels: tuple[str, ...],
    groups: list[tuple[list[str], dict[str, Any], list[MatrixRow]]],
    helps: tuple[str, str, str, str],
) -> Iterator[Metric]:
    """A group level's locked share, reported-matrix count and the visible / parameter counts
    (names: the locked-ratio and count metrics, and the level's name of a per-matrix metric)."""
    locked_name, matrices_name, level = names
    locked = GaugeMetricFamily(locked_name, helps[0], labels=labels)
    matrices = GaugeMetricFamily(matrices_name, helps[1], labels=labels)
    vis = GaugeMetricFamily(level(VISIBLE_PARAMETERS_METRIC), helps[2], labels=labels)
    par = GaugeMetricFamily(level(MATRIX_PARAMETERS_METRIC), helps[3], labels=labels)
    for values, agg, members in groups:
        if agg["locked_ratio"] is not None:
            locked.add_metric(values, float(agg["locked_ratio"]))
        matrices.add_metric(values, float(len(members)))
        vis.add_metric(values, float(sum(r.visible_count for r in members)))
        par.add_metric(values, float(sum(r.numel for r in members)))
    yield locked
    yield matrices
    yield vis
    yield par


def _matrix_labels(row: MatrixRow) -> list[str]:
    return [row.run, row.matrix, _layer_label(row.layer), row.module]


class ServiceCollector(Collector):
    """The service's own metrics, read at scrape time from the ingest stats, the engine and the
    alert provider (each optional)."""

    def __init__(
        self,
        engine: Engine | None,
        *,
        ingest_stats: Any = None,
        alerts_firing: AlertsFiring | None = None,
    ) -> None:
        self.engine = engine
        self.ingest_stats = ingest_stats
        self.alerts_firing = alerts_firing
        self._lock = threading.Lock()

    def set_alerts_firing(self, provider: AlertsFiring | None) -> None:
        """Point deltawatch_alerts_firing at a provider of {(run, rule): firing count}."""
        self.alerts_firing = provider

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        messages = CounterMetricFamily(
            "deltawatch_ingest_messages", "Messages received on ingest streams."
        )
        nbytes = CounterMetricFamily("deltawatch_ingest_bytes", "Bytes received on ingest streams.")
        errors = CounterMetricFamily(
            "deltawatch_ingest_errors", "Ingest messages refused, by reason.", labels=["reason"]
        )
        lag = GaugeMetricFamily(
            "deltawatch_ingest_lag_seconds",
            "Time from a report's arrival to its acknowledgement (persisted), last report.",
        )
        stats = self.ingest_stats
        n_messages, n_bytes, by_reason, last_lag = 0, 0, {}, 0.0
        if stats is not None:
            lock = getattr(stats, "lock", None) or self._lock
            with lock:
                msgs = getattr(stats, "messages", 0)
                n_messages = sum(msgs.values()) if isinstance(msgs, Mapping) else int(msgs)
                n_bytes = int(getattr(stats, "bytes_total", 0))
                by_reason = dict(getattr(stats, "errors", {}) or {})
                last_lag = float(getattr(stats, "last_lag_seconds", 0.0))
        messages.add_metric([], float(n_messages))
        nbytes.add_metric([], float(n_bytes))
        for reason, count in sorted(by_reason.items()):
            errors.add_metric([str(reason)], float(count))
        lag.add_metric([], last_lag)
        yield messages
        yield nbytes
        yield errors
        yield lag

        dropped = CounterMetricFamily(
            "deltawatch_client_dropped_reports",
            "Reports clients dropped because their send queue was full.",
            labels=["run"],
        )
        if self.engine is not None:
            for run, count in sorted(self.engine.dropped_reports().items()):
                dropped.add_metric([run], float(count))
        yield dropped

        firing = GaugeMetricFamily(
            "deltawatch_alerts_firing", "Alerts firing, by run and rule.", labels=["run", "rule"]
        )
        if self.alerts_firing is not None:
            try:
                counts = self.alerts_firing()
            except Exception:
                log.exception("alerts provider failed; deltawatch_alerts_firing left empty")
                counts = {}
            for (run, rule), count in sorted(counts.items()):
                firing.add_metric([run, rule], float(count))
        yield firing

        if self.engine is not None:
            yield GaugeMetricFamily(
                "deltawatch_store_writable",
                "1 while the store can write, 0 while it cannot (disk full, locked); /readyz 503.",
                value=1.0 if self.engine.store.writable else 0.0,
            )
            yield GaugeMetricFamily(
                "deltawatch_runs_quarantined",
                "Runs whose stored rows could not be loaded at start-up (see /readyz).",
                value=float(len(self.engine.quarantined)),
            )
        if stats is not None and hasattr(stats, "loop_lag_max_seconds"):
            yield GaugeMetricFamily(
                "deltawatch_event_loop_lag_max_seconds",
                "Largest delay of the sidecar's event loop seen since start (a 10 ms probe).",
                value=float(stats.loop_lag_max_seconds),
            )
        if stats is not None and hasattr(stats, "inflight_bytes"):
            yield GaugeMetricFamily(
                "deltawatch_ingest_inflight_bytes",
                "Report bytes received and not yet acknowledged, over every stream.",
                value=float(stats.inflight_bytes),
            )


class AuditCollector(Collector):
    """The live self-audit's series (see the module docstring), read from `engine.audit`
    (engine None: every family, empty or zero, as grafana/generate.py lists them)."""

    def __init__(self, engine: Engine | None) -> None:
        self.engine = engine

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        ratio = GaugeMetricFamily(
            "deltawatch_audit_error_ratio",
            "Latest audit per matrix: |live - exact| over the key's stated bound (> 1: out).",
            labels=["run", "matrix", "key"],
        )
        skipped = CounterMetricFamily(
            "deltawatch_client_skipped_audits",
            "Audit blocks clients skipped because their send queue was full.",
            labels=["run"],
        )
        auditor = None if self.engine is None else self.engine.audit
        for run in [] if self.engine is None else self.engine.run_names():
            for row in self.engine.store.latest_audits(run):
                for key, value in sorted(row["ratios"].items()):
                    ratio.add_metric([run, row["matrix"], key], float(value))
            skipped.add_metric([run], float(auditor.skipped[run]))
        yield ratio
        yield skipped
        counts = dict.fromkeys(
            ("completed", "evicted", "pending", "pending_bytes", "last_seconds"), 0
        )
        if auditor is not None:
            counts = {
                "completed": auditor.completed,
                "evicted": auditor.evicted,
                "pending": auditor.pending(),
                "pending_bytes": auditor.pending_bytes,
                "last_seconds": auditor.last_seconds,
            }
        for kind, name, text, key in (
            (CounterMetricFamily, "audits", "Audits computed and stored.", "completed"),
            (CounterMetricFamily, "audit_assemblies_evicted",
             "Incomplete audit assemblies evicted (a block never came, or the memory cap).",
             "evicted"),
            (GaugeMetricFamily, "audit_assemblies_pending", "Audits waiting for blocks.",
             "pending"),
            (GaugeMetricFamily, "audit_pending_bytes",
             "Bytes held by incomplete audit assemblies.", "pending_bytes"),
            (GaugeMetricFamily, "audit_last_seconds",
             "Seconds the latest audit's float64 SVD took.", "last_seconds"),
        ):  # fmt: skip
            yield kind(f"deltawatch_{name}", text, value=float(counts[key]))


def make_registry(
    engine: Engine,
    *,
    detail: str = "matrix",
    ingest_stats: Any = None,
    alerts_firing: AlertsFiring | None = None,
) -> tuple[CollectorRegistry, ServiceCollector]:
    """A dedicated registry (never the global one) with the engine's and the service's collectors.

    Returns the registry and the service collector, whose `set_alerts_firing` connects the alert
    engine, which starts later."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, detail=detail))
    registry.register(AuditCollector(engine))
    service = ServiceCollector(engine, ingest_stats=ingest_stats, alerts_firing=alerts_firing)
    registry.register(service)
    return registry, service


__all__ = [
    "AGGREGATE_KEYS",
    "AuditCollector",
    "DETAILS",
    "EngineCollector",
    "EXPERTS_LOCKED_RATIO_METRIC",
    "EXPERTS_MATRICES_METRIC",
    "LOCKED_RATIO_METRIC",
    "RUN_MATRICES_METRIC",
    "ServiceCollector",
    "experts_metric",
    "make_registry",
    "run_metric",
]
