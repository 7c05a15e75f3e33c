"""Token, TLS and mutual TLS on real grpc.aio and aiohttp servers on ephemeral loopback ports.

Certificates are generated here (a throwaway CA, a server certificate for localhost/127.0.0.1,
client certificates from that CA and from a stranger's CA). The servers carry a recording service:
"nothing is written" is checked by looking at what the service recorded after a rejected call.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from deltawatch.client.credentials import channel, read_token, split_host_port
from deltawatch.sidecar import auth
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

TOKEN = "s3cret-token-0123456789abcdef"


# --- a throwaway PKI ----------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _issue(
    subject: str,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    issuer_name: x509.Name | None,
    *,
    ca: bool = False,
    server: bool = False,
    dns_names: tuple[str, ...] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name or _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    *(x509.DNSName(name) for name in dns_names),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from a CA the server does not trust
    stranger_key: Path


def make_pki(directory: Path, dns_names: tuple[str, ...] = ()) -> Pki:
    """A CA, a server certificate (localhost, 127.0.0.1, ::1 and ``dns_names``), a client
    certificate signed by the CA and one signed by an unrelated CA, as PEM files in
    ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _issue("deltawatch test CA", None, None, ca=True)
    stranger_ca_key, stranger_ca = _issue("someone else's CA", None, None, ca=True)
    files = {}
    for stem, (key, cert) in {
        "ca": (ca_key, ca_cert),
        "server": _issue("localhost", ca_key, ca_cert.subject, server=True, dns_names=dns_names),
        "client": _issue("trainer", ca_key, ca_cert.subject),
        "stranger": _issue("intruder", stranger_ca_key, stranger_ca.subject),
    }.items():
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(directory / f"{stem}.key", key)
        files[stem] = (directory / f"{stem}.crt", directory / f"{stem}.key")
    return Pki(
        ca=files["ca"][0],
        server_cert=files["server"][0],
        server_key=files["server"][1],
        client_cert=files["client"][0],
        client_key=files["client"][1],
        stranger_cert=files["stranger"][0],
        stranger_key=files["stranger"][1],
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n\n")  # whitespace around the token is stripped
    return path


@dataclass(frozen=True)
class Config:
    """The ServeConfig fields auth.py reads."""

    grpc_address: str = "127.0.0.1:0"
    http_address: str = "127.0.0.1:0"
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    metrics_require_token: bool = False


# --- a real grpc.aio server with a recording service and the standard health service -----------


class Recorder:
    """A generic service of the four RPC kinds; every request that reaches it is recorded."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.received.append(request)
        return b"ack:" + request

    async def stream(self, request_iterator, context: grpc.aio.ServicerContext):
        async for request in request_iterator:
            self.received.append(request)
            yield b"ack:" + request

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "test.Recorder",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "Stream": grpc.stream_stream_rpc_method_handler(self.stream),
            },
        )


def _in_thread_server(
    config: Config, interceptors: list | None = None, tls_recheck_seconds: float = 1.0
):
    """Start a grpc.aio server (auth from ``config``) on its own loop thread; yields
    (target, recorder) and stops it afterwards."""
    import threading

    recorder = Recorder()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}

    async def main() -> None:
        if interceptors is None:
            server = grpc.aio.server(interceptors=auth.grpc_interceptors(config))
        else:
            server = grpc.aio.server(interceptors=interceptors)
        server.add_generic_rpc_handlers((recorder.handler(),))
        health_servicer = health.aio.HealthServicer()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        creds = auth.grpc_server_credentials(config, recheck_seconds=tls_recheck_seconds)
        if creds is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        box["server"], box["port"] = server, port
        box["stop"] = asyncio.Event()
        started.set()
        await box["stop"].wait()
        await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(20)
    return (
        f"127.0.0.1:{box['port']}",
        recorder,
        lambda: (
            loop.call_soon_threadsafe(box["stop"].set),
            thread.join(20),
        ),
    )


def _unary(ch: grpc.Channel):
    return ch.unary_unary("/test.Recorder/Unary")


def _stream(ch: grpc.Channel):
    return ch.stream_stream("/test.Recorder/Stream")


def _health(ch: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(ch)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


# --- tests: token handling ----------------------------------------------------------------------


def test_token_file_is_stripped_and_compared_whole(token_file: Path, tmp_path: Path) -> None:
    assert read_token(token_file) == TOKEN
    assert auth.load_token(None) is None
    assert auth.token_matches(TOKEN, f"Bearer {TOKEN}")
    assert auth.token_matches(TOKEN, f"bearer {TOKEN}")
    assert not auth.token_matches(TOKEN, None)
    assert not auth.token_matches(TOKEN, TOKEN)  # the scheme is required
    assert not auth.token_matches(TOKEN, f"Bearer {TOKEN[:-1]}")
    assert not auth.token_matches(TOKEN, f"Bearer {TOKEN}x")
    assert not auth.token_matches(TOKEN, f"Basic {TOKEN}")
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ValueError, match="empty"):
        read_token(empty)
    with pytest.raises(ValueError, match="does not exist"):
        read_token(tmp_path / "absent")
    spaced = tmp_path / "spaced"
    spaced.write_text("two words")
    with pytest.raises(ValueError, match="printable ASCII"):
        read_token(spaced)


def test_split_host_port_and_exposure_warnings(tmp_path: Path, pki: Pki, caplog) -> None:
    assert split_host_port("127.0.0.1:50051") == ("127.0.0.1", "50051")
    assert split_host_port("[::1]:9400") == ("::1", "9400")
    assert split_host_port("dns:///sidecar.ns.svc:50051") == ("sidecar.ns.svc", "50051")
    token = tmp_path / "t"
    token.write_text(TOKEN)
    # loopback: no warning whatever is configured
    assert auth.warn_if_exposed(Config(grpc_address="127.0.0.1:1", http_address="[::1]:2")) == []
    assert auth.warn_if_exposed(Config(grpc_address="localhost:1", http_address="")) == []
    # every interface, nothing configured: one warning per listener, naming what is missing
    with caplog.at_level(logging.WARNING, logger="deltawatch.sidecar.auth"):
        messages = auth.warn_if_exposed(
            Config(grpc_address="0.0.0.0:50051", http_address="[::]:9400")
        )
    assert len(messages) == 2
    assert "gRPC listener 0.0.0.0:50051" in messages[0] and "--token-file" in messages[0]
    assert "--tls-cert" in messages[0] and "HTTP listener [::]:9400" in messages[1]
    assert [r.getMessage() for r in caplog.records] == messages
    # token but no TLS: still warned (the token travels in clear text)
    messages = auth.warn_if_exposed(
        Config(grpc_address="0.0.0.0:1", http_address="0.0.0.0:2", token_file=token)
    )
    assert len(messages) == 2 and all(
        "--tls-cert" in m and "--token-file" not in m for m in messages
    )
    # TLS but no token: warned about the token
    tls = {"tls_cert": pki.server_cert, "tls_key": pki.server_key}
    messages = auth.warn_if_exposed(Config(grpc_address="10.0.0.5:1", http_address="", **tls))
    assert len(messages) == 1 and "--token-file" in messages[0] and "--tls-cert" not in messages[0]
    # mTLS authenticates gRPC clients, so only HTTP lacks a credential
    messages = auth.warn_if_exposed(
        Config(grpc_address="0.0.0.0:1", http_address="0.0.0.0:2", tls_client_ca=pki.ca, **tls)
    )
    assert len(messages) == 1 and "HTTP" in messages[0]
    # TLS and a token: silent
    both = Config(grpc_address="0.0.0.0:1", http_address="0.0.0.0:2", token_file=token, **tls)
    assert auth.warn_if_exposed(both) == []


def test_client_warns_before_sending_a_token_in_clear_text(caplog, pki: Pki) -> None:
    """Channels are lazy: nothing is sent here, only the warning is logged."""
    with caplog.at_level(logging.WARNING, logger="deltawatch.client.credentials"):
        channel("127.0.0.1:50051", token=TOKEN).close()
        channel("localhost:50051", token=TOKEN).close()
        channel("10.0.0.7:50051", tls={"ca": pki.ca}, token=TOKEN).close()
        assert caplog.records == []
        channel("10.0.0.7:50051", token=TOKEN).close()
    (record,) = caplog.records
    assert "WITHOUT TLS" in record.getMessage() and TOKEN not in record.getMessage()


def test_incomplete_tls_flags_are_refused_with_the_fix(pki: Pki) -> None:
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        auth.grpc_server_credentials(Config(tls_cert=pki.server_cert))
    with pytest.raises(ValueError, match="needs the server's own --tls-cert"):
        auth.http_ssl_context(Config(tls_client_ca=pki.ca))
    with pytest.raises(ValueError, match="does not exist"):
        auth.grpc_server_credentials(
            Config(tls_cert=pki.server_cert, tls_key=pki.server_key.with_name("nope"))
        )
    with pytest.raises(ValueError, match="'cert' and 'key' together"):
        channel("127.0.0.1:1", tls={"ca": pki.ca, "cert": pki.client_cert})
    with pytest.raises(ValueError, match="unknown keys"):
        channel("127.0.0.1:1", tls={"ca": pki.ca, "certificate": pki.client_cert})
    with pytest.raises(ValueError, match="not both"):
        channel("127.0.0.1:1", token=TOKEN, token_file="x")
    assert auth.grpc_interceptors(Config()) == [] and auth.http_middlewares(Config()) == []
    assert (
        auth.grpc_server_credentials(Config()) is None and auth.http_ssl_context(Config()) is None
    )


# --- tests: gRPC --------------------------------------------------------------------------------


def test_grpc_token_required_on_every_call_but_health(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    target, recorder, stop = _in_thread_server(Config(token_file=token))
    try:
        with grpc.insecure_channel(target) as ch:
            # the health service answers without a token
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
            # missing token: UNAUTHENTICATED with a message, for unary and streaming calls
            with pytest.raises(grpc.RpcError) as err:
                _unary(ch)(b"r1", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "missing bearer token" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                list(_stream(ch)(iter([b"s1", b"s2"]), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # wrong token, and the right token under the wrong scheme
            for header in (f"Bearer {TOKEN}-wrong", f"Basic {TOKEN}", TOKEN):
                with pytest.raises(grpc.RpcError) as err:
                    _unary(ch)(b"r2", metadata=(("authorization", header),), timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert TOKEN not in err.value.details()
        with channel(target, token=f"{TOKEN}-wrong") as ch:
            with pytest.raises(grpc.RpcError) as err:
                list(_stream(ch)(iter([b"s3"]), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "invalid bearer token" in err.value.details()
        # nothing reached the service
        assert recorder.received == []
        # the right token (through the client's plaintext-loopback interceptor) passes
        with channel(target, token_file=token) as ch:
            assert _unary(ch)(b"ok1", timeout=10) == b"ack:ok1"
            assert list(_stream(ch)(iter([b"ok2", b"ok3"]), timeout=10)) == [b"ack:ok2", b"ack:ok3"]
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        assert recorder.received == [b"ok1", b"ok2", b"ok3"]
    finally:
        stop()


def test_grpc_tls_with_the_ca_and_a_token(pki: Pki, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    config = Config(token_file=token, tls_cert=pki.server_cert, tls_key=pki.server_key)
    target, recorder, stop = _in_thread_server(config)
    port = target.rsplit(":", 1)[1]
    try:
        # TLS with the CA; the token rides as call credentials
        with channel(target, tls={"ca": pki.ca}, token=TOKEN) as ch:
            assert _unary(ch)(b"tls1", timeout=10) == b"ack:tls1"
        with channel(f"localhost:{port}", tls={"ca": pki.ca}, token_file=token) as ch:
            assert list(_stream(ch)(iter([b"tls2"]), timeout=10)) == [b"ack:tls2"]
        # TLS without the token
        with channel(target, tls={"ca": pki.ca}) as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                _unary(ch)(b"no-token", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # a plaintext client cannot talk to a TLS port
        with channel(target, token=TOKEN) as ch:
            with pytest.raises(grpc.RpcError) as err:
                _unary(ch)(b"plain", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # a client that does not trust the server's CA refuses it
        with channel(target, tls={"ca": pki.stranger_cert}, token=TOKEN) as ch:
            with pytest.raises(grpc.RpcError) as err:
                _unary(ch)(b"wrong-ca", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert recorder.received == [b"tls1", b"tls2"]
    finally:
        stop()


def test_grpc_mutual_tls_requires_a_client_certificate_from_the_ca(pki: Pki) -> None:
    config = Config(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    target, recorder, stop = _in_thread_server(config)
    try:
        with channel(target, tls={"ca": pki.ca}) as ch:  # no client certificate
            with pytest.raises(grpc.RpcError) as err:
                _unary(ch)(b"anonymous", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        stranger = {"ca": pki.ca, "cert": pki.stranger_cert, "key": pki.stranger_key}
        with channel(target, tls=stranger) as ch:  # a certificate from another CA
            with pytest.raises(grpc.RpcError) as err:
                _unary(ch)(b"stranger", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert recorder.received == []
        trainer = {"ca": pki.ca, "cert": pki.client_cert, "key": pki.client_key}
        with channel(target, tls=trainer) as ch:
            assert _unary(ch)(b"mtls", timeout=10) == b"ack:mtls"
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        assert recorder.received == [b"mtls"]
    finally:
        stop()


def test_rotated_token_file_takes_effect_without_restart(tmp_path: Path, caplog) -> None:
    """A Kubernetes Secret update swaps the file behind a symlink: the new token is accepted,
    the old one refused; an empty new version keeps the previous token."""
    versions = tmp_path / "v1"
    versions.mkdir()
    (versions / "token").write_text("old-token\n")
    link = tmp_path / "token"
    link.symlink_to(versions / "token")
    token = auth.TokenFile(link, recheck_seconds=0.0)
    target, recorder, stop = _in_thread_server(Config(), [auth.BearerTokenInterceptor(token)])
    try:
        with channel(target, token="old-token") as ch:
            assert _unary(ch)(b"before", timeout=10) == b"ack:before"
        new = tmp_path / "v2"
        new.mkdir()
        (new / "token").write_text("new-token")
        swap = tmp_path / "token.tmp"
        swap.symlink_to(new / "token")
        swap.replace(link)  # atomic, like kubelet's ..data swap
        with channel(target, token="old-token") as ch:
            with pytest.raises(grpc.RpcError) as err:
                _unary(ch)(b"stale", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with channel(target, token="new-token") as ch:
            assert _unary(ch)(b"after", timeout=10) == b"ack:after"
        (new / "token").write_text("")  # a broken update: the previous token stays in effect
        with (
            caplog.at_level(logging.WARNING, logger="deltawatch.sidecar.auth"),
            channel(target, token="new-token") as ch,
        ):
            assert _unary(ch)(b"kept", timeout=10) == b"ack:kept"
        assert any("keeping the previous token" in r.getMessage() for r in caplog.records)
        assert recorder.received == [b"before", b"after", b"kept"]
    finally:
        stop()


# --- tests: HTTP --------------------------------------------------------------------------------


def _http_app(config: Config, written: list) -> web.Application:
    async def write(request: web.Request) -> web.Response:
        written.append(await request.text())
        return web.json_response({"written": True})

    async def runs(request: web.Request) -> web.Response:
        return web.json_response({"runs": [{"run": name} for name in written]})

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="deltawatch_ingest_messages_total 0\n")

    app = web.Application(middlewares=auth.http_middlewares(config))
    app.router.add_get("/healthz", ok)
    app.router.add_get("/readyz", ok)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/runs", runs)
    app.router.add_post("/api/v1/runs", write)
    return app


async def _serve_http(
    config: Config, written: list, tls_recheck_seconds: float = 1.0
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(_http_app(config, written))
    await runner.setup()
    context = auth.http_ssl_context(config, recheck_seconds=tls_recheck_seconds)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def test_http_token_on_every_endpoint_but_health_and_metrics(token_file: Path) -> None:
    async def scenario() -> None:
        written: list = []
        runner, port = await _serve_http(Config(token_file=token_file), written)
        base = f"http://127.0.0.1:{port}"
        good = {"Authorization": f"Bearer {TOKEN}"}
        try:
            async with aiohttp.ClientSession() as session:
                for path in ("/healthz", "/readyz", "/metrics"):
                    async with session.get(base + path) as response:
                        assert response.status == 200, path
                for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
                    async with session.post(base + "/api/v1/runs", data="x", headers=headers) as r:
                        assert r.status == 401
                        assert r.headers["WWW-Authenticate"].startswith("Bearer")
                        body = await r.json()
                        assert body["error"] == "unauthenticated" and body["message"]
                    async with session.get(base + "/api/v1/runs", headers=headers) as r:
                        assert r.status == 401
                    async with session.get(base + "/api/v1/unknown", headers=headers) as r:
                        assert r.status == 401  # the token is checked before routing
                assert written == []  # nothing was written by a rejected request
                async with session.get(base + "/api/v1/runs", headers=good) as r:
                    assert r.status == 200 and await r.json() == {"runs": []}
                async with session.post(base + "/api/v1/runs", data="run-a", headers=good) as r:
                    assert r.status == 200
                assert written == ["run-a"]
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_http_metrics_token_when_configured_and_tls(pki: Pki, token_file: Path) -> None:
    config = Config(
        token_file=token_file,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        metrics_require_token=True,
    )

    async def scenario() -> None:
        runner, port = await _serve_http(config, [])
        trusting = ssl.create_default_context(cafile=str(pki.ca))
        try:
            async with aiohttp.ClientSession() as session:
                base = f"https://localhost:{port}"
                async with session.get(base + "/metrics", ssl=trusting) as r:
                    assert r.status == 401
                    assert "missing bearer token" in json.loads(await r.text())["message"]
                headers = {"Authorization": f"Bearer {TOKEN}"}
                async with session.get(base + "/metrics", ssl=trusting, headers=headers) as r:
                    assert r.status == 200
                async with session.get(base + "/healthz", ssl=trusting) as r:
                    assert r.status == 200
                # a client that does not trust the CA refuses the server
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    async with session.get(base + "/healthz", ssl=ssl.create_default_context()):
                        pass
                # plaintext HTTP to the TLS port gets no answer
                with pytest.raises(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/healthz"):
                        pass
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


# --- tests: certificate renewal without restart ---------------------------------------------


class SecretVolume:
    """A directory laid out like a mounted Kubernetes Secret: tls.crt, tls.key and ca.crt are
    symlinks into ``..data``, itself a symlink to a timestamped directory that an update swaps
    atomically."""

    def __init__(self, root: Path, pki: Pki) -> None:
        self.root = root
        root.mkdir()
        self._version = 0
        self._write(pki)
        for name in ("tls.crt", "tls.key", "ca.crt"):
            (root / name).symlink_to(f"..data/{name}")

    def _write(self, pki: Pki) -> None:
        self._version += 1
        version = self.root / f"..v{self._version}"
        version.mkdir()
        for name, source in (("tls.crt", pki.server_cert), ("tls.key", pki.server_key)):
            (version / name).write_bytes(source.read_bytes())
        (version / "ca.crt").write_bytes(pki.ca.read_bytes())
        swap = self.root / "..data_tmp"
        swap.symlink_to(version.name)
        swap.replace(self.root / "..data")

    def update(self, pki: Pki) -> None:
        self._write(pki)

    def config(self, *, mtls: bool = False) -> Config:
        return Config(
            tls_cert=self.root / "tls.crt",
            tls_key=self.root / "tls.key",
            tls_client_ca=self.root / "ca.crt" if mtls else None,
        )


@pytest.fixture(scope="module")
def renewed(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second PKI: the renewed certificate comes from a new CA, so which one is served is
    visible to a client that trusts only one of them."""
    return make_pki(tmp_path_factory.mktemp("pki-renewed"))


def _trainer(pki: Pki, of: Pki) -> dict:
    """TLS settings of a client that trusts ``pki``'s CA and presents ``of``'s client cert."""
    return {"ca": str(pki.ca), "cert": str(of.client_cert), "key": str(of.client_key)}


def _handshake_ok(target: str, tls: dict) -> bool:
    with channel(target, tls=tls) as ch:
        try:
            return _unary(ch)(b"hello", timeout=10) == b"ack:hello"
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            return False


def test_grpc_renewed_certificate_and_client_ca_without_restart(
    tmp_path: Path, pki: Pki, renewed: Pki
) -> None:
    secret = SecretVolume(tmp_path / "tls", pki)
    target, recorder, stop = _in_thread_server(secret.config(mtls=True), tls_recheck_seconds=0.0)
    try:
        assert _handshake_ok(target, _trainer(pki, of=pki))
        assert not _handshake_ok(target, _trainer(renewed, of=renewed))
        secret.update(renewed)  # new server certificate and new client CA
        assert _handshake_ok(target, _trainer(renewed, of=renewed))
        assert not _handshake_ok(target, _trainer(pki, of=pki))  # old CA no longer served
        assert not _handshake_ok(target, _trainer(renewed, of=pki))  # old client CA refused
        # a broken update (key of one certificate, certificate of another) keeps the last good
        broken = Pki(**{**renewed.__dict__, "server_key": pki.server_key})
        secret.update(broken)
        assert _handshake_ok(target, _trainer(renewed, of=renewed))
        assert len(recorder.received) == 3
    finally:
        stop()


def test_http_renewed_certificate_without_restart(tmp_path: Path, pki: Pki, renewed: Pki) -> None:
    secret = SecretVolume(tmp_path / "tls", pki)

    async def fetch(port: int, host: str, ca: Path) -> int | None:
        context = ssl.create_default_context(cafile=str(ca))
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"https://{host}:{port}/healthz", ssl=context) as response,
            ):
                return response.status
        except aiohttp.ClientConnectorCertificateError:
            return None

    async def scenario() -> None:
        runner, port = await _serve_http(secret.config(), [], tls_recheck_seconds=0.0)
        try:
            for host in ("localhost", "127.0.0.1"):  # with and without SNI
                assert await fetch(port, host, pki.ca) == 200
                assert await fetch(port, host, renewed.ca) is None
            secret.update(renewed)
            for host in ("localhost", "127.0.0.1"):
                assert await fetch(port, host, renewed.ca) == 200
                assert await fetch(port, host, pki.ca) is None
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
