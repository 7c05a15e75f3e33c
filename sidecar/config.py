"""ServeConfig: the frozen dataclass behind `deltawatch serve`, parsed once from flags and env.

Every flag `--some-flag` is also the environment variable `DELTAWATCH_SOME_FLAG`; a flag given on
the command line wins over the environment, the environment over the default.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

from deltawatch.client import wire

DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("debug", "info", "warning", "error")
METRICS_DETAIL = ("matrix", "expert", "layer", "run")


# `deltawatch serve --threads` default (docs/sidecar.md "Threads")
DEFAULT_THREADS = 1


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one sidecar process. Field names are the flags with '-' as '_'."""

    grpc_address: str = "127.0.0.1:50051"
    http_address: str = "127.0.0.1:9400"
    data_dir: str = "./deltawatch-data"
    device: str = "auto"
    alert_webhook: str | None = None
    alertmanager_url: tuple[str, ...] = ()  # repeatable flag; env: URLs separated by commas/spaces
    external_url: str | None = None  # how people reach the HTTP address (Alertmanager links)
    alert_config: str | None = None
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    log_level: str = "info"
    metrics_detail: str = "matrix"
    metrics_require_token: bool = False
    ready_file: str | None = None  # receives {"grpc_port", "http_port"} once both listen
    channel_rank: int = 16  # K the geometry uses when a run's hello does not say
    grace_seconds: float = 10.0  # SIGTERM: how long in-flight streams get to finish
    # compute threads of the engine (torch's and numpy's BLAS: geometry.set_threads); small by
    # default, so a sidecar beside a trainer does not spin its threads against the trainer's;
    # 0: the libraries' defaults (all cores)
    threads: int = DEFAULT_THREADS
    max_stream_bytes: int = 256 << 20  # one stream's received, unacknowledged report bytes
    max_inflight_bytes: int = 1 << 30  # every stream's together
    commit_window_ms: float = 2.0  # how long a group commit waits for more reports

    def __post_init__(self) -> None:
        for name in ("grpc_address", "http_address"):
            value = getattr(self, name)
            if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\s]+|[0-9A-Fa-f:]+):\d{1,5}", value):
                raise ValueError(
                    f"--{name.replace('_', '-')} {value!r} must be host:port, e.g. "
                    f"127.0.0.1:{50051 if name == 'grpc_address' else 9400} (port 0: any free port)"
                )
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r} must be one of {', '.join(DEVICES)}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--log-level {self.log_level!r} must be one of {LOG_LEVELS}")
        if self.metrics_detail not in METRICS_DETAIL:
            raise ValueError(
                f"--metrics-detail {self.metrics_detail!r} must be one of {METRICS_DETAIL}"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("token_file", "tls_cert", "tls_key", "tls_client_ca", "alert_config"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(
                    f"--{name.replace('_', '-')} {path!r}: file does not exist; give an "
                    f"existing file"
                )
        if self.token_file:
            from deltawatch.client.credentials import read_token

            try:  # an empty or malformed token fails here, before anything listens
                read_token(self.token_file)
            except ValueError as exc:
                raise ValueError(f"--token-file: {exc}") from None
        if self.alert_webhook and not re.match(r"https?://", self.alert_webhook):
            raise ValueError(
                f"--alert-webhook {self.alert_webhook!r} must be an http:// or https:// URL"
            )
        for url in self.alertmanager_url:
            if not re.match(r"https?://[^/\s]", url):
                raise ValueError(
                    f"--alertmanager-url {url!r} must be an http:// or https:// URL of an "
                    f"Alertmanager, e.g. http://alertmanager:9093"
                )
        if self.external_url and not re.match(r"https?://[^/\s]", self.external_url):
            raise ValueError(
                f"--external-url {self.external_url!r} must be an http:// or https:// URL, e.g. "
                f"http://deltawatch.example:9400"
            )
        if self.channel_rank <= 0:
            raise ValueError(f"--channel-rank must be > 0, got {self.channel_rank}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0: torch's default), got {self.threads}")
        if self.max_stream_bytes < wire.MAX_CHUNK_BYTES:
            raise ValueError(
                f"--max-stream-bytes must be >= {wire.MAX_CHUNK_BYTES} (1 MiB), got "
                f"{self.max_stream_bytes}"
            )
        if self.max_inflight_bytes < self.max_stream_bytes:
            raise ValueError(
                f"--max-inflight-bytes ({self.max_inflight_bytes}) must be >= --max-stream-bytes "
                f"({self.max_stream_bytes})"
            )
        if not 0 <= self.commit_window_ms <= 1000:
            raise ValueError(f"--commit-window-ms must be in 0..1000, got {self.commit_window_ms}")
        if self.grace_seconds < 0:
            raise ValueError(f"--grace-seconds must be >= 0, got {self.grace_seconds}")


def env_name(field_name: str) -> str:
    """The environment variable of a field: data_dir -> DELTAWATCH_DATA_DIR."""
    return "DELTAWATCH_" + field_name.upper()


def field_names() -> list[str]:
    return [f.name for f in fields(ServeConfig)]
