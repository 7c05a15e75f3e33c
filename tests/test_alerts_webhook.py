"""The Alertmanager webhook: exact v4 payload received by a real aiohttp server on a loopback port,
retries after a 500, no retry on a 400, and delivery never blocks the thread that ingests."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from deltawatch.sidecar.alerts.config import AlertConfig, with_overrides
from deltawatch.sidecar.alerts.engine import AlertEngine, AlertService
from deltawatch.sidecar.alerts.state import ZERO_TIME, alert_id, fingerprint, rfc3339

T0 = 1_764_169_200.0  # 2025-11-26T15:00:00Z
RUN = "qwen3-opd-1"
Q = "model.layers.3.self_attn.q_proj.weight"
K = "model.layers.3.self_attn.k_proj.weight"


class Receiver:
    """A real HTTP endpoint: records every POST body; answers the queued statuses, then 200."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.got = asyncio.Event()
        self.release: asyncio.Event | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        self.bodies.append(await request.json())
        self.got.set()
        if self.release is not None:
            await self.release.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({"status": status}, status=status)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.release is not None:
            self.release.set()
        assert self.runner is not None
        await self.runner.cleanup()


def drifted(alignment: float) -> dict[str, Any]:
    """A locked matrix's keys whose subspace alignment is `alignment` (other keys healthy)."""
    return {
        "locked": True,
        "lock_step": 40,
        "subspace_alignment": alignment,
        "channel_energy_ratio": 0.9,
        "stable_rank": 3.0,
        "bf16_visible_ratio": 0.1,
    }


def fast_config(**webhook: Any) -> AlertConfig:
    hook = {
        "initial_backoff_seconds": 0.01,
        "max_backoff_seconds": 0.05,
        "external_url": "http://127.0.0.1:9400",
        **webhook,
    }
    return with_overrides(
        AlertConfig(), subspace_drift={"fire_after": 2, "resolve_after": 2}, webhook=hook
    )


async def _fire_drift(receiver: Receiver, config: AlertConfig) -> tuple[AlertEngine, AlertService]:
    clock = [T0]
    engine = AlertEngine(config, clock=lambda: clock[0], run_matrices=lambda run: 4)
    service = AlertService(engine, webhook_url=receiver.url)
    await service.start()
    for step in (50, 60):
        clock[0] = T0 + step
        for m in (Q, K):
            # the engine's listener runs on the ingest worker thread, not on the loop
            await asyncio.to_thread(engine.observe, RUN, m, step, drifted(0.31))
    return engine, service


def test_webhook_receives_the_exact_alertmanager_v4_payload():
    async def main() -> None:
        async with Receiver() as receiver:
            engine, service = await _fire_drift(receiver, fast_config())
            await service.webhook.drain(10)
            await service.close()
            # Two matrices fired at the second check; the roll-up fired with the first of them
            # and was updated when the second joined: the newest payload for the group wins.
            body = receiver.bodies[-1]
            started = rfc3339(T0 + 60)
            labels = {
                "alertname": "SubspaceDrift",
                "run": RUN,
                "severity": "warning",
                "service": "deltawatch",
            }
            summary = f"SubspaceDrift on 2 of 4 matrices of run {RUN}: {K}, {Q}"
            annotations = {
                "summary": summary,
                "description": "After the lock, the update's top-K subspace moved away from the "
                "locked reference (Sim_K(t, ref) below the threshold on consecutive checks).",
                "matrices": f"{K}, {Q}",
                "matrix_count": "2",
                "value": "0.5",
            }
            assert body == {
                "version": "4",
                "groupKey": '{}:{alertname="SubspaceDrift", run="qwen3-opd-1"}',
                "truncatedAlerts": 0,
                "status": "firing",
                "receiver": "deltawatch",
                "groupLabels": {"alertname": "SubspaceDrift", "run": RUN},
                "commonLabels": labels,
                "commonAnnotations": annotations,
                "externalURL": "http://127.0.0.1:9400",
                "alerts": [
                    {
                        "status": "firing",
                        "labels": labels,
                        "annotations": annotations,
                        "startsAt": started,
                        "endsAt": ZERO_TIME,
                        "generatorURL": f"http://127.0.0.1:9400/api/v1/runs/{RUN}",
                        "fingerprint": fingerprint(labels),
                    }
                ],
            }
            # one group, so every POST carried the same group key
            assert {b["groupKey"] for b in receiver.bodies} == {body["groupKey"]}
            api = engine.alerts(now=T0 + 61)
            assert api[0] == {
                "id": alert_id(RUN, "SubspaceDrift", None, T0 + 60),
                "rule": "SubspaceDrift",
                "run": RUN,
                "matrix": None,
                "state": "firing",
                "severity": "warning",
                "started_at": started,
                "ended_at": None,
                "value": 0.5,
                "summary": summary,
            }
            assert [a["matrix"] for a in api[1:]] == [K, Q]

    asyncio.run(main())


