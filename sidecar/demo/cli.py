"""`deltawatch demo`: a live sidecar watching tiny OPD, SFT and RLVR runs from one anchor.

    deltawatch demo [--regimes opd,sft,rlvr] [--steps N] [--json PATH] [--bottleneck]
                    [--keep-serving] [--data-dir DIR] [--seed S]

Starts `deltawatch serve` as a subprocess (ephemeral loopback ports, a temporary data dir unless
--data-dir), post-trains a copy of the anchor once per regime with its own Monitor (runs
demo-opd, demo-sft, demo-rlvr), reads each run's aggregate back from the HTTP API and prints the
comparison table. --bottleneck adds OPD and SFT runs whose gradients are projected onto the rank-K
channel locked at 20% of the steps (Monitor(enforce_channel=True, lock_at_step=...)).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

REGIME_NAMES = ("opd", "sft", "rlvr", "opd-drift")
BOTTLENECK_REGIMES = ("opd", "sft")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags (the `deltawatch demo` subparser)."""
    from .regimes import Settings

    d = Settings()
    parser.add_argument(
        "--regimes",
        default=",".join(REGIME_NAMES),
        help="comma-separated subset of opd,sft,rlvr,opd-drift [default: all four]",
    )
    parser.add_argument(
        "--steps", type=int, default=d.steps, help=f"optimizer steps per run [{d.steps}]"
    )
    parser.add_argument("--every", type=int, default=5, help="a deltawatch check every N steps [5]")
    parser.add_argument(
        "--batch", type=int, default=d.batch, help=f"sequences per step [{d.batch}]"
    )
    parser.add_argument(
        "--drift-step",
        type=int,
        default=d.drift_step,
        help=f"opd-drift: the first step of the changed objective [{d.drift_step}]",
    )
    parser.add_argument(
        "--drift-lr",
        type=float,
        default=d.drift_lr,
        help=f"opd-drift: its AdamW learning rate (the whole run) [{d.drift_lr}]",
    )
    parser.add_argument(
        "--alert-webhook",
        default=None,
        help="also POST the sidecar's alerts to this URL (the --alert-webhook of serve)",
    )
    parser.add_argument(
        "--lr", type=float, default=d.lr, help=f"AdamW learning rate, all regimes [{d.lr}]"
    )
    parser.add_argument(
        "--seed", type=int, default=d.seed, help=f"prompt and sampling seed [{d.seed}]"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write the results (DESIGN §4) here"
    )
    parser.add_argument(
        "--bottleneck",
        action="store_true",
        help="also run OPD and SFT with gradients projected onto the rank-K channel",
    )
    parser.add_argument(
        "--keep-serving",
        action="store_true",
        help="keep the sidecar (API, /metrics) running after the table until Ctrl-C",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="sidecar data dir [temporary]")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="directory with anchor.safetensors and teacher.safetensors [the shipped ones]",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for training (tiny matmuls: 1 is fastest, and fair to a shared box) [1]",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_regimes(text: str) -> list[str]:
    names = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in names if r not in REGIME_NAMES]
    if bad or not names:
        raise SystemExit(
            f"--regimes: unknown {bad or text!r}; choose from {','.join(REGIME_NAMES)}"
        )
    return list(dict.fromkeys(names))


def _load_models(weights: Path | None):
    from . import anchor
    from . import model as demo_model

    folder = weights or demo_model.WEIGHTS_DIR
    files = (folder / demo_model.ANCHOR_FILE, folder / demo_model.TEACHER_FILE)
    if not all(f.exists() for f in files) and weights is None:
        cache = Path.home() / ".cache" / "deltawatch" / "demo-weights"
        if all((cache / f.name).exists() for f in files):
            folder, files = cache, tuple(cache / f.name for f in files)
    if not all(f.exists() for f in files):
        if weights is not None:
            raise SystemExit(f"--weights {weights}: needs {files[0].name} and {files[1].name}")
        if not os.access(folder.parent, os.W_OK):
            folder = cache  # an installed package's folder may be read-only
            files = tuple(cache / f.name for f in files)
        _say(f"no demo weights shipped: training the anchor and teacher into {folder} (minutes)")
        anchor.make_weights(folder, log=_say)
    return lambda: demo_model.load(files[0]), demo_model.load(files[1])


