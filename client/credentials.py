"""Channels to the sidecar: plain, TLS, mutual TLS, and a bearer token on every call.

`channel(endpoint, tls=..., token=... | token_file=...)` is the one place the client builds a
`grpc.Channel`. Only grpcio is used.

* ``tls`` is a mapping of paths: ``ca`` (the CA that signed the sidecar's certificate; omit it to
  trust the system roots), and ``cert`` + ``key`` (the client certificate for mutual TLS, required
  when the sidecar runs with ``--tls-client-ca``). ``server_name`` overrides the name checked
  against the certificate (when the endpoint is an IP address the certificate does not list).
  ``tls=True`` means TLS with the system roots.
* ``token`` / ``token_file``: the bearer token, sent as ``authorization: Bearer <token>`` metadata
  on every call. With TLS it travels as gRPC call credentials. gRPC refuses call credentials on an
  insecure channel, so without TLS (the sidecar next to the trainer, on loopback) the same header
  is added by a client interceptor; beyond loopback that sends the token in clear text, which is
  logged once as a warning.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

__all__ = ["channel", "read_token", "is_loopback_host", "split_host_port"]

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]
TLS_KEYS = ("ca", "cert", "key", "server_name")


def read_token(path: StrPath) -> str:
    """The bearer token stored in ``path``, surrounding whitespace (a trailing newline) removed.

    Raises ValueError when the file is empty or the token contains whitespace or control
    characters (it must fit in an ``authorization: Bearer <token>`` header).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"token file {os.fspath(path)!r} does not exist") from None
    token = text.strip()
    if not token:
        raise ValueError(f"token file {os.fspath(path)!r} is empty: write the token into it")
    check_token(token, source=f"token file {os.fspath(path)!r}")
    return token


def check_token(token: str, *, source: str = "token") -> str:
    """Return ``token`` when it is usable as a bearer token (printable ASCII, no whitespace)."""
    if not token:
        raise ValueError(f"{source}: the token is empty")
    if any(not (0x21 <= ord(ch) <= 0x7E) for ch in token):
        raise ValueError(
            f"{source}: the token must be printable ASCII without spaces "
            "(e.g. the output of `openssl rand -hex 32`)"
        )
    return token


def split_host_port(address: str) -> tuple[str, str]:
    """``"host:port"``, ``"[::1]:port"`` or a gRPC target such as ``"dns:///host:port"`` ->
    (host, port). The port is ``""`` when absent."""
    target = address
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        return host, rest.lstrip(":")
    if target.count(":") > 1:  # a bare IPv6 address
        return target, ""
    host, _, port = target.partition(":")
    return host, port


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1``; False for anything else (``0.0.0.0``
    and ``[::]`` bind every interface, so they are not loopback)."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_bytes(path: StrPath | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"tls[{what!r}]: file {os.fspath(path)!r} does not exist") from None


def check_tls(tls: Any) -> None:
    """The ``tls`` mapping names only known keys, pairs 'cert' with 'key', and its paths exist."""
    if not isinstance(tls, Mapping):
        raise TypeError(
            "tls must be a mapping of paths {'ca': ..., 'cert': ..., 'key': ...}, "
            f"got {type(tls).__name__}"
        )
    unknown = set(tls) - set(TLS_KEYS)
    if unknown:
        raise ValueError(f"tls has unknown keys {sorted(unknown)}; allowed: {list(TLS_KEYS)}")
    if ("cert" in tls) != ("key" in tls):
        raise ValueError("tls: give 'cert' and 'key' together (mTLS), or neither")
    for key, path in tls.items():
        if key != "server_name" and not os.path.isfile(path):
            raise ValueError(f"tls[{key!r}]: file {os.fspath(path)!r} does not exist")


def _tls_options(tls: Mapping[str, Any] | bool) -> tuple[grpc.ChannelCredentials, list]:
    """TLS channel credentials and the channel options they need, from the ``tls`` mapping."""
    if tls is True:
        return grpc.ssl_channel_credentials(), []
    check_tls(tls)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read_bytes(tls.get("ca"), "ca"),
        private_key=_read_bytes(tls.get("key"), "key"),
        certificate_chain=_read_bytes(tls.get("cert"), "cert"),
    )
    options = []
    if tls.get("server_name"):
        options.append(("grpc.ssl_target_name_override", str(tls["server_name"])))
    return creds, options


class _BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call's metadata (plaintext channels)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0].lower() != "authorization"]
        metadata.append(self._header)
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def channel(
    endpoint: str,
    *,
    tls: Mapping[str, Any] | bool | None = None,
    token: str | None = None,
    token_file: StrPath | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A gRPC channel to the sidecar at ``endpoint`` (``host:port``).

    No TLS and no token: an insecure channel (the default, for a sidecar on loopback).
    ``tls``: ``grpc.secure_channel`` with ``ssl_channel_credentials(ca, key, cert)``.
    ``token`` / ``token_file`` (one of them): with TLS,
    ``composite_channel_credentials(ssl, access_token_call_credentials(token))``; without TLS, an
    interceptor adds the same ``authorization: Bearer <token>`` header.
    Raises ValueError/TypeError for a bad configuration (missing files, cert without key, ...).
    """
    if token is not None and token_file is not None:
        raise ValueError("give token or token_file, not both")
    if token_file is not None:
        token = read_token(token_file)
    elif token is not None:
        token = check_token(token.strip())
    opts = list(options)
    if tls:
        creds, extra = _tls_options(tls)
        if token is not None:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(token)
            )
        return grpc.secure_channel(endpoint, creds, options=opts + extra)
    ch = grpc.insecure_channel(endpoint, options=opts)
    if token is None:
        return ch
    host, _ = split_host_port(endpoint)
    if not is_loopback_host(host):
        log.warning(
            "deltawatch: the bearer token for %s is sent WITHOUT TLS, in clear text; pass "
            "tls={'ca': ...} when the sidecar is not on this machine's loopback",
            endpoint,
        )
    return grpc.intercept_channel(ch, _BearerTokenInterceptor(token))
