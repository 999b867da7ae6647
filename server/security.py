"""Who may call: TLS (and mutual TLS) for the transport, bearer tokens for the calls.

With ``--tls-cert`` and ``--tls-key`` the server speaks TLS only; with ``--tls-client-ca`` too,
it also demands a client certificate signed by that CA. With tokens (``--auth-tokens``, best
given as GRADSERVE_AUTH_TOKENS since flags show in process lists, or ``--auth-token-file``, one
per line) every call must carry ``authorization: Bearer <token>`` metadata naming one of them,
else it is refused UNAUTHENTICATED; health checks are exempt, so probes and load balancers need
no secret. Tokens are compared in constant time, against every token, so timing tells nothing.

Auth fails closed: settings that ask for tokens but yield none (an empty or blank token file,
``GRADSERVE_AUTH_TOKENS=","``) are a :class:`ConfigError`, and the server does not start. A call
without a valid token is refused before its first message is read, whatever the RPC's shape.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from gradserve.server.config import ConfigError, ServerConfig

EXEMPT = "/grpc.health.v1.Health/"  # methods callable without a token


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The TLS credentials the settings ask for, or None for plaintext."""
    if not (config.tls_cert or config.tls_key or config.tls_client_ca):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
        root_certificates=client_ca, require_client_auth=client_ca is not None)


def tokens(config: ServerConfig) -> tuple[bytes, ...]:
    """The bearer tokens the settings accept (none: no token is asked for). Settings that ask
    for tokens and yield none are a ConfigError: serving every call unchecked is not what they
    meant."""
    given = [t.strip() for t in config.auth_tokens.split(",")]
    if config.auth_token_file:
        given += [line.strip() for line in Path(config.auth_token_file).read_text().splitlines()]
    accepted = tuple(t.encode() for t in given if t)
    if not accepted and (config.auth_tokens or config.auth_token_file):
        sources = [what for what, value in (
            ("--auth-tokens (GRADSERVE_AUTH_TOKENS)", config.auth_tokens),
            (f"--auth-token-file {config.auth_token_file!r}", config.auth_token_file))
            if value]
        raise ConfigError(f"no bearer token in {' or '.join(sources)} (empty, blank or only "
                          "separators): refusing to serve without authentication; give at "
                          "least one token, or unset the setting to serve without tokens")
    return accepted


class BearerAuth(aio.ServerInterceptor):
    """Refuses, UNAUTHENTICATED, every call but health checks that lacks a valid token, at
    once: the refusing handler reads no message, so a call that sends none (a stream that
    half-closes, or stays open silent) is answered as promptly as one that does."""

    def __init__(self, accepted: Sequence[bytes]) -> None:
        self._accepted = tuple(accepted)

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT) or self._allows(details):
            return handler
        return _REFUSE

    def _allows(self, details: grpc.HandlerCallDetails) -> bool:
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        scheme, _, token = given.partition(" ") if isinstance(given, str) else ("", "", "")
        offered = token.strip().encode()
        # every token compared, in constant time each: no early exit to time
        matches = [hmac.compare_digest(offered, accepted) for accepted in self._accepted]
        return scheme.lower() == "bearer" and any(matches)


async def _refuse(requests: object, context: aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "this server needs 'authorization: Bearer <token>' with a valid token")


# One handler serves every kind of method. It is a streaming one whatever the method's shape:
# gRPC reads a unary method's request before calling its handler, and a client that never sends
# it would wait for its own deadline. A streaming handler runs at once and never reads.
_REFUSE: grpc.RpcMethodHandler[Any, Any] = grpc.stream_stream_rpc_method_handler(_refuse)
