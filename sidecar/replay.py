"""`deltawatch replay`: the checkpoints a run already wrote, watched as if the monitor had been live.

    deltawatch replay ANCHOR CKPT [CKPT ...] --run NAME [--json PATH] [--exact] [--plots DIR]
                      [--endpoint HOST:PORT --http-url URL | --data-dir DIR]
                      [--include RX ...] [--exclude RX ...] [--device cpu|cuda]

The anchor and every checkpoint are read tensor by tensor (sidecar/checkpoints.py). The matrices
are chosen as the Monitor chooses them (client/naming.py, `--include` / `--exclude`), one
`MatrixTracker` each, fed W_t = the checkpoint's weight at the checkpoint's step, warm-started
from checkpoint to checkpoint; the checks travel over gRPC through the client's own `Transport`
to a sidecar (an embedded `deltawatch serve` child unless `--endpoint`), so the replayed run is an
ordinary run: HTTP API, /metrics, dashboards, alerts. The live keys are read back from the
sidecar's API. Work goes matrix by matrix (every checkpoint of one matrix, then the next), so
memory holds one matrix's anchor, weight and tracker at a time, whatever the model's size.
`--exact` adds the audit tier (sidecar/exact.py `audit_keys`), `--plots` the figures
(sidecar/replay_plots.py). docs/replay.md documents every key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from deltawatch.client.config import RUN_NAME_RULE

from .checkpoints import Checkpoint, TensorFiles, is_adapter, model_files, open_checkpoint
from .geometry import set_threads

QUEUE_BYTES = 16 << 20  # the sender's queue: reports wait for acks, so memory stays bounded
QUEUE_HIGH_WATER = 0.5  # wait for acks once the sender's queue holds this share of its budget
ACK_TIMEOUT_S = 300.0
PROGRESS_WIDTH = 30
# Transport error kinds after which resending cannot help (client/transport.py names them).
FATAL_STREAM_ERRORS = (
    "stream_invalid_argument",
    "stream_failed_precondition",
    "stream_unauthenticated",
    "stream_permission_denied",
)


@dataclass
class MatrixSpec:
    """One replayed matrix (a row of the run's manifest)."""

    name: str
    shape: tuple[int, int]
    layer: int | None
    module: str


@dataclass
class MatrixResult:
    """What replay keeps of one matrix at one checkpoint: the exact counts and the audit block."""

    counts: tuple[int, int, int, int]  # numel, visible, visible∩low, visible∩principal
    exact: dict[str, Any] | None = None


@dataclass
class Replay:
    """The plan: the anchor, the selected matrices, the checkpoints in step order."""

    anchor: TensorFiles
    matrices: list[MatrixSpec]
    checkpoints: list[Checkpoint]
    results: dict[str, list[MatrixResult]] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `deltawatch replay` flags."""
    parser.add_argument("anchor", type=Path, help="W0: a model directory or .safetensors file")
    parser.add_argument(
        "checkpoints",
        type=Path,
        nargs="+",
        metavar="CKPT",
        help="model directories, .safetensors files or PEFT LoRA adapter directories",
    )
    parser.add_argument("--run", required=True, help=f"run name ({RUN_NAME_RULE})")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--exact", action="store_true", help="add the float64 audit tier (full SVDs)"
    )
    parser.add_argument("--plots", type=Path, default=None, help="write PNG and SVG figures here")
    parser.add_argument(
        "--endpoint", default=None, help="gRPC host:port of a running sidecar [embedded one]"
    )
    parser.add_argument(
        "--http-url", default=None, help="with --endpoint: that sidecar's HTTP API base URL"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="embedded sidecar's data dir")
    parser.add_argument("--include", action="append", default=None, help="regex (repeatable)")
    parser.add_argument("--exclude", action="append", default=None, help="regex (repeatable)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="[cpu]")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch and BLAS compute threads (0: their defaults) [0]",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """A plain-text progress bar on stderr: `[#####.....] 12/36 name`."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.start = time.monotonic()

    def advance(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        filled = PROGRESS_WIDTH * self.done // max(1, self.total)
        bar = "#" * filled + "." * (PROGRESS_WIDTH - filled)
        seconds = time.monotonic() - self.start
        end = "\n" if self.done == self.total else ""
        print(
            f"\rreplay [{bar}] {self.done}/{self.total} {seconds:5.0f} s {what[-48:]:<48}",
            end=end,
            file=sys.stderr,
            flush=True,
        )


# -- the plan --------------------------------------------------------------------------------------


def select_matrices(anchor: TensorFiles, config: Any) -> list[MatrixSpec]:
    """The Monitor's selection (DESIGN §2) over the anchor's tensors: 2-D weights inside
    repeated blocks by default, `include` / `exclude` over it."""
    from deltawatch.client import naming

    out = []
    for name in anchor.names():
        shape = anchor.shape(name)
        verdict = config.selects(name)
        if verdict is None:
            verdict = naming.default_selected(name, torch.empty(shape, device="meta"))
        if not verdict:
            continue
        if len(shape) != 2:
            raise ValueError(
                f"--include selected {name!r} of shape {list(shape)}; replay reads 2-D weight "
                "matrices; narrow the pattern"
            )
        layer, module = naming.parse_name(name)
        out.append(MatrixSpec(name, (int(shape[0]), int(shape[1])), layer, module))
    if not out:
        raise ValueError(
            "no matrix selected: the default takes 2-D weights inside repeated blocks (names "
            "with a block index); pass --include REGEX"
        )
    return out


def plan(anchor_path: Path, checkpoint_paths: list[Path], config: Any) -> Replay:
    """Open the anchor and checkpoints (headers only), select the matrices, order by step."""
    anchor = model_files(anchor_path)
    names = anchor.names()
    checkpoints = [open_checkpoint(p, i + 1, names) for i, p in enumerate(checkpoint_paths)]
    checkpoints.sort(key=lambda c: c.step)
    steps = [c.step for c in checkpoints]
    if len(set(steps)) != len(steps) or steps[0] < 1:
        raise ValueError(
            "checkpoint steps must be distinct and >= 1; got "
            + ", ".join(f"{c.path.name}={c.step}" for c in checkpoints)
        )
    kinds = {c.kind for c in checkpoints}
    if len(kinds) > 1:
        raise ValueError(
            "replay one kind at a time: full-weight checkpoints or adapter directories, not both"
        )
    return Replay(anchor, select_matrices(anchor, config), checkpoints)


def monitor_config(args: argparse.Namespace, adapters: bool) -> Any:
    """The client's MonitorConfig for this replay (the settings travel in the hello). Adapters
    are replayed in the native view on a float32 anchor, so ΔW is the factors' product."""
    from deltawatch.client.config import MonitorConfig

    return MonitorConfig.from_keywords(
        args.run,
        include=args.include,
        exclude=args.exclude,
        view="native" if adapters else "bf16",
        anchor="device",  # W0 stays beside W_t (the replay's own device)
        endpoint=args.endpoint or "127.0.0.1:0",
        max_queue_bytes=QUEUE_BYTES,
    )


# -- the live path ----------------------------------------------------------------------------------


class ReplaySender:
    """The Monitor's wire path without a model: the client's Transport (hello with the manifest,
    baselines, reports, acks), with back-pressure instead of dropping: replay waits for acks
    when the queue is half full."""

    def __init__(self, config: Any, matrices: list[MatrixSpec], dtypes: dict[str, str]) -> None:
        from deltawatch.client.monitor import manifest_entry
        from deltawatch.client.transport import CHANNEL_OPTIONS, Transport

        self.config = config
        self.manifest = [
            manifest_entry(m.name, m.shape, dtypes[m.name], m.layer, m.module) for m in matrices
        ]
        self.incarnation = int(time.time() * 1000)

        def channel():
            import grpc

            return grpc.insecure_channel(config.transport.endpoint, options=CHANNEL_OPTIONS)

        self.transport = Transport(
            run=config.run,
            incarnation=self.incarnation,
            hello=self._hello,
            channel_factory=channel,
            max_queue_bytes=config.transport.max_queue_bytes,
            connect_timeout=config.transport.connect_timeout,
        )

    def _hello(self, msg_id: int) -> list:
        from deltawatch.client.monitor import hello_frames

        return hello_frames(msg_id, self.config, self.incarnation, self.manifest)

    def _refused(self) -> None:
        """Fail fast when the sidecar ended the stream over the run itself (a bad hello, a
        wrong token): the sender would only retry."""
        fatal = [k for k in self.transport.errors.counts if k in FATAL_STREAM_ERRORS]
        if fatal:
            raise RuntimeError(
                f"the sidecar at {self.config.transport.endpoint} refused the run ({', '.join(fatal)}); "
                "its reason is in the log line above"
            )

    def _room(self) -> None:
        t = self.transport
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while t.queued_bytes > QUEUE_HIGH_WATER * t.max_queue_bytes:
            self._refused()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the sidecar at {self.config.transport.endpoint} stopped acknowledging"
                )
            time.sleep(0.005)

    def baseline(self, name: str, sketch: Any) -> None:
        self._room()
        self.transport.submit_baseline(name, sketch)

    def report(self, check: Any) -> None:
        self._room()
        self.transport.submit_report(check)

    def close(self) -> None:
        t = self.transport
        self._refused()
        if not t.close(ACK_TIMEOUT_S) or t.refused_total or t.dropped_total:
            raise RuntimeError(
                f"not every report was stored: {t.acked_total} acknowledged, {t.refused_total} "
                f"refused, {t.dropped_total} dropped, {t.unacknowledged()} unacknowledged "
                f"(errors {dict(t.errors.counts)})"
            )


def _tracker(spec: MatrixSpec, W0: torch.Tensor, config: Any, device: str):
    from deltawatch.client.tracker import MatrixTracker

    return MatrixTracker.attach(
        spec.name,
        W0.to(device),
        shape=spec.shape,
        anchor=config.anchor,
        sketch=config.sketch,
        lock=config.lock,
    )


def replay_matrix(
    r: Replay, spec: MatrixSpec, sender: ReplaySender, config: Any, *, exact: bool, device: str
) -> list[MatrixResult]:
    """Every checkpoint of one matrix through its tracker (and the audit tier)."""
    from . import exact as audit

    W0 = r.anchor.get(spec.name)
    if config.anchor.view == "native":
        W0 = W0.float()  # adapters: ΔW = (W0 + s·B·A) − W0 on a float32 anchor
    tracker = _tracker(spec, W0, config, device)
    sender.baseline(spec.name, tracker.baseline())
    anchor = audit.audit_anchor(W0.to(device), view=config.anchor.view) if exact else None
    results, V_Ks = [], []
    for ckpt in r.checkpoints:
        Wt = ckpt.weight(spec.name, W0).to(device)
        check = tracker.check(Wt if ckpt.kind == "weights" else Wt.float(), ckpt.step)
        sender.report(check)
        counts = (
            check.numel,
            check.visible_count,
            check.visible_low_count,
            check.visible_principal_count,
        )
        block = None
        if anchor is not None:
            block, V_K = audit.audit_keys(anchor, Wt, channel_rank=config.sketch.channel_rank)
            V_Ks.append(V_K)
        results.append(MatrixResult(counts, block))
        del Wt
    if anchor is not None:
        audit.final_alignments([x.exact for x in results], V_Ks, config.sketch.channel_rank)
    return results


# -- reading the run back ---------------------------------------------------------------------------


def api_get(base_url: str, path: str, timeout: float = 30.0, **query: str) -> Any:
    """GET a JSON document from a sidecar's HTTP API."""
    url = base_url.rstrip("/") + path + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def collect(r: Replay, run: str, http_url: str) -> dict[str, Any]:
    """The `--json` document: per checkpoint, the run aggregate (engine.aggregate_rows over the
    matrices' checks at that step, as the API computes it) and every matrix's live keys (read
    back from the sidecar) and audit block."""
    from .engine import MatrixRow, aggregate_rows

    quoted = urllib.parse.quote(run)
    history = {
        m.name: {
            p["step"]: p
            for p in api_get(http_url, f"/api/v1/runs/{quoted}/history", matrix=m.name)["points"]
        }
        for m in r.matrices
    }
    out = []
    for i, ckpt in enumerate(r.checkpoints):
        rows, matrices = [], []
        for m in r.matrices:
            res = r.results[m.name][i]
            point = history[m.name].get(ckpt.step)
            if point is None:
                raise RuntimeError(f"the sidecar has no check of {m.name} at step {ckpt.step}")
            keys = {k: v for k, v in point.items() if k != "step"}
            numel, visible, low, principal = res.counts
            rows.append(
                MatrixRow(run, m.name, m.layer, m.module, m.shape, numel, ckpt.step, 0, visible,
                          low, principal, keys)
            )  # fmt: skip
            item = {"matrix": m.name, "layer": m.layer, "module": m.module, "shape": list(m.shape)}
            matrices.append(item | keys | {"exact": res.exact})
        aggregate = aggregate_rows(rows)
        if r.matrices and r.results[r.matrices[0].name][i].exact is not None:
            aggregate["exact"] = exact_aggregate(rows, [r.results[m.name][i] for m in r.matrices])
        out.append(
            {"step": ckpt.step, "checkpoint": str(ckpt.path), "aggregate": aggregate,
             "matrices": matrices}
        )  # fmt: skip
    return {"run": run, "checkpoints": out}


def exact_aggregate(rows: list, results: list[MatrixResult]) -> dict[str, float | None]:
    """The audit block's run aggregate (DESIGN §2): counts pooled by parameter count (the exact
    counts are the live ones), everything else the plain mean over matrices."""
    from . import exact as audit
    from .engine import POOLED_KEYS, aggregate_rows

    pooled = aggregate_rows(rows)
    out: dict[str, float | None] = {}
    for key in audit.AUDIT_KEYS:
        if key in POOLED_KEYS:
            out[key] = pooled[key]
            continue
        values = [x.exact[key] for x in results if x.exact.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


# -- the table ---------------------------------------------------------------------------------------

TABLE_KEYS = (
    ("frobenius_norm", "‖ΔW‖_F", "{:.3e}"),
    ("stable_rank", "stable rank", "{:.2f}"),
    ("topk_energy_ratio", "top-K energy", "{:.3f}"),
    ("bf16_visible_ratio", "bf16 visible", "{:.3f}"),
    ("rotation_mean_degrees", "rotation°", "{:.3f}"),
    ("spectral_shift_topk", "shift top-k", "{:.2e}"),
    ("locked_ratio", "locked", "{:.2f}"),
)


def table(doc: dict[str, Any]) -> str:
    """The per-checkpoint table: run aggregates (and the audit tier's where present)."""
    header = ["step"] + [h for _, h, _ in TABLE_KEYS]
    exact = any("exact" in c["aggregate"] for c in doc["checkpoints"])
    if exact:
        header += ["exact stable rank", "NSS (full)", "rotation° k512"]
    rows = [header]
    for c in doc["checkpoints"]:
        a = c["aggregate"]
        row = [str(c["step"])]
        row += ["-" if a.get(k) is None else fmt.format(a[k]) for k, _, fmt in TABLE_KEYS]
        if exact:
            e = a["exact"]
            for k, fmt in (
                ("stable_rank", "{:.2f}"),
                ("spectral_shift", "{:.2e}"),
                ("rotation_k512_mean_degrees", "{:.3f}"),
            ):
                row.append("-" if e.get(k) is None else fmt.format(e[k]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows)


# -- the command ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`deltawatch replay`: plan, replay every matrix, read back, table, JSON, plots."""
    if args.endpoint and args.data_dir:
        raise SystemExit("--endpoint and --data-dir exclude each other")
    if args.endpoint and not args.http_url:
        raise SystemExit("--endpoint needs --http-url (the sidecar's HTTP API, to read keys back)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads > 0:
        set_threads(args.threads)
    if args.plots is not None:
        from .replay_plots import require_matplotlib

        require_matplotlib()
    try:
        config = monitor_config(args, all(is_adapter(p) for p in args.checkpoints))
        r = plan(args.anchor, list(args.checkpoints), config)
    except ValueError as exc:
        raise SystemExit(f"replay: {exc}") from None
    sidecar = None
    if args.endpoint is None:
        from .process import SidecarProcess

        sidecar = SidecarProcess(args.data_dir, log_name="replay-sidecar.log").start()
        config = dataclasses.replace(
            config, transport=dataclasses.replace(config.transport, endpoint=sidecar.endpoint)
        )
    http_url = args.http_url or sidecar.http_url
    try:
        _say(
            f"replay {args.run}: {len(r.matrices)} matrices x {len(r.checkpoints)} checkpoints "
            f"(steps {', '.join(str(c.step) for c in r.checkpoints)}) -> {config.transport.endpoint}"
        )
        if sidecar is not None:
            _say(f"  API {http_url}/api/v1/runs/{args.run}  metrics {http_url}/metrics")
        sender = ReplaySender(
            config, r.matrices, {m.name: r.anchor.dtype(m.name) for m in r.matrices}
        )
        progress = Progress(len(r.matrices), not args.no_progress)
        try:
            for spec in r.matrices:
                r.results[spec.name] = replay_matrix(
                    r, spec, sender, config, exact=args.exact, device=args.device
                )
                progress.advance(spec.name)
        finally:
            sender.close()
        doc = collect(r, args.run, http_url)
        print(table(doc))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=1) + "\n")
            _say(f"wrote {args.json}")
        if args.plots is not None:
            from .replay_plots import write_plots

            for path in write_plots(doc, args.plots):
                _say(f"wrote {path}")
    finally:
        if sidecar is not None:
            sidecar.stop()
    return 0
