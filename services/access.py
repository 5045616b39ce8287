"""Who may call the public API: TLS on its port and a bearer token on every call but health checks.

    client --TLS--> grpc.aio server --BearerTokenInterceptor--> ErrorMappingInterceptor --> servicers

`PublicAccess.load` reads and checks everything at start-up, so a misconfigured gateway never starts:
a certificate without its key (or the reverse), an unreadable file, a key that does not match its
certificate, or an empty token fail there with a message naming the flag and the file.

With a token, every method needs `authorization: Bearer <token>` metadata, except `grpc.health.v1.Health`:
load balancers and Kubernetes probes check health without credentials, and health says nothing a
caller could use. Server reflection needs the token too: it is the map a scanner would start from,
the schema it serves is published in `protos/` for anyone who builds a client, and the tools that use
it (grpcurl) can send the header. A call without the token, or with another, ends UNAUTHENTICATED before
its request is even parsed; the token is compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
OPEN_METHOD_PREFIX = "/grpc.health.v1.Health/"
# A token travels in an HTTP/2 header as `Bearer <token>`: printable ASCII, no spaces.
_TOKEN_PATTERN = re.compile(r"[\x21-\x7e]+")


def read_file(flag: str, path: str) -> bytes:
    """The bytes of `path`, or a ValueError that names the flag it came from and the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise ValueError(f"{flag}: {path} is empty")
    return data


def read_token(token: str | None = None, token_file: str | None = None, *,
               source: str = "--auth-token") -> str | None:
    """The bearer token given directly (from `source`, for messages) or as the content of `token_file`
    (surrounding whitespace, such as the file's final newline, is dropped); None when neither is given."""
    if token is not None and token_file is not None:
        raise ValueError("--auth-token, --auth-token-file: give one, not both")
    if token_file is not None:
        try:
            token, flag = read_file("--auth-token-file", token_file).decode("ascii").strip(), "--auth-token-file"
        except UnicodeDecodeError:
            raise ValueError(f"--auth-token-file: {token_file} is not ASCII text") from None
    elif token is not None:
        token, flag = token.strip(), source
    else:
        return None
    if not _TOKEN_PATTERN.fullmatch(token):
        raise ValueError(f"{flag}: the token must be one word of printable ASCII (it travels in a header)")
    return token


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (none without one)."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


def _check_key_pair(cert_path: str, key_path: str, flags: str = "--tls-cert, --tls-key") -> None:
    """Fail now, not at the first handshake, if the files are not a PEM chain and its unencrypted key."""
    try:
        # An empty password makes an encrypted key fail here instead of prompting on the terminal.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path, password=b"")
    except ssl.SSLError as exc:
        raise ValueError(f"{flags}: {cert_path} and {key_path} are not a PEM certificate chain "
                         f"and its unencrypted private key ({exc.reason or exc})") from None


