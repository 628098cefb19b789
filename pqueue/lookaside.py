"""The SDK's look-aside: leader-bound calls sent straight to the leader a balancer names.

A balancer names the leader in what it forwards there (``pq-leader``,
``pqueue.wire.keys.LEADER_KEY``: in the trailers of a unary call, in the
initial metadata of a ``Consume`` stream): the leader's own address, as its
peers know it (the one a NOT_LEADER answer names). ``LeaderLink`` opens a
channel to it in the background and names it ``ready`` only once that
channel is READY, so an address the client cannot reach never holds up or
fails a call: the client keeps using its endpoint, tries that address again
later (``Backoff``) and logs it once. The client (``pqueue.client.Client``)
sends ``Submit`` calls, and the ``Worker`` new ``Consume`` streams, to the
ready leader, and ``forget``s it when a direct call fails as unreachable or
is answered NOT_LEADER: back to the endpoint, until a balancer names the
leader again. A node never sends ``pq-leader``: a client given a node's
address never looks aside.

Beside the leader, a balancer names its cluster (``pq-cluster``). Direct
calls and streams carry it, and a node of another cluster refuses them unrun
(NOT_TAKEN, cause ``WRONG_CLUSTER``): an address that means another
cluster's node from where this client runs (NAT, split DNS, a port reused)
never takes its writes. The client then ``refuse``s that address for good
and sends the call through its endpoint.

Imports only the kernel (an SDK module).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from pqueue.errors import NotTakenError, PQueueError
from pqueue.wire.keys import CLUSTER_KEY, DIRECT, LEADER_KEY, WRONG_CLUSTER, value_of
from pqueue.wire.logs import describe

logger = logging.getLogger(__name__)

#: How long a leader's channel may take to become READY before it counts as failed.
CONNECT_TIMEOUT_S = 5.0
#: An address that failed is tried again after this, doubling up to the most.
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 60.0


def leader_named(metadata: object) -> tuple[str, str]:
    """The leader address a balancer put in ``metadata`` (``pq-leader``) and
    its cluster (``pq-cluster``); "" for what it did not name."""
    return value_of(metadata, LEADER_KEY), value_of(metadata, CLUSTER_KEY)  # type: ignore[arg-type]


def wrong_cluster(error: PQueueError) -> bool:
    """Whether a node refused a call for naming another cluster (unrun)."""
    return isinstance(error, NotTakenError) and error.cause == WRONG_CLUSTER


def direct_marks(cluster: str) -> tuple[tuple[str, str], ...]:
    """The metadata of a look-aside call to a leader of ``cluster`` ("": not named)."""
    return DIRECT + (((CLUSTER_KEY, cluster),) if cluster else ())


@dataclass
class Backoff:
    """When each address that failed may be tried again (pure: time is passed in)."""

    min_s: float = BACKOFF_MIN_S
    max_s: float = BACKOFF_MAX_S
    #: By address: (not before, the wait after its next failure).
    _state: dict[str, tuple[float, float]] = field(default_factory=dict)

    def allowed(self, address: str, now_s: float) -> bool:
        """Whether ``address`` may be tried at ``now_s``."""
        state = self._state.get(address)
        return state is None or now_s >= state[0]

    def failed(self, address: str, now_s: float) -> float:
        """``address`` failed at ``now_s``; how long until it may be tried again."""
        wait_s = self._state.get(address, (0.0, self.min_s))[1]
        self._state[address] = (now_s + wait_s, min(self.max_s, wait_s * 2))
        return wait_s

    def succeeded(self, address: str) -> None:
        """``address`` worked: no wait after its next failure but the least."""
        self._state.pop(address, None)


@dataclass
class LookAsideCounts:
    """Where a client's leader-bound work went (for tests and metrics)."""

    #: Operations (enqueue, ack, nack, extend) sent to the leader directly.
    direct: int = 0
    #: Operations sent to the endpoint (a balancer, or a node), as without look-aside.
    via_endpoint: int = 0
    #: Consume streams opened to the leader directly, and to the endpoint.
    streams_direct: int = 0
    streams_via_endpoint: int = 0


