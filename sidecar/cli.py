"""The `deltawatch` console script: `deltawatch serve ...`, `deltawatch demo ...` and
`deltawatch replay ...`.

Every `serve` flag is also an environment variable DELTAWATCH_<FLAG> (e.g. DELTAWATCH_DATA_DIR);
the command line wins over the environment, the environment over the default. The `demo`
subcommand lives in `deltawatch.sidecar.demo.cli` (`add_arguments(parser)`, `run(args)`) and is
imported only when used; `replay` in `deltawatch.sidecar.replay`, the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import sys
from dataclasses import fields

from .config import DEVICES, LOG_LEVELS, METRICS_DETAIL, ServeConfig, env_name

_HELP = {
    "grpc_address": "host:port of the gRPC ingest (port 0: any free port)",
    "http_address": "host:port of the HTTP API, /metrics and the probes (port 0: any free port)",
    "data_dir": "directory of the SQLite store (created when missing)",
    "device": "where the geometry runs: auto (cuda when available), cpu, cuda",
    "alert_webhook": "POST Alertmanager webhook payloads (version 4) to this URL",
    "alertmanager_url": "post alerts to this Alertmanager's /api/v2/alerts (repeatable)",
    "external_url": "the sidecar's address as people reach it, for Alertmanager's links "
    "(default: http(s)://<http address>)",
    "alert_config": "JSON or YAML file with alert rule settings (docs/alerts.md)",
    "token_file": "require 'authorization: Bearer <token>' (the file's content) on gRPC and HTTP",
    "tls_cert": "PEM certificate chain of the server (TLS for gRPC and HTTP)",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA: gRPC clients must present a certificate it signed (mutual TLS)",
    "log_level": "debug, info, warning or error",
    "metrics_detail": "Prometheus cardinality: matrix (per matrix, MoE experts per module over "
    "experts), expert (every expert too), layer (per layer), run",
    "metrics_require_token": "with --token-file, require the token on /metrics too",
    "ready_file": 'write {"grpc_port": .., "http_port": ..} here once both ports listen',
    "channel_rank": "K, the channel rank, for runs whose hello does not say",
    "grace_seconds": "on SIGTERM, how long open streams get to finish",
    "threads": "compute threads of the geometry, torch's and numpy's BLAS (default 1, beside a "
    "trainer; 0: all cores)",
    "max_stream_bytes": "a stream stops reading at this many unacknowledged report bytes; a "
    "larger report is refused RESOURCE_EXHAUSTED",
    "max_inflight_bytes": "every stream's unacknowledged report bytes together; beyond, "
    "RESOURCE_EXHAUSTED (retryable)",
    "commit_window_ms": "group commit: how long a batch waits for more reports before its COMMIT",
}
_CHOICES = {"device": DEVICES, "log_level": LOG_LEVELS, "metrics_detail": METRICS_DETAIL}
# Flags that were renamed: old ServeConfig field -> new one. The old flag (and its environment
# variable) still parses, and fails naming the new one.
_RENAMED = {"rank": "channel_rank"}
_TRUE = ("1", "true", "yes", "on")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ServeConfig field; defaults stay None so the environment can fill them."""
    for f in fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{_HELP.get(f.name, '')} [env {env_name(f.name)}; default {f.default}]"
        if f.type in ("bool", bool):
            parser.add_argument(
                flag, action="store_const", const=True, default=None, help=help_text
            )
        elif f.type == "tuple[str, ...]":
            parser.add_argument(flag, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, choices=_CHOICES.get(f.name), help=help_text)
    for old in _RENAMED:
        parser.add_argument(
            "--" + old.replace("_", "-"), dest=f"renamed_{old}", help=argparse.SUPPRESS
        )


def _refuse_renamed(args: argparse.Namespace, environ: dict[str, str]) -> None:
    """A renamed flag or environment variable fails with the new name (`_RENAMED`)."""
    for old, new in _RENAMED.items():
        flag, now = "--" + old.replace("_", "-"), "--" + new.replace("_", "-")
        if getattr(args, f"renamed_{old}", None) is not None:
            raise ValueError(f"{flag} is now {now} ({_HELP[new]})")
        if environ.get(env_name(old)):
            raise ValueError(f"{env_name(old)} is now {env_name(new)} ({_HELP[new]})")


def serve_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServeConfig:
    """Flags over environment over defaults -> a validated ServeConfig (ValueError otherwise)."""
    environ = os.environ if environ is None else environ
    _refuse_renamed(args, environ)
    values = {}
    for f in fields(ServeConfig):
        raw = getattr(args, f.name, None)
        if raw is None:
            raw = environ.get(env_name(f.name))
            if raw is None or raw == "":
                continue
        if f.type in ("bool", bool):
            values[f.name] = raw is True or str(raw).lower() in _TRUE
        elif f.type == "tuple[str, ...]":  # repeated flags, or one variable listing them
            items = raw if isinstance(raw, list) else re.split(r"[,\s]+", raw)
            values[f.name] = tuple(i for i in items if i)
        elif f.type in ("int", int):
            try:
                values[f.name] = int(raw)
            except ValueError:
                raise ValueError(
                    f"--{f.name.replace('_', '-')}: {raw!r} is not an integer"
                ) from None
        elif f.type in ("float", float):
            try:
                values[f.name] = float(raw)
            except ValueError:
                raise ValueError(f"--{f.name.replace('_', '-')}: {raw!r} is not a number") from None
        else:
            values[f.name] = str(raw)
    return ServeConfig(**values)


def build_parser(*, with_demo: bool = True) -> argparse.ArgumentParser:
    """The parser; the demo's own arguments are imported only when `with_demo` (its module pulls
    in transformers, which `deltawatch serve` never needs)."""
    parser = argparse.ArgumentParser(
        prog="deltawatch", description="Live geometry of LLM weight updates."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the sidecar (gRPC ingest, HTTP API, /metrics)")
    add_serve_arguments(serve)
    demo = sub.add_parser("demo", help="tiny OPD, SFT and RLVR runs watched by a live sidecar")
    if with_demo:
        from .demo.cli import add_arguments as add_demo_arguments

        add_demo_arguments(demo)
    replay = sub.add_parser("replay", help="watch checkpoints on disk as a run (docs/replay.md)")
    from .replay import add_arguments as add_replay_arguments

    add_replay_arguments(replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(with_demo=bool(argv) and argv[0] == "demo")
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            config = serve_config(args)
        except ValueError as exc:
            parser.error(str(exc))
        logging.basicConfig(
            level=config.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        from .server import serve

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(config))
        return 0
    if args.command == "demo":
        from .demo.cli import run as run_demo

        return int(run_demo(args) or 0)
    if args.command == "replay":
        from .replay import run as run_replay

        return int(run_replay(args) or 0)
    return 2


if __name__ == "__main__":
    sys.exit(main())
