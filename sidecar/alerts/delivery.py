"""Getting alerts out: a retrying POSTer, and the Alertmanager webhook payload (version "4").

`Poster` POSTs JSON bodies to one URL from background tasks on the event loop: one body pending per
key (a newer body for a key replaces, or is merged with, one not yet delivered), retries on
connection errors, timeouts, 429 and 5xx with full-jitter exponential backoff up to
``max_attempts``; other 4xx are logged and dropped. `WebhookSender` is a Poster keyed by the
payload's group; `alertmanager.AlertmanagerSender` uses one Poster per Alertmanager.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

from .config import AlertConfig, DeliverySettings
from .rules import DESCRIPTIONS
from .state import ZERO_TIME, AlertItem, fingerprint, list_matrices

log = logging.getLogger(__name__)


class WebhookAlert(TypedDict):
    status: str
    labels: dict[str, str]
    annotations: dict[str, str]
    startsAt: str
    endsAt: str
    generatorURL: str
    fingerprint: str


class WebhookPayload(TypedDict):
    """What Alertmanager sends to a webhook receiver (its ``webhook_config``), version "4"."""

    version: str
    groupKey: str
    truncatedAlerts: int
    status: str
    receiver: str
    groupLabels: dict[str, str]
    commonLabels: dict[str, str]
    commonAnnotations: dict[str, str]
    externalURL: str
    alerts: list[WebhookAlert]


def webhook_payload(
    item: AlertItem, config: AlertConfig, matrices: list[str] | None = None
) -> WebhookPayload:
    """The Alertmanager webhook payload, version "4", of one (run, rule) group.

    One alert (the run-level roll-up) per group; the group's matrices are listed in the
    ``matrices`` annotation (at most ``webhook.max_matrices_listed``, then "… and N more").
    """
    wh = config.webhook
    rule, run = item["rule"], item["run"]
    labels = {"alertname": rule, "run": run, "severity": item["severity"], "service": "deltawatch"}
    annotations = {"summary": item["summary"], "description": DESCRIPTIONS[rule]}
    if matrices:
        annotations["matrices"] = list_matrices(matrices, wh.max_matrices_listed)
        annotations["matrix_count"] = str(len(matrices))
    if item.get("value") is not None:
        annotations["value"] = f"{item['value']:.6g}"
    base = wh.external_url.rstrip("/")
    alert: WebhookAlert = {
        "status": item["state"],
        "labels": labels,
        "annotations": annotations,
        "startsAt": item["started_at"] or ZERO_TIME,
        "endsAt": item["ended_at"]
        if item["state"] == "resolved" and item["ended_at"]
        else ZERO_TIME,
        "generatorURL": f"{base}/api/v1/runs/{run}" if base else "",
        "fingerprint": fingerprint(labels),
    }
    group_labels = {"alertname": rule, "run": run}
    return {
        "version": "4",
        "groupKey": "{}:{" + ", ".join(f'{k}="{v}"' for k, v in group_labels.items()) + "}",
        "truncatedAlerts": 0,
        "status": item["state"],
        "receiver": wh.receiver,
        "groupLabels": group_labels,
        "commonLabels": dict(labels),
        "commonAnnotations": dict(annotations),
        "externalURL": base,
        "alerts": [alert],
    }


def backoff_seconds(
    attempt: int, config: DeliverySettings, rng: random.Random | None = None
) -> float:
    """Full-jitter exponential backoff: uniform(0, min(max, initial · 2^attempt))."""
    cap = min(config.max_backoff_seconds, config.initial_backoff_seconds * 2.0**attempt)
    return (rng or random).uniform(0.0, cap)


def newest(old: Any, new: Any) -> Any:
    """The default merge of a pending body with a newer one for the same key: the newer wins."""
    return new


class Poster:
    """POSTs JSON bodies to ``url`` from tasks on the running loop (see the module docstring).

    ``put(key, body)`` must be called on the loop; ``merge(pending, body)`` decides what a newer
    body for a key not yet delivered becomes (default: the newer one). Counters: ``delivered``,
    ``failed`` (given up or refused), ``attempts``.
    """

    def __init__(
        self,
        url: str,
        settings: DeliverySettings,
        *,
        headers: Mapping[str, str] | None = None,
        merge: Callable[[Any, Any], Any] = newest,
        rng: random.Random | None = None,
        name: str = "alert webhook",
    ) -> None:
        self.url = url
        self.settings = settings
        self.name = name
        self._headers = dict(headers or {})
        self._merge = merge
        self._rng = rng or random.Random()
        self._session: Any = None
        self._pending: dict[str, Any] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.delivered = 0
        self.failed = 0
        self.attempts = 0

    async def start(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        self._session = aiohttp.ClientSession(timeout=timeout)

    def put(self, key: str, body: Any) -> None:
        """Queue ``body`` under ``key`` (on the loop; returns at once)."""
        pending = self._pending.get(key)
        self._pending[key] = body if pending is None else self._merge(pending, body)
        task = self._tasks.get(key)
        if task is None or task.done():
            self._tasks[key] = asyncio.ensure_future(self._deliver(key))

    async def _deliver(self, key: str) -> None:
        s = self.settings
        while key in self._pending:
            body = self._pending.pop(key)
            for attempt in range(s.max_attempts):
                self.attempts += 1
                retry, reason = await self._post(body)
                if not retry:
                    break
                if key in self._pending:  # a newer body for the key: merge this one into it
                    self._pending[key] = self._merge(body, self._pending[key])
                    break
                if attempt + 1 == s.max_attempts:
                    self.failed += 1
                    log.warning(
                        "%s %s: gave up on %s after %d attempts (%s)",
                        self.name,
                        self.url,
                        key,
                        s.max_attempts,
                        reason,
                    )
                    break
                await asyncio.sleep(backoff_seconds(attempt, s, self._rng))

    async def _post(self, body: Any) -> tuple[bool, str]:
        """One POST; returns (retry?, reason)."""
        try:
            async with self._session.post(self.url, json=body, headers=self._headers) as resp:
                text = await resp.read()
                if resp.status < 300:
                    self.delivered += 1
                    return False, "ok"
                if resp.status == 429 or resp.status >= 500:
                    return True, f"HTTP {resp.status}"
                self.failed += 1
                log.warning(
                    "%s %s answered HTTP %d (%s); not retried",
                    self.name,
                    self.url,
                    resp.status,
                    text[:200].decode(errors="replace"),
                )
                return False, f"HTTP {resp.status}"
        except (OSError, asyncio.TimeoutError) as exc:
            return True, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # aiohttp.ClientError and friends
            return True, f"{type(exc).__name__}: {exc}"

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every queued body has been delivered or given up."""

        async def _wait() -> None:
            while any(not t.done() for t in self._tasks.values()):
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)

        await asyncio.wait_for(_wait(), timeout)

    async def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await self.drain(timeout)
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()


class WebhookSender(Poster):
    """POSTs webhook payloads to ``url``; per (run, rule) group the newest payload wins (a firing
    payload still being retried is replaced by its resolution). ``submit`` is thread-safe."""

    def __init__(
        self,
        url: str,
        config: AlertConfig,
        *,
        headers: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            url,
            config.webhook,
            headers=config.webhook.headers if headers is None else headers,
            rng=rng,
        )
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await super().start()

    def submit(self, payload: WebhookPayload) -> None:
        """Queue ``payload`` for its group (thread-safe; returns at once)."""
        if self._loop is None:
            raise RuntimeError("WebhookSender.submit before start()")
        self._loop.call_soon_threadsafe(self.put, payload["groupKey"], payload)