class LeaderLink:
    """The leader a balancer named, and whether its channel is READY.

    ``channel_for(address)`` is the client's channel to an address (kept
    with those NOT_LEADER hints open); ``on_ready`` is called when a leader
    becomes ready (a ``Worker`` moves its stream)."""

    def __init__(
        self,
        endpoint: str,
        channel_for: Callable[[str], grpc.aio.Channel],
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self._channel_for = channel_for
        self._clock_s = clock_s
        #: The leader calls go to ("": the endpoint).
        self.ready = ""
        #: The address being connected to ("": none).
        self._trying = ""
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff()
        self._told: set[str] = set()
        self.on_ready: list[Callable[[str], None]] = []
        #: The cluster the balancer names ("": none named yet, or an older
        #: balancer that names none): one for the endpoint, whatever address
        #: it names as leader; a balancer naming none does not unset it.
        self.cluster = ""
        #: Addresses a node of another cluster answered at: never used again.
        self._refused: set[str] = set()

    def offer(self, address: str, cluster: str = "") -> None:
        """A balancer named ``address`` the leader (of ``cluster``): connect
        to it in the background unless it is the endpoint, ready, being
        tried, waiting out its backoff, or refused."""
        if cluster:
            self.cluster = cluster
        if not address or address in self._refused:
            return
        if address == self.ready or address == self._trying:
            return
        if address == self.endpoint or not self._backoff.allowed(address, self._clock_s()):
            return
        if loopback(address) and not loopback(self.endpoint):
            # A cluster whose peers know each other as 127.0.0.1: that name is
            # this client's own host, where another server may listen.
            self._tell_once(
                address,
                "look-aside: the balancer names the leader %s, a loopback address, and %s "
                "is not: calls keep going to %s",
                address,
                self.endpoint,
                self.endpoint,
            )
            return
        if self._task is not None and not self._task.done():
            self._task.cancel()  # an older leader's attempt: this one is newer
        self._trying = address
        self._task = asyncio.get_running_loop().create_task(
            self._connect(address), name="pq-look-aside"
        )

    def current(self) -> str:
        """The ready leader's address while its channel is READY; else "" (and
        it is forgotten: a dropped connection sends calls back to the endpoint)."""
        address = self.ready
        if not address:
            return ""
        state = self._channel_for(address).get_state(try_to_connect=True)
        if state is grpc.ChannelConnectivity.READY:
            return address
        self.forget(address, f"its channel is {state.name}")
        return ""

    def _tell_once(self, address: str, message: str, *args: object) -> None:
        """Log why ``address`` is not used, the first time only (INFO)."""
        if address not in self._told:
            self._told.add(address)
            logger.info(message, *args)

    def worked(self, address: str) -> None:
        """A direct call to ``address`` succeeded: its backoff starts over
        (not at connect: an address that connects but fails its calls
        keeps backing off, up to a minute between tries)."""
        self._backoff.succeeded(address)

    def forget(self, address: str, why: str) -> None:
        """Calls to ``address`` failed (unreachable, NOT_LEADER): back to the endpoint."""
        if address and address == self.ready:
            self.ready = ""
            self._backoff.failed(address, self._clock_s())
            logger.info("look-aside: back to %s (leader %s: %s)", self.endpoint, address, why)

    def refuse(self, address: str, why: str) -> None:
        """A node of another cluster answered at ``address``: this client
        never sends there directly again (logged once, WARNING)."""
        if address == self.ready:
            self.ready = ""
        if address == self._trying and self._task is not None:
            self._task.cancel()  # a connect under way would make it ready again
            self._trying = ""
        if address in self._refused:
            return
        self._refused.add(address)
        logger.warning(
            "look-aside: %s, which the balancer names as its leader, is not a node of "
            "its cluster (%s); calls keep going to %s",
            address,
            why,
            self.endpoint,
        )

    async def _connect(self, address: str) -> None:
        try:
            channel = self._channel_for(address)
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await channel.channel_ready()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a timeout, a closed channel: stay on the endpoint
            wait_s = self._backoff.failed(address, self._clock_s())
            self._tell_once(
                address,
                "look-aside: the leader's address %s is not reachable (%s); calls keep "
                "going to %s (tried again after %.0f s, and later)",
                address,
                describe(exc) if str(exc) else "no connection",
                self.endpoint,
                wait_s,
            )
            return
        finally:
            if self._trying == address:
                self._trying = ""
        if address in self._refused:
            return  # refused while connecting
        self.ready = address
        logger.debug("look-aside: calls go to the leader at %s", address)
        for callback in list(self.on_ready):
            callback(address)

    async def close(self) -> None:
        """Stop trying (the client closes)."""
        task, self._task = self._task, None
        self.ready = ""
        self.on_ready.clear()
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])


def loopback(address: str) -> bool:
    """Whether ``host:port`` names this host's loopback (127.0.0.0/8, ::1, localhost)."""
    host = address.rsplit(":", 1)[0].strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to, it is not obviously this host
