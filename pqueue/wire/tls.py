"""TLS for every hop: clients to balancer or node, balancer to node, node to node
(gRPC, and the TCP peer transport's sockets).

A ``Tls`` is read from PEM files: this side's certificate and key, and the
CA that certifies the other side. A server given a CA requires and checks a
client certificate (mutual TLS): nodes started that way accept only peers,
balancers and clients holding a certificate from that CA, so a node without
one cannot join the cluster or speak the peer protocol. A channel given a
certificate presents it. Names are checked against the certificate's
subject alternative names, as gRPC does.
"""

from __future__ import annotations

import functools
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pqueue.wire.logs import describe


@dataclass(frozen=True)
class Tls:
    """PEM bytes: this side's chain and key (optional for a plain client), and the CA."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a TLS certificate and its key go together: give both or neither")

    @classmethod
    def from_files(
        cls,
        cert: Path | str | None = None,
        key: Path | str | None = None,
        ca: Path | str | None = None,
    ) -> Tls:
        def read(path: Path | str | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read the TLS {what} {path}: {describe(exc)}") from exc

        return cls(read(cert, "certificate"), read(key, "key"), read(ca, "CA"))

    @property
    def mutual(self) -> bool:
        """A server with a CA requires client certificates."""
        return self.ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise ValueError("a TLS server needs a certificate and a key")
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.mutual
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def server_context(self) -> ssl.SSLContext:
        """The same server side for a plain TLS socket (the TCP peer transport):
        this chain and key; with a CA, client certificates from it required.
        Made once (a context serves every connection)."""
        return self._server_context

    def client_context(self) -> ssl.SSLContext:
        """The same client side for a plain TLS socket: the server checked
        against the CA (the system's roots without one) and its name against
        the certificate's, this chain presented if given. Made once."""
        return self._client_context

    @functools.cached_property
    def _server_context(self) -> ssl.SSLContext:
        if self.cert is None or self.key is None:
            raise ValueError("a TLS server needs a certificate and a key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._load_chain(ctx)
        if self.ca is not None:
            ctx.load_verify_locations(cadata=self.ca.decode())
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    @functools.cached_property
    def _client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cadata=self.ca.decode() if self.ca is not None else None
        )
        if self.cert is not None:
            self._load_chain(ctx)
        return ctx

    def _load_chain(self, ctx: ssl.SSLContext) -> None:
        # ``ssl`` reads a chain and key only from files: a private temporary
        # directory holds them for the moment it takes.
        assert self.cert is not None
        assert self.key is not None
        with tempfile.TemporaryDirectory(prefix="pq-tls-") as tmp:
            cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            for path, data in ((cert, self.cert), (key, self.key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            ctx.load_cert_chain(cert, key)


def channel(
    target: str, tls: Tls | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """An aio channel to ``target``: TLS when ``tls`` is given, plaintext otherwise."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=list(options))


def add_port(server: grpc.aio.Server, listen: str, tls: Tls | None) -> int:
    """Bind ``listen`` on ``server`` with or without TLS; the bound port."""
    if tls is None:
        return server.add_insecure_port(listen)
    return server.add_secure_port(listen, tls.server_credentials())