@dataclass(frozen=True)
class PublicAccess:
    """How the public port is secured. No certificate: plaintext; no token: every call is let in.
    PEM bytes and the token stay out of repr, so logging this never leaks them."""

    cert_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def load(cls, tls_cert: str | None = None, tls_key: str | None = None, auth_token: str | None = None,
             auth_token_file: str | None = None) -> PublicAccess:
        """Read and check the serve flags' files (paths as given). Raises ValueError naming the flag."""
        if (tls_cert is None) != (tls_key is None):
            given, missing = ("--tls-cert", "--tls-key") if tls_key is None else ("--tls-key", "--tls-cert")
            raise ValueError(f"{missing}: missing; {given} was given, and TLS needs both the certificate "
                             f"chain and its private key")
        cert = key = None
        if tls_cert is not None:
            cert, key = read_file("--tls-cert", tls_cert), read_file("--tls-key", tls_key)
            _check_key_pair(tls_cert, tls_key)
        return cls(cert, key, read_token(auth_token, auth_token_file))

    @property
    def tls(self) -> bool:
        return self.cert_chain is not None

    def describe(self) -> str:
        """For the start-up log line; says what is on, never the token."""
        auth = "bearer token required (health checks open)" if self.token else "no authentication"
        return f"TLS {'on' if self.tls else 'off'}, {auth}"

    def interceptors(self, on_denied: Callable[[str], None] | None = None) -> list[grpc.aio.ServerInterceptor]:
        """To put first in the server's interceptor list, so a denied call reaches nothing else.
        `on_denied(reason)` sees every denied call (`DENIED_REASONS`)."""
        return [BearerTokenInterceptor(self.token, on_denied)] if self.token else []

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind `address` with TLS when configured; returns the bound port."""
        if not self.tls:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, grpc.ssl_server_credentials([(self.private_key, self.cert_chain)]))


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps even the token's length out of the timing.
    return hashlib.sha256(token.encode()).digest()


DENIED_REASONS = ("missing", "malformed", "invalid")
"""Why a call was denied: no authorization metadata, metadata that is not 'Bearer <token>', another token."""


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with `authorization: Bearer <token>`; health methods are always open.
    `on_denied(reason)`, if given, is told of every denied call (the metrics hook)."""

    def __init__(self, token: str, on_denied: Callable[[str], None] | None = None):
        self._digest = _digest(token)
        self._on_denied = on_denied

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIX):
            return handler
        problem = self._problem(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler
        if self._on_denied is not None:
            self._on_denied(problem[0])
        return _denied(handler, method, problem[1])

    def _problem(self, metadata) -> tuple[str, str] | None:
        """Why the call's metadata is not the token (a `DENIED_REASONS` entry and the message for the
        caller), or None when it is."""
        values = [value for key, value in metadata if key == AUTHORIZATION]
        if not values:
            return "missing", "missing bearer token: send metadata 'authorization: Bearer <token>'"
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer":
            return "malformed", "authorization metadata must be 'Bearer <token>'"
        if not hmac.compare_digest(_digest(token.strip()), self._digest):
            return "invalid", "invalid bearer token"
        return None


def _denied(handler: grpc.RpcMethodHandler | None, method: str, problem: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call UNAUTHENTICATED. The request is left
    unparsed (no deserializer): nothing from an unauthenticated caller reaches protobuf code."""

    async def deny(request_or_iterator, context: grpc.aio.ServicerContext):
        log.info("denied %s from %s: %s", method, context.peer(), problem)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    if handler is None:  # an unknown method: do not tell an unauthenticated caller that it is unknown
        return grpc.unary_unary_rpc_method_handler(deny)
    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
    return handler._replace(**{kind: deny}, request_deserializer=None)


INTERNAL_SERVER_NAME = "expertmesh-internal"


@dataclass(frozen=True)
class InternalTLS:
    """Mutual TLS between the cluster's own components (gateway, attention shards, routers, expert
    groups). Each serves with, and calls with, one certificate chain signed by `ca`, and requires the
    same of its peers: nothing without a certificate from that CA can call an internal service.
    Components are reached by IP address, so the certificate must name `expertmesh-internal` (a DNS
    subject alternative name) and every caller checks that name instead of the address."""

    ca: bytes = field(repr=False)
    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)

    @classmethod
    def load(cls, ca: str | None, cert: str | None, key: str | None) -> InternalTLS | None:
        """Read the three PEM files (all or none of them); ValueError names the flag and file."""
        given = [p is not None for p in (ca, cert, key)]
        if not any(given):
            return None
        if not all(given):
            raise ValueError("--internal-tls-ca, --internal-tls-cert, --internal-tls-key: give all three or none")
        _check_key_pair(cert, key, "--internal-tls-cert, --internal-tls-key")
        return cls(read_file("--internal-tls-ca", ca), read_file("--internal-tls-cert", cert),
                   read_file("--internal-tls-key", key))

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.private_key, self.cert_chain)
