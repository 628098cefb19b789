"""``pq web``'s SDK clients, one per bearer token, and the routing fix for
queue names with a tenant (``acme%2Fmail``)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

from pqueue.client import Client
from pqueue.wire.tls import Tls

#: SDK clients kept at once, one per distinct bearer token.
MAX_CLIENTS = 64


class ClientPool:
    """One SDK ``Client`` per bearer token ("" for none), at most
    ``MAX_CLIENTS`` of them, least recently used let go first. Clients are
    made on first use, on the serving event loop, and taken with ``use``:
    one let go while a call or an event stream still uses it is closed when
    the last of them is done, not under them."""

    def __init__(
        self,
        endpoint: str,
        *,
        token: str | None = None,
        tls: Tls | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self.token = token or ""
        self.tls = tls
        self.timeout_s = timeout_s
        self._clients: OrderedDict[str, Client] = OrderedDict()
        #: Clients in use, and by how many callers.
        self._users: dict[Client, int] = {}
        #: Clients let go of while in use: closed when their last user is done.
        self._retired: set[Client] = set()
        self._anonymous: Client | None = None

    def _take(self, token: str) -> tuple[Client, list[Client]]:
        """The token's client, counted as used; and the clients to close now
        (let go of, and used by nobody). No await: nothing runs between."""
        token = token or self.token
        client = self._clients.get(token)
        if client is None:
            client = Client(
                self.endpoint, timeout_s=self.timeout_s, token=token or None, tls=self.tls
            )
            self._clients[token] = client
        else:
            self._clients.move_to_end(token)
        self._users[client] = self._users.get(client, 0) + 1
        unused = []
        while len(self._clients) > MAX_CLIENTS:
            _, old = self._clients.popitem(last=False)
            if old in self._users:
                self._retired.add(old)
            else:
                unused.append(old)
        return client, unused

    @asynccontextmanager
    async def use(self, token: str) -> AsyncIterator[Client]:
        """The client for ``token`` (the process's ``--token`` for ""),
        kept open until the block ends."""
        client, unused = self._take(token)
        try:
            for old in unused:
                await old.close()
            yield client
        finally:
            self._users[client] -= 1
            if not self._users[client]:
                del self._users[client]
                if client in self._retired:
                    self._retired.discard(client)
                    await client.close()

    async def anonymous(self) -> Client:
        """A client that sends no token at all (to ask whether auth is on)."""
        if self._anonymous is None:
            self._anonymous = Client(
                self.endpoint, timeout_s=min(self.timeout_s, 3.0), max_retries=1, tls=self.tls
            )
        return self._anonymous

    async def close(self) -> None:
        if self._anonymous is not None:
            await self._anonymous.close()
            self._anonymous = None
        clients = [*self._clients.values(), *self._retired]
        self._clients, self._retired = OrderedDict(), set()
        for client in clients:
            await client.close()


class EncodedSlashes:
    """ASGI middleware: route on the raw path with ``%2F`` left encoded, so a
    queue name ``acme%2Femails`` stays one path segment."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        if scope["type"] == "http" and raw:
            segments = raw.decode("latin-1").split("/")
            scope = dict(scope)
            scope["path"] = "/".join(unquote(s).replace("/", "%2F") for s in segments)
        await self.app(scope, receive, send)
