"""deltawatch client: the hook a trainer imports.

    from deltawatch.client import Monitor

Depends on torch, numpy, grpcio and protobuf only; never imports the sidecar, aiohttp,
prometheus_client or transformers. `Monitor` and `MonitorConfig` are imported on first use, so
`import deltawatch.client` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import MonitorConfig
    from .monitor import Monitor

__all__ = ["Monitor", "MonitorConfig"]


def __getattr__(name: str) -> Any:
    if name == "Monitor":
        from .monitor import Monitor

        return Monitor
    if name == "MonitorConfig":
        from .config import MonitorConfig

        return MonitorConfig
    raise AttributeError(f"module 'deltawatch.client' has no attribute {name!r}")
