"""Who may talk to the sidecar: bearer token, TLS and mutual TLS for gRPC and HTTP (DESIGN §5).

The server calls five functions, each reading the frozen ServeConfig:

* ``grpc_interceptors(config)``: with ``token_file`` set, a grpc.aio interceptor that requires
  ``authorization: Bearer <token>`` on every call except the standard health service
  (``grpc.health.v1.Health``). Server reflection is *not* exempt: it describes the whole API, so
  with a token set it needs the token too (``grpcurl -H 'authorization: Bearer ...'``). A missing
  or wrong token is answered UNAUTHENTICATED with a message before the handler runs, so nothing
  is read, stored or acknowledged.
* ``grpc_server_credentials(config)``: ``--tls-cert``/``--tls-key`` give server TLS;
  ``--tls-client-ca`` adds mutual TLS (client certificates signed by that CA are required).
  None means a plaintext port.
* ``http_middlewares(config)``: the aiohttp counterpart of the interceptor: every endpoint needs
  the token except ``/healthz``, ``/readyz`` and ``/metrics`` (the latter unless
  ``metrics_require_token`` is set); a missing or wrong token gets 401 with a JSON body. A browser
  (the live page) opens a page once as ``/?token=<token>``: the right token there is answered with
  a redirect to the same address without it and the cookie ``deltawatch_token`` (HttpOnly,
  SameSite=Strict, Secure under TLS), which every later request of the page carries instead of
  the header.
* ``http_ssl_context(config)``: TLS for HTTP from the same certificate. Client certificates are
  not requested on HTTP (kubelet probes and most Prometheus setups present none): the token is the
  HTTP credential.
* ``warn_if_exposed(config)``: logs (and returns) a warning for each listener bound beyond loopback
  without TLS or without a token.

Tokens are compared in constant time (``hmac.compare_digest``). The token file and the TLS files
are re-read when they change (``TokenFile``, ``TlsFiles``): rotating a Kubernetes Secret or
renewing a certificate needs no restart.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import grpc
from aiohttp import web
from deltawatch.client.credentials import is_loopback_host, read_token, split_host_port

__all__ = [
    "HEALTH_SERVICE",
    "HTTP_PUBLIC_PATHS",
    "TOKEN_COOKIE",
    "AuthConfig",
    "TlsFiles",
    "TokenFile",
    "BearerTokenInterceptor",
    "bearer_token_middleware",
    "grpc_interceptors",
    "grpc_server_credentials",
    "http_middlewares",
    "http_ssl_context",
    "load_token",
    "token_matches",
    "warn_if_exposed",
]

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
HTTP_PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
TOKEN_COOKIE = "deltawatch_token"  # the live page's credential once ?token= was given


class AuthConfig(Protocol):
    """The ServeConfig fields this module reads (``metrics_require_token`` is optional)."""

    grpc_address: str
    http_address: str
    token_file: str | os.PathLike[str] | None
    tls_cert: str | os.PathLike[str] | None
    tls_key: str | os.PathLike[str] | None
    tls_client_ca: str | os.PathLike[str] | None


def load_token(path: str | os.PathLike[str] | None) -> str | None:
    """The token in ``path`` with surrounding whitespace stripped; None when no path is given.

    Raises ValueError (with the fix) for a missing or empty file.
    """
    if path is None or os.fspath(path) == "":
        return None
    return read_token(path)


class TokenFile:
    """The token in ``path``, re-read when the file changes, so a rotated token (a Kubernetes
    Secret update swaps the file) takes effect without a restart. The file is stat'ed at most
    every ``recheck_seconds``; an unreadable or empty new version is logged and the previous
    token stays in effect. Streams already open are not affected by a rotation.
    """

    def __init__(self, path: str | os.PathLike[str], *, recheck_seconds: float = 1.0) -> None:
        self.path = os.fspath(path)
        self.recheck_seconds = recheck_seconds
        self._token = read_token(self.path)  # raises ValueError at start-up
        self._signature = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows the Secret's symlinks
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> str:
        """The token in effect now."""
        now = time.monotonic()
        if now - self._checked < self.recheck_seconds:
            return self._token
        self._checked = now
        signature = self._stat()
        if signature is None or signature == self._signature:
            return self._token
        try:
            token = read_token(self.path)
        except (OSError, ValueError) as exc:
            self._signature = signature  # warn once per broken version, not on every call
            log.warning(
                "token file changed but cannot be used (%s); keeping the previous token", exc
            )
            return self._token
        self._token, self._signature = token, signature
        log.info("token file %s changed: the new token is in effect", self.path)
        return self._token


def _expected(token: str | TokenFile) -> str:
    return token if isinstance(token, str) else token.current()


def token_matches(expected: str, authorization: str | None) -> bool:
    """Whether an ``authorization`` header value is ``Bearer <expected>``.

    The scheme is case-insensitive (RFC 6750); the token is compared with
    ``hmac.compare_digest`` so the time taken does not reveal how much of it matched.
    """
    if not authorization:
        return False
    scheme, _, presented = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode("utf-8"), expected.encode("utf-8"))


def _rejection(authorization: str | None) -> str:
    """The message for a rejected credential (never echoes what was sent)."""
    if not authorization:
        return (
            "missing bearer token: this deltawatch sidecar runs with --token-file; send "
            "'authorization: Bearer <token>' (Monitor(token_file=...) does)"
        )
    if not authorization.strip().lower().startswith("bearer "):
        return "the authorization header must read 'Bearer <token>'"
    return "invalid bearer token: it does not match the sidecar's --token-file"


# --- gRPC ---------------------------------------------------------------------------------------


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with UNAUTHENTICATED."""

    async def abort_unary(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort_unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_unary, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort_unary, **kwargs)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call outside ``exempt_services``."""

    def __init__(
        self,
        token: str | TokenFile,
        exempt_services: Iterable[str] = (HEALTH_SERVICE,),
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self._token = token
        self._exempt = tuple(f"/{service}/" for service in exempt_services)
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method or ""
        if method.startswith(self._exempt):
            return await continuation(handler_call_details)
        authorization = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key.lower() == "authorization":
                authorization = value if isinstance(value, str) else value.decode("latin-1")
                break
        handler = await continuation(handler_call_details)
        if token_matches(_expected(self._token), authorization):
            return handler
        if handler is None:  # unknown method: UNIMPLEMENTED reveals nothing worth protecting
            return None
        log.info("rejected gRPC call %s: %s", method, "missing" if not authorization else "bad")
        if self._on_reject is not None:
            self._on_reject("unauthenticated")
        return _abort_handler(handler, _rejection(authorization))


def grpc_interceptors(
    config: AuthConfig, *, on_reject: Callable[[str], None] | None = None
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors for ``grpc.aio.server(interceptors=...)``: the token check when
    ``config.token_file`` is set, else none. ``on_reject(reason)`` is called for each refused
    call (the server counts it in ``deltawatch_ingest_errors_total{reason="unauthenticated"}``)."""
    if not config.token_file:
        return []
    return [BearerTokenInterceptor(TokenFile(config.token_file), on_reject=on_reject)]