def _print_live(msg: str) -> None:
    """A line on stdout that does not tear a progress bar on stderr."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr (tqdm comes with transformers), or nothing."""
    if not enabled:
        return lambda step, stats: None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=True, dynamic_ncols=True)

    def update(step: int, stats: Any) -> None:
        bar.set_postfix(loss=f"{stats.loss:.3f}", reward=f"{stats.reward:.2f}", refresh=False)
        bar.update(1)

    return update, bar.close


def monitored_run(
    regime: str,
    run_name: str,
    load_anchor,
    teacher,
    train_pairs,
    held_out,
    settings,
    sidecar,
    *,
    every: int,
    progress: bool,
    monitor_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Post-train a fresh copy of the anchor with its own Monitor; read the run back."""
    from deltawatch.client import Monitor

    from . import model as demo_model
    from . import regimes

    student = load_anchor()
    alerts: list[dict[str, Any]] = []
    at_step = [0]

    def on_alert(item: dict[str, Any]) -> None:
        """Print an alert as it reaches the trainer, with the step the trainer is at."""
        alerts.append({k: item[k] for k in ("rule", "matrix", "state")} | {"step": at_step[0]})
        _print_live(f"ALERT {item['state']} {item['rule']} at step {at_step[0]}: {item['summary']}")

    mon = Monitor(
        student,
        run=run_name,
        endpoint=sidecar.endpoint,
        every=every,
        seed=settings.seed,
        on_alert=on_alert,
        **(monitor_kwargs or {}),
    )
    bar_update, close_bar = _progress(settings.steps, run_name, progress)

    def update(step: int, stats: Any) -> None:
        at_step[0] = step
        bar_update(step, stats)

    try:
        seconds = regimes.post_train(
            regime, student, teacher, train_pairs, settings, attach=mon.attach, progress=update
        )
    finally:
        close_bar()
        acked = mon.close(timeout=120.0)
    if not acked:
        _say(f"{run_name}: not every report was acknowledged: {mon.stats()}")
    accuracy = demo_model.accuracy(student, held_out)
    detail = sidecar.run(run_name)
    projected = getattr(getattr(mon, "_channel", None), "projected_total", None)
    return {
        "aggregate": detail["aggregate"],
        "alerts": alerts,
        "lock_step": detail["aggregate"].get("lock_step"),
        "accuracy": accuracy,
        "seconds": seconds,
        "projected_gradients": projected,
    }


def run(args: argparse.Namespace) -> int:
    """The demo: sidecar up, regimes, table, JSON; 0 on success."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    import torch

    from ..process import SidecarProcess
    from . import model as demo_model
    from . import report, task
    from .regimes import Settings

    names = parse_regimes(args.regimes)
    if args.steps < 1 or args.every < 1 or args.batch < 8 or args.batch % 8:
        raise SystemExit("--steps and --every must be ≥ 1, --batch a multiple of 8 (GRPO groups)")
    if args.drift_step < 1:
        raise SystemExit(f"--drift-step must be ≥ 1, got {args.drift_step}")
    torch.manual_seed(args.seed)
    settings = Settings(
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        drift_step=args.drift_step,
        drift_lr=args.drift_lr,
    )
    load_anchor, teacher = _load_models(args.weights)
    train_pairs, held_out = task.split_pairs()
    anchor_accuracy = demo_model.accuracy(load_anchor(), held_out)
    teacher_accuracy = demo_model.accuracy(teacher, held_out)
    _say(
        f"anchor: held-out exact match {anchor_accuracy:.3f}; teacher {teacher_accuracy:.3f} "
        f"({len(held_out)} held-out prompts)"
    )
    progress = not args.no_progress
    serve_args = ("--alert-webhook", args.alert_webhook) if args.alert_webhook else ()
    sidecar = SidecarProcess(args.data_dir, *serve_args, log_name="demo-sidecar.log").start()
    try:
        print(f"deltawatch page: {sidecar.http_url}/  (open it to watch the runs live)", flush=True)
        _say(f"sidecar: gRPC {sidecar.endpoint}, data {sidecar.data_dir}")
        _say(f"  metrics  {sidecar.http_url}/metrics")
        _say(f"  API      {sidecar.http_url}/api/v1/runs  (/api/v1/runs/demo-opd, ...)")
        _say(f"  alerts   {sidecar.http_url}/api/v1/alerts")
        results: dict[str, Any] = {}
        for regime in names:
            results[regime] = monitored_run(
                regime, f"demo-{regime}", load_anchor, teacher, train_pairs, held_out, settings,
                sidecar, every=args.every, progress=progress,
            )  # fmt: skip
        bottleneck = None
        if args.bottleneck:
            bottleneck = run_bottleneck(
                args, settings, load_anchor, teacher, train_pairs, held_out, sidecar, results,
                progress,
            )  # fmt: skip
        out = {
            "regimes": {
                r: report.regime_entry(v["aggregate"], v["accuracy"], v["alerts"])
                for r, v in results.items()
            },
            "bottleneck": bottleneck,
            "anchor_accuracy": anchor_accuracy,
            "teacher_accuracy": teacher_accuracy,
            "settings": {
                "steps": settings.steps,
                "batch": settings.batch,
                "group": settings.group,
                "lr": settings.lr,
                "weight_decay": settings.weight_decay,
                "every": args.every,
                "seed": settings.seed,
                "drift_step": settings.drift_step,
                "drift_lr": settings.drift_lr,
                "held_out_prompts": len(held_out),
            },
            "seconds": {r: v["seconds"] for r, v in results.items()},
        }
        print(report.table(out["regimes"], anchor_accuracy))
        print()
        print(report.alerts_table(out["regimes"]))
        api_alerts = sidecar.get("/api/v1/alerts")["alerts"]
        run_level = [a for a in api_alerts if a["matrix"] is None]
        print(
            f"{sidecar.http_url}/api/v1/alerts: {len(run_level)} run-level and "
            f"{len(api_alerts) - len(run_level)} per-matrix alerts"
        )
        for a in run_level:
            print(f"  {a['run']}: {a['rule']} {a['state']} — {a['summary']}")
        if bottleneck is not None:
            print()
            print(
                f"bottleneck: gradients projected onto the rank-{bottleneck['channel_rank']} channel "
                f"locked at step {bottleneck['lock_at_step']} (20% of {settings.steps} steps)"
            )
            print(report.bottleneck_table(bottleneck))
        out["seconds"]["total"] = time.perf_counter() - t_start
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2, sort_keys=False) + "\n")
            _say(f"wrote {args.json}")
        _say(f"demo finished in {out['seconds']['total']:.0f} s")
        if args.keep_serving:
            print(
                f"--keep-serving: the page {sidecar.http_url}/, the API and /metrics stay up "
                "(Ctrl-C to stop)",
                flush=True,
            )
            try:
                while sidecar.proc is not None and sidecar.proc.poll() is None:
                    time.sleep(1.0)
            except KeyboardInterrupt:
                pass
    finally:
        sidecar.stop()
    return 0