def test_resolution_is_posted_with_its_end_time():
    async def main() -> None:
        async with Receiver() as receiver:
            engine, service = await _fire_drift(receiver, fast_config())
            for step in (70, 80):
                for m in (Q, K):
                    await asyncio.to_thread(engine.observe, RUN, m, step, drifted(0.95), T0 + step)
            await service.webhook.drain(10)
            await service.close()
            body = receiver.bodies[-1]
            assert body["status"] == "resolved"
            alert = body["alerts"][0]
            assert alert["status"] == "resolved"
            assert alert["startsAt"] == rfc3339(T0 + 60)
            assert alert["endsAt"] == rfc3339(T0 + 80)
            assert "matrices" not in alert["annotations"]

    asyncio.run(main())


def test_webhook_is_retried_after_a_500():
    async def main() -> None:
        async with Receiver(statuses=[500, 503, 200]) as receiver:
            engine = AlertEngine(fast_config(), clock=lambda: T0)
            service = AlertService(engine, webhook_url=receiver.url)
            await service.start()
            for step in (10, 20):
                await asyncio.to_thread(engine.observe, RUN, Q, step, drifted(0.2))
            await service.webhook.drain(10)
            await service.close()
            assert len(receiver.bodies) == 3
            assert receiver.bodies[0] == receiver.bodies[1] == receiver.bodies[2]
            assert service.webhook.delivered == 1
            assert service.webhook.failed == 0

    asyncio.run(main())


def test_a_400_is_not_retried():
    async def main() -> None:
        async with Receiver(statuses=[400]) as receiver:
            engine = AlertEngine(fast_config(), clock=lambda: T0)
            service = AlertService(engine, webhook_url=receiver.url)
            await service.start()
            for step in (10, 20):
                await asyncio.to_thread(engine.observe, RUN, Q, step, drifted(0.2))
            await service.webhook.drain(10)
            await service.close()
            assert len(receiver.bodies) == 1
            assert service.webhook.failed == 1

    asyncio.run(main())


def test_an_unreachable_receiver_is_given_up_after_max_attempts():
    async def main() -> None:
        async with Receiver() as receiver:
            url = receiver.url
        # the receiver is gone: connection refused on every attempt
        engine = AlertEngine(fast_config(max_attempts=3), clock=lambda: T0)
        service = AlertService(engine, webhook_url=url)
        await service.start()
        for step in (10, 20):
            await asyncio.to_thread(engine.observe, RUN, Q, step, drifted(0.2))
        await service.webhook.drain(10)
        await service.close()
        assert service.webhook.attempts == 3
        assert service.webhook.failed == 1
        assert service.webhook.delivered == 0

    asyncio.run(main())


def test_delivery_never_blocks_ingest():
    """The receiver holds the POST open; every observe() call returns while it is still held."""

    async def main() -> None:
        async with Receiver() as receiver:
            receiver.release = asyncio.Event()
            engine = AlertEngine(fast_config(), clock=lambda: T0)
            service = AlertService(engine, webhook_url=receiver.url)
            await service.start()
            for step in (10, 20):
                await asyncio.to_thread(engine.observe, RUN, Q, step, drifted(0.2))
            await receiver.got.wait()  # the POST is in flight and held by the receiver
            for step in range(30, 130, 10):  # ingest carries on meanwhile
                await asyncio.to_thread(engine.observe, RUN, Q, step, drifted(0.2))
            assert not receiver.release.is_set()
            assert [a["state"] for a in engine.alerts() if a["matrix"] is None] == ["firing"]
            receiver.release.set()
            await service.webhook.drain(10)
            await service.close()
            assert service.webhook.delivered >= 1

    asyncio.run(main())


def test_configured_headers_are_sent():
    async def main() -> None:
        async with Receiver() as receiver:
            config = fast_config(headers={"Authorization": "Bearer s3cret"})
            engine = AlertEngine(config, clock=lambda: T0)
            service = AlertService(engine, webhook_url=receiver.url)
            await service.start()
            for step in (10, 20):
                await asyncio.to_thread(engine.observe, RUN, Q, step, drifted(0.2))
            await service.webhook.drain(10)
            await service.close()
            assert receiver.headers[0]["Authorization"] == "Bearer s3cret"
            assert receiver.headers[0]["Content-Type"] == "application/json"

    asyncio.run(main())


def test_payload_survives_json_round_trip():
    config = fast_config()
    engine = AlertEngine(config, clock=lambda: T0)
    items = []
    engine.add_sink(lambda item, matrices: items.append((item, matrices)))
    for step in (10, 20):
        engine.observe(RUN, Q, step, drifted(0.2))
    from deltawatch.sidecar.alerts.delivery import webhook_payload

    ((item, matrices),) = items
    payload = webhook_payload(item, config, matrices)
    assert json.loads(json.dumps(payload)) == payload
    assert payload["alerts"][0]["annotations"]["matrices"] == Q
