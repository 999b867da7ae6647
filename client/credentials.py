"""How a client reaches a server that asks for TLS, mutual TLS or a bearer token.

``Credentials(ca=...)`` turns TLS on, trusting that CA's PEM certificates for the server's;
``cert`` and ``key`` add the client's own certificate (mutual TLS); ``token`` is sent with every
call as ``authorization: Bearer <token>``. The CLI builds one from ``--tls-ca``, ``--tls-cert``,
``--tls-key`` and ``--token`` (or GRADSERVE_TOKEN, which keeps it out of process lists).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

Options = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class Credentials:
    """TLS files (PEM paths; none: plaintext) and a bearer token (none: no token)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    token: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def _tls(self) -> grpc.ChannelCredentials | None:
        if not (self.ca or self.cert or self.key):
            return None
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs its key too (--tls-cert, --tls-key)")

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

    def channel(self, target: str, options: Options = ()) -> grpc.Channel:
        tls = self._tls()
        return (grpc.insecure_channel(target, options=options) if tls is None else
                grpc.secure_channel(target, tls, options=options))

    def aio_channel(self, target: str, options: Options = ()) -> aio.Channel:
        tls = self._tls()
        return (aio.insecure_channel(target, options=options) if tls is None else
                aio.secure_channel(target, tls, options=options))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The CLI's flags for :class:`Credentials`."""
    parser.add_argument("--tls-ca", metavar="PEM", help="use TLS, trusting this CA")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", metavar="PEM", help="the client certificate's key")
    parser.add_argument("--token", default=os.environ.get("GRADSERVE_TOKEN"),
                        help="bearer token (default: $GRADSERVE_TOKEN)")


def from_arguments(args: argparse.Namespace) -> Credentials:
    return Credentials(args.tls_ca, args.tls_cert, args.tls_key, args.token)