def run_bottleneck(
    args, settings, load_anchor, teacher, train_pairs, held_out, sidecar, results, progress
) -> dict[str, Any]:
    """OPD and SFT with and without g ← g·V_ref·V_refᵀ, V_ref locked at 20% of the steps.

    The free runs are the table's runs (the Monitor does not change training) or, when a regime
    was not in --regimes, a run made here."""
    from deltawatch.client.settings import SketchSettings

    lock_at = max(args.every, math.ceil(0.2 * settings.steps))
    channel_rank = SketchSettings().channel_rank
    entries: dict[str, Any] = {}
    for regime in BOTTLENECK_REGIMES:
        free = results.get(regime)
        if free is None:
            free = monitored_run(
                regime, f"demo-{regime}", load_anchor, teacher, train_pairs, held_out, settings,
                sidecar, every=args.every, progress=progress,
            )  # fmt: skip
            results[regime] = free
        held = monitored_run(
            regime, f"demo-{regime}-bottleneck", load_anchor, teacher, train_pairs, held_out,
            settings, sidecar, every=args.every, progress=progress,
            monitor_kwargs={"enforce_channel": True, "lock_at_step": lock_at, "channel_rank": channel_rank},
        )  # fmt: skip
        entries[regime] = {
            "accuracy_free": free["accuracy"],
            "accuracy_bottleneck": held["accuracy"],
            "channel_energy_ratio": held["aggregate"].get("channel_energy_ratio"),
            "locked_ratio": held["aggregate"].get("locked_ratio"),
            "projected_gradients": held["projected_gradients"],
            "run": f"demo-{regime}-bottleneck",
        }
    return {"channel_rank": channel_rank, "lock_at_step": lock_at, "regimes": entries}