def _read_pem(path: str | os.PathLike[str], flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{flag}: file {os.fspath(path)!r} does not exist") from None


def _check_tls_flags(config: AuthConfig) -> bool:
    """True when TLS is configured; raises ValueError for an incomplete configuration."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("--tls-cert and --tls-key go together: give both (or neither)")
    if config.tls_client_ca and not config.tls_cert:
        raise ValueError(
            "--tls-client-ca (mutual TLS) needs the server's own --tls-cert and --tls-key"
        )
    return bool(config.tls_cert)


class TlsFiles:
    """The server's PEM files (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``), watched for
    changes so a renewed certificate (cert-manager rewriting the Secret) is served to new
    connections without a restart. ``changed()`` stats the files at most every
    ``recheck_seconds``; ``load()`` reads them and checks that key and certificate belong
    together (a half-written update is refused, the previous material stays in use).
    """

    def __init__(self, config: AuthConfig, *, recheck_seconds: float = 1.0) -> None:
        self.cert = os.fspath(config.tls_cert)
        self.key = os.fspath(config.tls_key)
        self.client_ca = os.fspath(config.tls_client_ca) if config.tls_client_ca else None
        self.recheck_seconds = recheck_seconds
        self._signature = self._stat()
        self._checked = time.monotonic()

    def _paths(self) -> list[str]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])

    def _stat(self) -> tuple:
        signature = []
        for path in self._paths():
            try:
                st = os.stat(path)
            except OSError:
                signature.append(None)
            else:
                signature.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(signature)

    def changed(self) -> bool:
        """True (once) when a file changed since the last call that returned True."""
        now = time.monotonic()
        if now - self._checked < self.recheck_seconds:
            return False
        self._checked = now
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature
        return True

    def load(self) -> tuple[bytes, bytes, bytes | None]:
        """(key, cert, client CA) as PEM bytes; ValueError/ssl.SSLError when unusable."""
        key = _read_pem(self.key, "--tls-key")
        cert = _read_pem(self.cert, "--tls-cert")
        client_ca = _read_pem(self.client_ca, "--tls-client-ca") if self.client_ca else None
        self.server_context()  # the key matches the certificate, the files parse
        return key, cert, client_ca

    def server_context(self) -> ssl.SSLContext:
        """A server ``ssl.SSLContext`` (TLS 1.2+) with the certificate and key (HTTP)."""
        for path, flag in ((self.cert, "--tls-cert"), (self.key, "--tls-key")):
            if not Path(path).is_file():
                raise ValueError(f"{flag}: file {path!r} does not exist")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        return context


def grpc_server_credentials(
    config: AuthConfig, *, recheck_seconds: float = 1.0
) -> grpc.ServerCredentials | None:
    """Server TLS from ``--tls-cert``/``--tls-key``, requiring client certificates signed by
    ``--tls-client-ca`` when it is given (mutual TLS); None for a plaintext port.

    Built with ``grpc.dynamic_ssl_server_credentials``: on each new connection gRPC asks for the
    current material, and changed files (checked at most every ``recheck_seconds``) are loaded,
    so a renewed certificate needs no restart. Connections already open keep theirs.
    """
    if not _check_tls_flags(config):
        return None
    files = TlsFiles(config, recheck_seconds=recheck_seconds)
    key, cert, client_ca = files.load()
    initial = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        if not files.changed():
            return None
        try:
            key, cert, client_ca = files.load()
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.warning("TLS files changed but cannot be used (%s); keeping the previous ones", exc)
            return None
        log.info("TLS files changed: new gRPC connections use the new certificate")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=client_ca is not None
    )


# --- HTTP ---------------------------------------------------------------------------------------


def bearer_token_middleware(
    token: str | TokenFile, public_paths: Iterable[str] = HTTP_PUBLIC_PATHS
) -> Callable[..., Any]:
    """An aiohttp middleware answering 401 (JSON) unless the request carries the token or its
    path is one of ``public_paths``."""
    public = frozenset(public_paths)

    @web.middleware
    async def require_bearer_token(request: web.Request, handler: Callable[..., Any]) -> Any:
        if request.path in public:
            return await handler(request)
        authorization = request.headers.get("Authorization")
        expected = _expected(token)
        cookie = request.cookies.get(TOKEN_COOKIE)
        if token_matches(expected, authorization) or (
            cookie is not None and hmac.compare_digest(cookie.encode(), expected.encode())
        ):
            return await handler(request)
        given = request.query.get("token")
        if (
            request.method == "GET"
            and given is not None
            and hmac.compare_digest(given.encode(), expected.encode())
        ):
            return _page_login(request, expected)
        body = {
            "error": "unauthenticated",
            "message": _rejection(authorization),
            "browser": "open the page once as /?token=<token>; a cookie carries it from then on",
        }
        return web.Response(
            status=401,
            text=json.dumps(body),
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="deltawatch"'},
        )

    return require_bearer_token


def _page_login(request: web.Request, token: str) -> web.Response:
    """A right ``?token=``: 303 to the same address without it, setting the token cookie."""
    query = {k: v for k, v in request.query.items() if k != "token"}
    location = str(request.rel_url.with_query(query))
    resp = web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})
    resp.set_cookie(
        TOKEN_COOKIE, token, httponly=True, samesite="Strict", secure=request.secure, path="/"
    )
    return resp


def http_middlewares(config: AuthConfig) -> list[Callable[..., Any]]:
    """Middlewares for ``web.Application(middlewares=...)``: the token check when
    ``config.token_file`` is set (``/metrics`` stays open unless ``metrics_require_token``)."""
    if not config.token_file:
        return []
    public = set(HTTP_PUBLIC_PATHS)
    if not getattr(config, "metrics_require_token", False):
        public.add("/metrics")
    return [bearer_token_middleware(TokenFile(config.token_file), public)]


def http_ssl_context(config: AuthConfig, *, recheck_seconds: float = 1.0) -> ssl.SSLContext | None:
    """A server ``ssl.SSLContext`` (TLS 1.2+) from ``--tls-cert``/``--tls-key``; None without
    TLS. Client certificates are not requested on HTTP.

    Renewed files are picked up without a restart: the context's ``sni_callback`` (run in every
    handshake) swaps in a context built from the changed files (checked at most every
    ``recheck_seconds``).
    """
    if not _check_tls_flags(config):
        return None
    files = TlsFiles(config, recheck_seconds=recheck_seconds)
    current = files.server_context()
    context = files.server_context()

    def use_current(sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        nonlocal current
        if files.changed():
            try:
                current = files.server_context()
            except (OSError, ValueError, ssl.SSLError) as exc:
                log.warning(
                    "TLS files changed but cannot be used (%s); keeping the previous ones", exc
                )
            else:
                log.info("TLS files changed: new HTTPS connections use the new certificate")
        sslobj.context = current

    context.sni_callback = use_current
    return context


# --- exposure -----------------------------------------------------------------------------------


def warn_if_exposed(config: AuthConfig, logger: logging.Logger | None = None) -> list[str]:
    """Log a warning for each listener bound beyond loopback without TLS or without a token;
    return the messages (empty when every listener is on loopback or fully protected)."""
    logger = logger or log
    tls = _check_tls_flags(config)
    token = bool(config.token_file)
    mtls = bool(config.tls_client_ca)
    warnings = []
    for name, address in (("gRPC", config.grpc_address), ("HTTP", config.http_address)):
        if not address:
            continue
        host, _ = split_host_port(address)
        if is_loopback_host(host):
            continue
        missing = []
        if not tls:
            missing.append("TLS (--tls-cert/--tls-key: traffic and any token travel in clear text)")
        if not token and not (mtls and name == "gRPC"):
            missing.append(
                "a token (--token-file: anyone who can reach it can "
                + ("send reports)" if name == "gRPC" else "read every run)")
            )
        if missing:
            warnings.append(
                f"SECURITY WARNING: the {name} listener {address} is reachable beyond loopback "
                f"without {' and without '.join(missing)}"
            )
    for message in warnings:
        logger.warning("%s", message)
    return warnings
