"""Alerts posted to Alertmanager's API (``POST /api/v2/alerts``), as Prometheus posts them.

``deltawatch serve --alertmanager-url URL`` (repeatable): every alert the sidecar fires goes to
every Alertmanager given, as a v2 ``postableAlert``:

* labels: ``alertname`` (the rule, e.g. ``SubspaceDrift``), ``run``, ``severity``,
  ``service="deltawatch"``, and for a per-matrix alert ``matrix``, ``layer`` (when the name has a
  block index) and ``module``;
* annotations: ``summary`` (the alert's own line), ``description`` (the rule's), ``value``;
* ``startsAt``; ``generatorURL`` = ``<external url>/runs/<run>``, the run's page;
* ``endsAt``: while firing, now + 4 · ``resend_every_seconds`` (Prometheus's rule: an alert the
  sender stops re-posting resolves by itself); on resolve, the moment it resolved.

The check rules are posted per matrix (Alertmanager's ``group_by`` folds them, e.g. by
``alertname, run``) while the run's roll-up fires; RunStalled is one alert per run. Firing alerts
are posted again every ``resend_every_seconds`` (60 s by default, Prometheus's ``resend-delay``), so
an Alertmanager that restarted without its storage has them back within one interval, and a
restarted sidecar posts the alerts it restored at start. Each Alertmanager has its own `Poster`
(retries with backoff; per (run, rule) group one body pending, a newer one merged into it by
fingerprint), so a slow or absent Alertmanager never blocks ingest, the other Alertmanagers or the
webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import urllib.parse
from collections.abc import Callable
from typing import TypedDict

from deltawatch.client.naming import parse_name

from .config import AlertmanagerConfig
from .delivery import Poster
from .rules import DESCRIPTIONS
from .state import AlertItem, fingerprint, rfc3339

API_PATH = "/api/v2/alerts"


class AlertmanagerAlert(TypedDict):
    """Alertmanager's ``postableAlert`` (its OpenAPI v2 schema)."""

    labels: dict[str, str]
    annotations: dict[str, str]
    startsAt: str
    endsAt: str
    generatorURL: str


def alert_labels(item: AlertItem) -> dict[str, str]:
    """alertname, run, severity, service; matrix, layer, module for a per-matrix alert."""
    labels = {
        "alertname": item["rule"],
        "run": item["run"],
        "severity": item["severity"],
        "service": "deltawatch",
    }
    if item["matrix"] is not None:
        layer, module = parse_name(item["matrix"])
        labels["matrix"] = item["matrix"]
        if layer is not None:
            labels["layer"] = str(layer)
        labels["module"] = module
    return labels


def run_page_url(external_url: str, run: str) -> str:
    """``<external url>/runs/<run>`` (the run's page on the sidecar), the run name URL-quoted."""
    return f"{external_url.rstrip('/')}/runs/{urllib.parse.quote(run, safe='')}"


def postable_alert(item: AlertItem, *, external_url: str, ends_at: str) -> AlertmanagerAlert:
    """One engine alert as Alertmanager takes it; ``ends_at`` as the caller decides (see above)."""
    annotations = {"summary": item["summary"], "description": DESCRIPTIONS[item["rule"]]}
    if item["value"] is not None:
        annotations["value"] = f"{item['value']:.6g}"
    return {
        "labels": alert_labels(item),
        "annotations": annotations,
        "startsAt": item["started_at"] or rfc3339(time.time()),
        "endsAt": ends_at,
        "generatorURL": run_page_url(external_url, item["run"]),
    }


def _merge_by_fingerprint(
    pending: list[AlertmanagerAlert], newer: list[AlertmanagerAlert]
) -> list[AlertmanagerAlert]:
    """A body not yet delivered merged with a newer one: per alert (label fingerprint), the newer."""
    out = {fingerprint(a["labels"]): a for a in pending}
    out.update((fingerprint(a["labels"]), a) for a in newer)
    return list(out.values())


class AlertmanagerSender:
    """Keeps Alertmanager's view of the sidecar's alerts current (see the module docstring).

    ``submit(run, rule, items)`` (thread-safe, returns at once) says which alerts of the (run, rule)
    group exist now: firing items are kept and re-posted every ``resend_every_seconds``; one that
    was firing and is not any more is posted once as resolved, with the engine's ``ended_at``
    when ``items`` lists it as resolved, else now.
    """

    def __init__(
        self,
        urls: list[str],
        config: AlertmanagerConfig,
        *,
        external_url: Callable[[], str],
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._external_url = external_url
        self._clock = clock
        self.posters = [
            Poster(
                url.rstrip("/") + API_PATH,
                config,
                headers=config.headers,
                merge=_merge_by_fingerprint,
                rng=rng,
                name="Alertmanager",
            )
            for url in urls
        ]
        self._firing: dict[str, dict[str, AlertItem]] = {}  # group -> fingerprint -> item
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for p in self.posters:
            await p.start()
        self._resender = asyncio.ensure_future(self._resend_forever())

    def submit(self, run: str, rule: str, items: list[AlertItem]) -> None:
        if self._loop is None:
            raise RuntimeError("AlertmanagerSender.submit before start()")
        self._loop.call_soon_threadsafe(self._update, run, rule, items)

    def _update(self, run: str, rule: str, items: list[AlertItem]) -> None:
        """On the loop: the group's new alert set, posted to every Alertmanager."""
        group = f"{run}\xff{rule}"
        now = rfc3339(self._clock())
        before = self._firing.pop(group, {})
        firing = {fingerprint(alert_labels(i)): i for i in items if i["state"] == "firing"}
        resolved = {fingerprint(alert_labels(i)): i for i in items if i["state"] == "resolved"}
        body = [self._postable(i) for i in firing.values()]
        for fp, old in before.items():  # was firing, is not now: resolved when the engine says
            if fp not in firing:
                item = resolved.get(fp, old)
                ended = item["ended_at"] if fp in resolved else None
                body.append(self._postable(item, ends_at=ended or now))
        if firing:
            self._firing[group] = firing
        self._put(group, body)

    def _postable(self, item: AlertItem, ends_at: str | None = None) -> AlertmanagerAlert:
        if ends_at is None:  # firing: valid for four resend intervals
            ends_at = rfc3339(self._clock() + 4 * self.config.resend_every_seconds)
        return postable_alert(item, external_url=self._external_url(), ends_at=ends_at)

    def _put(self, group: str, body: list[AlertmanagerAlert]) -> None:
        if body:
            for p in self.posters:
                p.put(group, body)

    async def _resend_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.resend_every_seconds)
            for group, firing in self._firing.items():
                self._put(group, [self._postable(i) for i in firing.values()])

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every queued body has been delivered or given up (tests, shutdown)."""
        await asyncio.gather(*(p.drain(timeout) for p in self.posters))

    async def close(self, timeout: float = 5.0) -> None:
        if self._resender is not None:
            self._resender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resender
        await asyncio.gather(*(p.close(timeout) for p in self.posters))
