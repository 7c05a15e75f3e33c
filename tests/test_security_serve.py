"""The real `deltawatch serve` process with a token, TLS and mutual TLS, fed by a real Monitor.

A refused trainer (no token, a wrong token, no client certificate, a certificate from another CA)
leaves nothing behind: the sidecar's API lists no run and its ingest counter stays at zero. The
trainer with the right credentials gets its reports in, and the number that arrives (‖ΔW‖_F in
the bf16 view) equals the float64 reference computed here.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from deltawatch.client import Monitor
from deltawatch.client.credentials import channel
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import SidecarProcess
from test_security_grpc_http import TOKEN, Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def serve(tmp_path: Path, *flags: str) -> Iterator[dict]:
    """`deltawatch serve` on ephemeral loopback ports (at serve's own log level, so the log holds
    everything it says); yields {"grpc_port", "http_port", "log"}."""
    side = SidecarProcess(tmp_path / "data", "--grace-seconds=1", *flags, log_level=None)
    with side:
        yield {"grpc_port": side.grpc_port, "http_port": side.http_port, "log": side.log_path}


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(32, 24, bias=False)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([Block(), Block()])


def train_one_check(model: Tiny, mon: Monitor) -> dict[str, float]:
    """One deterministic update, one check at step 1; returns the float64 reference
    ‖ΔW‖_F = ‖f32(bf16(W_1)) − f32(bf16(W_0))‖_F per matrix."""
    anchors = {n: p.detach().to(torch.bfloat16).double() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    mon.step(1)
    return {
        n: float(torch.linalg.norm(p.detach().to(torch.bfloat16).double() - anchors[n]))
        for n, p in model.named_parameters()
    }


def monitor(port: int, run: str, **credentials) -> tuple[Tiny, Monitor]:
    torch.manual_seed(0)
    model = Tiny()
    mon = Monitor(
        model, run=run, endpoint=f"localhost:{port}", every=1, connect_timeout=5.0, **credentials
    )
    return model, mon


def http(port: int, path: str, *, ca: Path | None = None, token: str | None = None):
    """(status, body) of GET path (https when ``ca`` is given)."""
    scheme = "https" if ca else "http"
    request = urllib.request.Request(f"{scheme}://localhost:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def ingested_messages(metrics_text: str) -> float:
    values = [
        float(line.split()[-1])
        for line in metrics_text.splitlines()
        if line.startswith("deltawatch_ingest_messages_total")
    ]
    assert values, "deltawatch_ingest_messages_total is not exported"
    return sum(values)


def refused_unauthenticated(metrics_text: str) -> float:
    prefix = 'deltawatch_ingest_errors_total{reason="unauthenticated"}'
    values = [
        float(line.split()[-1]) for line in metrics_text.splitlines() if line.startswith(prefix)
    ]
    assert values, metrics_text
    return values[0]


def check_arrived(port: int, run: str, reference: dict[str, float], **http_kw) -> None:
    status, body = http(port, f"/api/v1/runs/{run}", **http_kw)
    assert status == 200, body
    detail = json.loads(body)
    assert detail["last_step"] == 1
    got = {m["matrix"]: m["frobenius_norm"] for m in detail["matrices"]}
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name


def token_and_tls_flags(directory: Path, pki: Pki) -> tuple[str, ...]:
    """`deltawatch serve` flags for the bearer token TOKEN (written to `directory`/token) and
    TLS with the server certificate of `pki`."""
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    return (
        f"--token-file={token_file}",
        f"--tls-cert={pki.server_cert}",
        f"--tls-key={pki.server_key}",
    )


def test_serve_with_token_and_tls(tmp_path: Path, pki: Pki) -> None:
    flags = token_and_tls_flags(tmp_path, pki)
    with serve(tmp_path, *flags) as ports:
        grpc_port, http_port = ports["grpc_port"], ports["http_port"]
        tls = {"ca": str(pki.ca)}
        # the standard health service answers without a token
        with channel(f"localhost:{grpc_port}", tls=tls) as ch:
            response = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="deltawatch.v1.Ingest"), timeout=10
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING
            # server reflection describes the API: it needs the token
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as err:
                list(stub.ServerReflectionInfo(iter([request]), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with channel(f"localhost:{grpc_port}", tls=tls, token=TOKEN) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            (answer,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
            services = {s.name for s in answer.list_services_response.service}
            assert "deltawatch.v1.Ingest" in services
        # trainers without the token, or with a wrong one, are refused and leave nothing
        for run, credentials in [
            ("no-token", {}),
            ("wrong-token", {"token": TOKEN + "x"}),
        ]:
            model, mon = monitor(grpc_port, run, tls=tls, **credentials)
            train_one_check(model, mon)
            assert mon.close(timeout=1) is False
            stats = mon.stats()
            assert stats["acknowledged"] == 0 and stats["errors"].get("unauthenticated", 0) >= 1
        # HTTP: probes and /metrics open, the API closed without the token
        for path in ("/healthz", "/readyz", "/metrics"):
            assert http(http_port, path, ca=pki.ca)[0] == 200, path
        for path in ("/api/v1/runs", "/api/v1/alerts", "/api/v1/runs/no-token"):
            status, body = http(http_port, path, ca=pki.ca)
            assert status == 401 and json.loads(body)["error"] == "unauthenticated", path
            assert http(http_port, path, ca=pki.ca, token="nope")[0] == 401
        status, body = http(http_port, "/api/v1/runs", ca=pki.ca, token=TOKEN)
        assert status == 200 and json.loads(body)["runs"] == []
        metrics = http(http_port, "/metrics", ca=pki.ca)[1]
        assert ingested_messages(metrics) == 0
        assert refused_unauthenticated(metrics) >= 2  # operators see the refused trainers
        # the right token over TLS: the reports arrive, with the right numbers
        model, mon = monitor(grpc_port, "good", tls=tls, token_file=str(tmp_path / "token"))
        reference = train_one_check(model, mon)
        assert mon.close(timeout=60) is True, mon.stats()
        check_arrived(http_port, "good", reference, ca=pki.ca, token=TOKEN)
        status, body = http(http_port, "/api/v1/runs", ca=pki.ca, token=TOKEN)
        assert [r["run"] for r in json.loads(body)["runs"]] == ["good"]
        assert ingested_messages(http(http_port, "/metrics", ca=pki.ca)[1]) > 0
    assert TOKEN not in ports["log"].read_text()  # the token is never logged


def test_serve_with_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    flags = (
        f"--tls-cert={pki.server_cert}",
        f"--tls-key={pki.server_key}",
        f"--tls-client-ca={pki.ca}",
        "--metrics-require-token",  # without --token-file: no effect, /metrics stays open
    )
    with serve(tmp_path, *flags) as ports:
        grpc_port, http_port = ports["grpc_port"], ports["http_port"]
        for run, tls in [
            ("no-client-cert", {"ca": str(pki.ca)}),
            (
                "foreign-cert",
                {"ca": str(pki.ca), "cert": str(pki.stranger_cert), "key": str(pki.stranger_key)},
            ),
        ]:
            model, mon = monitor(grpc_port, run, tls=tls)
            train_one_check(model, mon)
            assert mon.close(timeout=1) is False
            assert mon.stats()["acknowledged"] == 0
        status, body = http(http_port, "/api/v1/runs", ca=pki.ca)
        assert status == 200 and json.loads(body)["runs"] == []
        assert ingested_messages(http(http_port, "/metrics", ca=pki.ca)[1]) == 0
        trainer = {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)}
        model, mon = monitor(grpc_port, "mtls", tls=trainer)
        reference = train_one_check(model, mon)
        assert mon.close(timeout=60) is True, mon.stats()
        check_arrived(http_port, "mtls", reference, ca=pki.ca)


def test_serve_refuses_incomplete_tls_and_empty_token(tmp_path: Path, pki: Pki) -> None:
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    for flags, words in [
        ((f"--tls-cert={pki.server_cert}",), "--tls-cert and --tls-key go together"),
        ((f"--tls-client-ca={pki.ca}",), "needs --tls-cert"),
        ((f"--token-file={empty}", f"--data-dir={tmp_path / 'd'}"), "empty"),
    ]:
        command = SidecarProcess(tmp_path / "data", *flags).command(tmp_path / "ready.json")
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0
        assert words in result.stderr, result.stderr
