"""Python client SDK: an async ``Client`` and a synchronous ``SyncClient``.

Every failed call raises a ``pqueue.errors.PQueueError`` subclass (mapped from
the gRPC status in ``pqueue.wire.status``). Calls that are safe to repeat (reads,
and enqueues carrying an idempotency key) are retried on retriable errors,
honouring the server's retry hint.

Batching (``Client(batching=True)``, the default): concurrent ``enqueue``,
``ack``, ``nack`` and ``extend`` calls on one client go together in one
``Submit`` call while the previous one is out (``pqueue.batching``); each
caller still gets its own answer or error, exactly as its single call gives
it, and is retried or redirected on its own by the same rules.

Over 400 lines on purpose: the SDK's whole client (one method per RPC, and
its synchronous twin) in the one module users import.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, Concatenate, ParamSpec, TypeAlias, TypeVar, cast

import grpc

from pqueue.batching import NoSubmitError, SubmitBatcher, SubmitCounts, fits, op_bytes
from pqueue.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    NotLeaderError,
    NotTakenError,
    PQueueError,
    ResourceExhaustedError,
    UnavailableError,
)
from pqueue.lookaside import (
    LeaderLink,
    LookAsideCounts,
    direct_marks,
    leader_named,
    wrong_cluster,
)
from pqueue.submitstream import Answer, SubmitStreamer
from pqueue.v1 import balancer_pb2 as bpb
from pqueue.v1 import balancer_pb2_grpc as bpbg
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.channels import channel_options
from pqueue.wire.keys import AUTHORIZATION_KEY, CLUSTER_KEY
from pqueue.wire.status import from_rpc_error
from pqueue.wire.tls import Tls, channel

#: The balancer that ``make cluster`` starts in front of its nodes.
DEFAULT_ENDPOINT = "127.0.0.1:7700"

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

#: ``put_schedule(missed=...)``: what ticks missed during an outage get.
MISSED_POLICIES = {
    "once": pb.MISSED_TICKS_ONCE,
    "all": pb.MISSED_TICKS_ALL,
    "skip": pb.MISSED_TICKS_SKIP,
}

T = TypeVar("T")
P = ParamSpec("P")


def _payload(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def job_spec(
    payload: bytes | str,
    *,
    priority: int = 0,
    delay_ms: int = 0,
    not_before_ms: int = 0,
    idempotency_key: str = "",
    group: str = "",
    expires_at_ms: int = 0,
) -> pb.JobSpec:
    """One job for ``enqueue_batch`` (a ``str`` payload is sent as UTF-8).
    ``expires_at_ms``: if not leased by then (Unix ms), the job is dead with
    reason "expired" (0: never, unless the queue's ``job_ttl_ms`` says so)."""
    if not INT32_MIN <= priority <= INT32_MAX:
        raise InvalidArgumentError("priority", f"{priority} does not fit in int32")
    return pb.JobSpec(
        payload=_payload(payload),
        priority=priority,
        delay_ms=delay_ms,
        not_before_ms=not_before_ms,
        idempotency_key=idempotency_key,
        group=group,
        expires_at_ms=expires_at_ms,
    )


#: What ``list_jobs`` takes for a state: the enum, or its name in any case,
#: with or without the ``JOB_STATE_`` prefix ("ready", "DEAD").
StateLike: TypeAlias = "pb.JobState.ValueType | str"


def job_state(state: StateLike) -> pb.JobState.ValueType:
    """The ``JobState`` that ``state`` names ("ready", "JOB_STATE_READY" or
    the enum itself); InvalidArgumentError naming ``state`` otherwise."""
    if isinstance(state, str):
        name = state.strip().upper()
        name = name if name.startswith("JOB_STATE_") else f"JOB_STATE_{name}"
        if name == "JOB_STATE_UNSPECIFIED" or name not in pb.JobState.DESCRIPTOR.values_by_name:
            raise InvalidArgumentError(
                "state",
                f"{state!r} is not a job state: ready, delayed, leased, dead, "
                "completed or cancelled",
            )
        return pb.JobState.Value(name)
    return state


def _channel(target: str, tls: Tls | None) -> grpc.aio.Channel:
    return channel(
        target,
        tls,
        channel_options(),
    )


class _Stubs:
    """The public services on one channel, and its Submit batchers (once used)."""

    def __init__(self, channel: grpc.aio.Channel, marks: tuple[tuple[str, str], ...] = ()) -> None:
        self.channel = channel
        #: Metadata every call on these stubs adds (``DIRECT``: look-aside).
        self.marks = marks
        self.queue = pbg.QueueStub(channel)
        self.admin = pbg.AdminStub(channel)
        self.balancer = bpbg.BalancerStub(channel)
        #: By resendability: True for operations any hop may send again
        #: after a plain UNAVAILABLE (enqueues with an idempotency key).
        self.batchers: dict[bool, SubmitBatcher] = {}
        #: Their streams (``Client(stream_submits=True)``).
        self.streamers: list[SubmitStreamer] = []


class Client:
    """An async connection to a pqueue balancer or node.

    ``batching`` (on by default): concurrent ``enqueue``, ``ack``, ``nack``
    and ``extend`` calls are packed into ``Submit`` calls, at most
    ``max_submits_in_flight`` out at once per channel; no timer, so a lone
    call goes at once. Enqueues with an idempotency key go in Submits of
    their own (with their own bound), which a balancer may send again after
    a plain UNAVAILABLE, as it does their single calls. Answers and errors
    are each call's own, as without batching. Ordering: calls awaited one
    after another keep their order; concurrent calls have none among
    themselves (as without batching); the operations of one Submit are
    applied in the order they were called. ``batching=False`` sends one call
    per operation. ``stream_submits`` (on by default): those Submits go as
    requests on one open ``SubmitStream`` per batcher, which saves a call's
    cost per batch; errors are those of the ``Submit`` call, and a server
    without the stream (UNIMPLEMENTED) or a follower that refuses it is sent
    ``Submit`` instead (``pqueue.submitstream``). ``enqueue_batch`` and
    ``ack_many`` are always their own atomic call. An older server without
    ``Submit`` is detected once (nothing ran) and answered single calls from
    then on.

    ``read_your_writes`` (on by default): every read this client makes
    (``stats``, ``get_job``, ``get_queue``, ``list_queues``, ``list_jobs``,
    ``iter_jobs``, ``list_dead``, ``list_schedules``) carries the log index
    of its own latest write (an enqueue, ack, lease, queue change...) as
    ``min_index``, so whichever node answers (a balancer spreads reads over
    followers) has applied it: a client never reads state older than its
    own writes. Another client's writes may still be missing from the
    answer; for that, ``consistent=True`` reads at the leader. A node that
    has not caught up within 5 s answers UNAVAILABLE (retriable; reads are
    retried). ``last_log_index`` is the index reads wait for.

    ``look_aside`` (on by default): a balancer names the leader in its
    answers (``pq-leader``); the client opens a channel to that address in
    the background and, once it is READY, sends its enqueues, acks, nacks,
    extends and leases (and a ``Worker`` its new ``Consume`` streams) to the leader
    directly, saving the balancer's hop. A direct call that finds the leader
    unreachable or not leading sends the client back to the endpoint (the
    balancer) until it names the leader again; an address the client cannot
    reach is never waited for (tried again later, logged once at INFO).
    The resend rules are the same either way; reads and admin calls always
    go to the endpoint. A node never names the leader this way, so a client
    given a node's address behaves as without it. ``look_aside=False``:
    everything through the endpoint. ``look_aside_counts`` says where the
    operations and streams went.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout_s: float = 10.0,
        max_retries: int = 3,
        token: str | None = None,
        tls: Tls | None = None,
        read_your_writes: bool = True,
        batching: bool = True,
        max_submits_in_flight: int = 1,
        look_aside: bool = True,
        stream_submits: bool = True,
    ) -> None:
        if max_submits_in_flight < 1:
            raise ValueError(
                f"max_submits_in_flight must be at least 1, got {max_submits_in_flight}"
            )
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.tls = tls
        #: Sent with every call: the bearer token, when the cluster wants one.
        self._metadata: tuple[tuple[str, str], ...] = (
            ((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()
        )
        self._channel = _channel(endpoint, tls)
        self._stubs = _Stubs(self._channel)
        #: Calls sent again after a retriable error, in all (for tests and metrics).
        self.retries = 0
        #: Channels to leaders named in not-leader answers, by address.
        self._leaders: dict[str, _Stubs] = {}
        #: The same channels, for look-aside calls (marked ``DIRECT`` and the
        #: cluster), and for calls sent where a NOT_LEADER hint points (the cluster).
        self._direct: dict[str, _Stubs] = {}
        self._hinted: dict[str, _Stubs] = {}
        #: Reads carry ``min_index``: whichever node answers has applied this
        #: client's own writes.
        self.read_your_writes = read_your_writes
        #: The highest ``log_index`` a write of this client returned.
        self.last_log_index = 0
        #: Pack concurrent enqueues, acks, nacks and extends into Submit calls.
        self.batching = batching
        self.max_submits_in_flight = max_submits_in_flight
        #: Send those Submits on an open ``SubmitStream`` per batcher.
        self.stream_submits = stream_submits
        self._submit_counts = SubmitCounts()
        #: Send leader-bound work to the leader a balancer names (look-aside).
        self.look_aside = look_aside
        self.look_aside_counts = LookAsideCounts()
        self._link = LeaderLink(endpoint, lambda address: self._leader_stubs(address).channel)

    @property
    def submits(self) -> int:
        """Submit calls this client sent (batching), an UNIMPLEMENTED one included."""
        return self._submit_counts.submits

    @property
    def ops_submitted(self) -> int:
        """Operations those Submit calls carried (resends counted again)."""
        return self._submit_counts.ops

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call carries (the bearer token); streams send it too (``pqueue.consumer``)."""
        return self._metadata

    @property
    def leader_address(self) -> str:
        """The leader this client sends operations to directly (look-aside),
        "" while they go to the endpoint."""
        return self._link.ready

    def leader_target(self) -> str:
        """Where a new ``Consume`` stream goes: the leader a balancer named,
        while the client's channel to it is READY (look-aside), else the
        endpoint. Counted in ``look_aside_counts``."""
        address = self._link.current() if self.look_aside else ""
        if address:
            self.look_aside_counts.streams_direct += 1
            return address
        self.look_aside_counts.streams_via_endpoint += 1
        return self.endpoint

    def note_leader(self, metadata: object) -> None:
        """Metadata from the endpoint (a stream's initial metadata): if a
        balancer named the leader in it, connect there in the background."""
        if self.look_aside:
            address, cluster = leader_named(metadata)
            if address:
                self._link.offer(address, cluster)

    def leader_worked(self, address: str) -> None:
        """Work sent to ``address`` directly was served (a stream that
        delivered): its look-aside backoff starts over."""
        self._link.worked(address)

    def forget_leader(self, address: str, why: str) -> None:
        """Work sent to ``address`` directly failed: back to the endpoint."""
        self._link.forget(address, why)

    def refuse_leader(self, address: str, why: str) -> None:
        """A node of another cluster answered at ``address`` (WRONG_CLUSTER):
        never send there directly again."""
        self._link.refuse(address, why)

    def direct_marks(self) -> tuple[tuple[str, str], ...]:
        """The metadata of a look-aside call or stream: ``pq-direct``, and
        the cluster the balancer names (``pq-cluster``), which a node of
        another cluster refuses."""
        return direct_marks(self._link.cluster)

    def on_leader_ready(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(address)`` each time a leader becomes ready for
        direct work (a ``Worker`` moves its stream there); returns the undo."""
        self._link.on_ready.append(callback)

        def undo() -> None:
            if callback in self._link.on_ready:
                self._link.on_ready.remove(callback)

        return undo

    async def close(self) -> None:
        """Close the channels (calls still out or waiting are cancelled)."""
        await self._link.close()
        kept = (*self._leaders.values(), *self._direct.values(), *self._hinted.values())
        for stubs in (self._stubs, *kept):
            for batcher in stubs.batchers.values():
                batcher.cancel_waiting()
            for streamer in stubs.streamers:
                streamer.close()
        await self._channel.close()
        for stubs in self._leaders.values():  # the direct and hinted stubs share these channels
            await stubs.channel.close()
        self._leaders, self._direct, self._hinted = {}, {}, {}

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(
        self,
        pick: Callable[[_Stubs], Callable[..., Awaitable[T]]],
        request: Any,
        *,
        retry: bool = False,
        timeout_s: float | None = None,
        leader_bound: bool = False,
    ) -> T:
        """Call; follow one leader hint; retry retriable errors if ``retry``.
        ``leader_bound``: a job write or lease (an operation's single call,
        ``enqueue_batch``, ``ack_many``, ``lease``), which goes to the leader
        directly when look-aside has one ready."""

        async def send(stubs: _Stubs) -> T:
            learn = leader_bound and self.look_aside and stubs is self._stubs
            try:
                call = pick(stubs)(
                    request,
                    timeout=timeout_s or self.timeout_s,
                    metadata=self._metadata + stubs.marks,
                )
                response = await call
                if learn:
                    self.note_leader(await cast(grpc.aio.Call, call).trailing_metadata())
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from exc
            self.last_log_index = max(self.last_log_index, getattr(response, "log_index", 0) or 0)
            return response

        return await self._resending(send, retry, leader_bound)

    async def _op(
        self,
        op: pb.Operation,
        pick: Callable[[_Stubs], Callable[..., Awaitable[T]]],
        *,
        retry: bool = False,
    ) -> T:
        """One enqueue, ack, nack or extend: in a Submit with the calls made
        meanwhile (batching), else its single call; the same answer and
        errors, the same resend rules, either way."""
        kind = op.WhichOneof("op")
        assert kind is not None
        if self.batching and self._submit_counts.supported:
            size = op_bytes(op)
            if fits(size):
                try:
                    result = await self._resending(
                        lambda stubs: self._batcher(stubs, retry).submit(op, size), retry, True
                    )
                except NoSubmitError:
                    pass  # an older server took nothing: its single call, from now on
                else:
                    answer = getattr(result, kind)
                    self.last_log_index = max(self.last_log_index, answer.log_index)
                    return cast(T, answer)
        return await self._call(pick, getattr(op, kind), retry=retry, leader_bound=True)

    async def _resending(
        self, send: Callable[[_Stubs], Awaitable[T]], retry: bool, leader_bound: bool = False
    ) -> T:
        """``send`` to the endpoint (a ``leader_bound`` first attempt: to the
        leader look-aside has ready, if any); follow one leader hint; send
        again when the error allows it: any retriable one if ``retry``, and
        whatever the server did not take (NOT_TAKEN, a quota's refusal with a
        retry hint). Sent again, it goes to the endpoint."""
        direct = self._link.current() if leader_bound and self.look_aside else ""
        stubs = self._direct_stubs(direct) if direct else self._stubs
        # Where this attempt went when it named the balancer's cluster (a
        # direct call, or a leader hint's): another cluster's node refuses it.
        checked = direct
        attempt = 0
        redirected = False
        while True:
            if leader_bound:
                if direct:
                    self.look_aside_counts.direct += 1
                    for streamer in self._stubs.streamers:
                        # Its batches go to the leader now: the endpoint's
                        # stream (a balancer's slot and the leader's) ends.
                        streamer.idle()
                else:
                    self.look_aside_counts.via_endpoint += 1
            try:
                answer = await send(stubs)
            except PQueueError as error:
                if checked and wrong_cluster(error):
                    # A node of another cluster took nothing: never there
                    # directly again, and this call through the endpoint now
                    # (no attempt spent; the endpoint's stubs name no cluster).
                    self._link.refuse(checked, error.message)
                    stubs, direct, checked = self._stubs, "", ""
                    continue
                checked = ""
                if direct:
                    # The leader the balancer named failed this call: the next
                    # ones go through the endpoint until it names one again.
                    # A deadline too: a frozen leader keeps its connection up.
                    if isinstance(error, UnavailableError | NotLeaderError | DeadlineExceededError):
                        self._link.forget(direct, type(error).__name__)
                    direct = ""
                if isinstance(error, NotLeaderError) and error.leader_address and not redirected:
                    # Nothing ran on that node, so any call may go to the leader
                    # (naming the balancer's cluster, as a direct call does).
                    stubs = self._hint_stubs(error.leader_address)
                    checked = error.leader_address if stubs.marks else ""
                    redirected = True
                    continue
                # A call the server did not take may be sent again, whatever it
                # is: NOT_TAKEN, or a quota's refusal (nothing changed) that says
                # when to come back.
                again = (
                    (retry and error.retriable)
                    or isinstance(error, NotTakenError)
                    or (isinstance(error, ResourceExhaustedError) and error.retriable)
                )
                if not (again and attempt < self.max_retries):
                    raise
                attempt += 1
                self.retries += 1
                stubs = self._stubs  # the endpoint again: another node may lead now
                direct = ""
                hint = getattr(error, "retry_after_s", 0.0)
                await asyncio.sleep(hint or 0.1 * 2**attempt)
            else:
                if direct:
                    self._link.worked(direct)
                return answer

    def _batcher(self, stubs: _Stubs, resendable: bool) -> SubmitBatcher:
        """The Submit batcher of ``stubs``' channel for ``resendable``
        operations, or for the others (made on first use). Kept apart so a
        Submit of keyed enqueues only may be sent again by a balancer after a
        plain UNAVAILABLE, as their single calls are."""
        batcher = stubs.batchers.get(resendable)
        if batcher is None:
            submit = stubs.queue.Submit
            learn = self.look_aside and stubs is self._stubs
            marks = stubs.marks

            async def send(request: pb.SubmitRequest) -> pb.SubmitResponse:
                call = submit(request, timeout=self.timeout_s, metadata=self._metadata + marks)
                response = await call
                if learn:  # the endpoint may be a balancer naming the leader (look-aside)
                    self.note_leader(await call.trailing_metadata())
                return response

            sender: Callable[[pb.SubmitRequest], Awaitable[Answer]] = send
            if self.stream_submits:
                streamer = SubmitStreamer(
                    functools.partial(stubs.queue.SubmitStream, metadata=self._metadata + marks),
                    send,
                    self.timeout_s,
                    self.note_leader if learn else None,
                    resendable=resendable,
                )
                stubs.streamers.append(streamer)
                sender = streamer.send
            batcher = SubmitBatcher(sender, self._submit_counts, self.max_submits_in_flight)
            stubs.batchers[resendable] = batcher
        return batcher

    def _min_index(self) -> int:
        return self.last_log_index if self.read_your_writes else 0

    def _leader_stubs(self, address: str) -> _Stubs:
        stubs = self._leaders.get(address)
        if stubs is None:
            stubs = self._leaders[address] = _Stubs(_channel(address, self.tls))
        return stubs

    def _direct_stubs(self, address: str) -> _Stubs:
        """Stubs for look-aside calls to ``address``: its channel, each call
        marked ``DIRECT`` (a node no longer leading answers NOT_LEADER
        instead of forwarding it, and the client moves on)."""
        return self._marked_stubs(self._direct, address, self.direct_marks())

    def _hint_stubs(self, address: str) -> _Stubs:
        """Stubs for a call sent where a NOT_LEADER answer points: they name
        the cluster the balancer names, if it names one (a node of another
        cluster refuses them), else the plain leader stubs."""
        if not self._link.cluster:
            return self._leader_stubs(address)
        marks = ((CLUSTER_KEY, self._link.cluster),)
        return self._marked_stubs(self._hinted, address, marks)

    def _marked_stubs(
        self, kept: dict[str, _Stubs], address: str, marks: tuple[tuple[str, str], ...]
    ) -> _Stubs:
        """``address``'s stubs with ``marks`` on every call, kept in ``kept``
        (made again only if the marks change: the balancer named another cluster)."""
        stubs = kept.get(address)
        if stubs is None or stubs.marks != marks:
            stubs = kept[address] = _Stubs(self._leader_stubs(address).channel, marks)
        return stubs

    # --------------------------------------------------------------- Queue

    async def enqueue(
        self,
        queue: str,
        payload: bytes | str,
        *,
        priority: int = 0,
        delay_ms: int = 0,
        not_before_ms: int = 0,
        idempotency_key: str = "",
        group: str = "",
        expires_at_ms: int = 0,
    ) -> pb.EnqueueResponse:
        """Enqueue one job; retried on failover only when it carries a key.
        ``expires_at_ms``: see ``job_spec``."""
        spec = job_spec(
            payload,
            priority=priority,
            delay_ms=delay_ms,
            not_before_ms=not_before_ms,
            idempotency_key=idempotency_key,
            group=group,
            expires_at_ms=expires_at_ms,
        )
        op = pb.Operation(enqueue=pb.EnqueueRequest(queue=queue, job=spec))
        return await self._op(op, lambda s: s.queue.Enqueue, retry=bool(idempotency_key))

    async def enqueue_batch(
        self, queue: str, jobs: Sequence[pb.JobSpec]
    ) -> list[pb.EnqueueResponse]:
        """Enqueue many jobs atomically (see ``job_spec``)."""
        req = pb.EnqueueBatchRequest(queue=queue, jobs=jobs)
        retry = all(j.idempotency_key for j in jobs)
        resp = await self._call(lambda s: s.queue.EnqueueBatch, req, retry=retry, leader_bound=True)
        return list(resp.results)

    async def lease(
        self,
        queue: str,
        *,
        max_jobs: int = 1,
        lease_ms: int = 0,
        wait_ms: int = 0,
        consumer_id: str = "",
    ) -> list[pb.LeasedJob]:
        """Lease up to ``max_jobs``, long-polling up to ``wait_ms``.

        With a wait, a queue that does not exist yet is waited on like an
        empty one (its first enqueue creates it); without one it is
        ``NotFoundError``. An empty list when the wait runs out."""
        req = pb.LeaseRequest(
            queue=queue,
            max_jobs=max_jobs,
            lease_ms=lease_ms,
            wait_ms=wait_ms,
            consumer_id=consumer_id,
        )
        resp = await self._call(
            lambda s: s.queue.Lease,
            req,
            timeout_s=self.timeout_s + wait_ms / 1000,
            leader_bound=True,
        )
        return list(resp.jobs)

    async def ack(
        self, queue: str, job_id: int, lease_id: int, *, result: bytes | str = b""
    ) -> None:
        """Complete one job, keeping ``result`` on its COMPLETED record (at
        most the queue's ``max_result_bytes``; a str is sent as UTF-8);
        ``LeaseLostError`` if the lease is stale."""
        data = result.encode() if isinstance(result, str) else result
        lease = pb.JobLease(job_id=job_id, lease_id=lease_id, result=data)
        op = pb.Operation(ack=pb.AckRequest(queue=queue, leases=[lease]))
        await self._op(op, lambda s: s.queue.Ack)

    async def ack_many(
        self, queue: str, leases: Iterable[tuple[int, int] | tuple[int, int, bytes]]
    ) -> int:
        """Complete several jobs atomically: all, or none if any lease is stale
        (always its own call, never packed with others). Each is (job id,
        lease id) or (job id, lease id, result)."""
        req = pb.AckRequest(queue=queue, leases=[_job_lease(*lease) for lease in leases])
        return (await self._call(lambda s: s.queue.Ack, req, leader_bound=True)).acked

    async def nack(
        self,
        queue: str,
        job_id: int,
        lease_id: int,
        *,
        delay_ms: int | None = None,
        reason: str = "",
        release: bool = False,
    ) -> pb.NackResponse:
        """Give a job back for a retry (after ``delay_ms`` or the queue's backoff).

        ``release=True`` gives it back without counting the delivery as an
        attempt (for a consumer that stops before working on it).
        """
        op = pb.Operation(
            nack=pb.NackRequest(
                queue=queue, job_id=job_id, lease_id=lease_id, reason=reason, release=release
            )
        )
        if delay_ms is not None:
            op.nack.delay_ms = delay_ms
        return await self._op(op, lambda s: s.queue.Nack)

    async def extend(
        self, queue: str, job_id: int, lease_id: int, lease_ms: int = 0
    ) -> pb.ExtendLeaseResponse:
        """Move the lease's expiry to now + ``lease_ms`` (capped by the queue)."""
        op = pb.Operation(
            extend=pb.ExtendLeaseRequest(
                queue=queue, job_id=job_id, lease_id=lease_id, lease_ms=lease_ms
            )
        )
        return await self._op(op, lambda s: s.queue.ExtendLease)

    async def get_job(self, queue: str, job_id: int, *, consistent: bool = False) -> pb.Job:
        """One job's state and error history."""
        req = pb.GetJobRequest(
            queue=queue, job_id=job_id, consistent=consistent, min_index=self._min_index()
        )
        return (await self._call(lambda s: s.queue.GetJob, req, retry=True)).job

    async def stats(self, queue: str = "", *, consistent: bool = False) -> list[pb.QueueStats]:
        """Counts for one queue, or all (read a page at a time)."""
        req = pb.StatsRequest(queue=queue, consistent=consistent, min_index=self._min_index())
        return await self._pages(lambda s: s.queue.Stats, req)

    # --------------------------------------------------------------- Admin

    async def create_queue(
        self, queue: str, config: pb.QueueConfig | None = None
    ) -> pb.CreateQueueResponse:
        """Create a queue (idempotent for the same config)."""
        req = pb.CreateQueueRequest(queue=queue, config=config or pb.QueueConfig())
        return await self._call(lambda s: s.admin.CreateQueue, req, retry=True)

    async def delete_queue(self, queue: str) -> int:
        """Delete a queue and its jobs; the number of jobs deleted."""
        req = pb.DeleteQueueRequest(queue=queue)
        return (await self._call(lambda s: s.admin.DeleteQueue, req)).deleted_jobs

    async def list_queues(self) -> list[pb.QueueInfo]:
        """Every queue the caller may see, with its config and stats (read a page at a time)."""
        req = pb.ListQueuesRequest(min_index=self._min_index())
        return await self._pages(lambda s: s.admin.ListQueues, req)

    async def _pages(
        self,
        pick: Callable[[_Stubs], Callable[..., Awaitable[Any]]],
        request: pb.StatsRequest | pb.ListQueuesRequest,
    ) -> list[Any]:
        """Every page of a paged read, following ``next_page_token``."""
        out: list[Any] = []
        while True:
            resp = await self._call(pick, request, retry=True)
            out += resp.queues
            if not resp.next_page_token:
                return out
            request.page_token = resp.next_page_token

    async def purge(self, queue: str) -> int:
        """Remove ready and delayed jobs; how many."""
        return (
            await self._call(lambda s: s.admin.PurgeQueue, pb.PurgeQueueRequest(queue=queue))
        ).purged

    async def get_queue(self, queue: str) -> pb.QueueInfo:
        """One queue's config and stats (``NotFoundError`` if the caller sees
        no such queue). Read from ``ListQueues``, a page at a time until found."""
        req = pb.ListQueuesRequest(limit=1000, min_index=self._min_index())
        while True:
            resp = await self._call(lambda s: s.admin.ListQueues, req, retry=True)
            for info in resp.queues:
                if info.queue == queue:
                    # A node older than ListQueues' min_index ignores it: the
                    # stats read takes it everywhere (read your writes).
                    info.stats.CopyFrom((await self.stats(queue))[0])
                    return info
            if not resp.next_page_token:
                raise NotFoundError(f"queue {queue!r} not found")
            req.page_token = resp.next_page_token

    async def update_queue(
        self,
        /,
        queue: str,
        config: pb.QueueConfig | None = None,
        *,
        mask: Iterable[str] | None = None,
        **fields: Any,
    ) -> pb.UpdateQueueResponse:
        """Change a queue's config; the response holds the effective config.

        Either name the fields to change (``update_queue("q", max_inflight=4,
        max_dispatch_per_s=2.5)``: only those change; ``shares`` takes
        ``TenantShare`` messages or a ``{tenant: weight}`` mapping, and an
        optional field given as None is cleared), or pass a ``config`` with
        the ``mask`` of field names to take from it, or a ``config`` alone to
        replace the whole config (zero fields take their defaults).
        Validated as ``create_queue`` validates (``InvalidArgumentError``
        naming ``config.<field>``).
        """
        if fields and config is not None:
            raise TypeError("pass a config (and mask), or fields to change, not both")
        names = list(mask) if mask is not None else []
        if fields:
            config = pb.QueueConfig()
            for name, value in fields.items():
                if name == "shares" and isinstance(value, Mapping):
                    value = [pb.TenantShare(tenant=t, weight=w) for t, w in value.items()]
                if name == "shares":
                    config.shares.extend(value)
                elif value is not None:
                    setattr(config, name, value)
                if name not in names:
                    names.append(name)
        req = pb.UpdateQueueRequest(
            queue=queue, config=config or pb.QueueConfig(), update_mask=names
        )
        return await self._call(lambda s: s.admin.UpdateQueue, req, retry=True)

    async def pause_queue(self, queue: str) -> bool:
        """Stop leasing from the queue (enqueues go on; long polls and streams
        wait); False if it was paused already."""
        req = pb.PauseQueueRequest(queue=queue)
        return (await self._call(lambda s: s.admin.PauseQueue, req, retry=True)).changed

    async def resume_queue(self, queue: str) -> bool:
        """Lease from a paused queue again; False if it was not paused."""
        req = pb.ResumeQueueRequest(queue=queue)
        return (await self._call(lambda s: s.admin.ResumeQueue, req, retry=True)).changed

    async def list_dead(
        self, queue: str, *, limit: int = 0, after_job_id: int = 0, consistent: bool = False
    ) -> pb.ListDeadResponse:
        """A page of dead jobs with their error history."""
        req = pb.ListDeadRequest(
            queue=queue,
            limit=limit,
            after_job_id=after_job_id,
            consistent=consistent,
            min_index=self._min_index(),
        )
        return await self._call(lambda s: s.admin.ListDead, req, retry=True)

    async def list_jobs(
        self,
        queue: str,
        state: StateLike,
        *,
        min_priority: int | None = None,
        max_priority: int | None = None,
        group: str = "",
        tenant: str = "",
        page_token: str = "",
        limit: int = 0,
        consistent: bool = False,
    ) -> pb.ListJobsResponse:
        """A page of the queue's jobs in ``state`` ("ready", "dead"... or a
        ``JobState``), in the order they would be served (dead, completed
        and cancelled: newest first); ``limit`` 0 means 100, at most 1000.
        Pass the answer's ``next_page_token`` (empty: no more) as
        ``page_token`` for the next page, with the same filters."""
        req = pb.ListJobsRequest(
            queue=queue,
            state=job_state(state),
            min_priority=min_priority,
            max_priority=max_priority,
            group=group,
            tenant=tenant,
            limit=limit,
            page_token=page_token,
            consistent=consistent,
            min_index=self._min_index(),
        )
        return await self._call(lambda s: s.admin.ListJobs, req, retry=True)

    async def iter_jobs(
        self,
        queue: str,
        state: StateLike,
        *,
        min_priority: int | None = None,
        max_priority: int | None = None,
        group: str = "",
        tenant: str = "",
        page_size: int = 0,
        consistent: bool = False,
    ) -> AsyncIterator[pb.Job]:
        """Every job of ``list_jobs``, reading one page at a time as it goes."""
        token = ""
        while True:
            page = await self.list_jobs(
                queue,
                state,
                min_priority=min_priority,
                max_priority=max_priority,
                group=group,
                tenant=tenant,
                page_token=token,
                limit=page_size,
                consistent=consistent,
            )
            for job in page.jobs:
                yield job
            token = page.next_page_token
            if not token:
                return

    async def watch(
        self,
        queues: Iterable[str] = (),
        *,
        all_queues: bool = False,
        job_id: int = 0,
        from_index: int | None = None,
        stats_interval_ms: int = 0,
        also: Sequence[str] = (),
    ) -> AsyncIterator[pb.WatchEvent]:
        """Events as the cluster applies them (``Watch``): of ``queues``, of
        every queue this caller sees (``all_queues``), or of one job
        (``job_id``, one queue); after ``from_index`` (None: from now).

        Goes on across broken streams: on UNAVAILABLE it reconnects (to the
        endpoint, then each of ``also`` in turn: other nodes, when the
        endpoint is a node) and resumes after the last event it gave, by log
        index, so nothing is missed or given twice. Yields no WATCHING
        events (they only say where a stream starts). Other errors end it:
        RESOURCE_EXHAUSTED when it fell behind, FAILED_PRECONDITION when the
        node no longer keeps the index to resume from.
        """
        names = list(queues)
        endpoints = [self.endpoint, *also]
        #: Every event of the entries up to here was given (None: unknown yet).
        after = from_index
        #: The entry whose events are being given, and how many were.
        current, given = 0, 0
        which, failures = 0, 0
        while True:
            stubs = self._stubs if which == 0 else self._leader_stubs(endpoints[which])
            request = pb.WatchRequest(
                queues=names, all=all_queues, job_id=job_id, stats_interval_ms=stats_interval_ms
            )
            if current:
                request.from_index = current - 1
            elif after is not None:
                request.from_index = after
            skip = given if current else 0
            call = stubs.queue.Watch(request, metadata=self._metadata)
            try:
                async for event in call:
                    failures = 0
                    index = event.log_index
                    if event.kind == pb.WatchEvent.WATCHING:
                        if after is None:
                            after = index
                        continue
                    if event.kind == pb.WatchEvent.QUEUE_STATS:
                        if index >= current:
                            after, current, given = index, 0, 0
                        yield event
                        continue
                    if skip and index == current:
                        skip -= 1  # given before the stream broke
                        continue
                    if index != current:
                        if current:
                            after = current  # its events were all given
                        current, given = index, 0
                    given += 1
                    yield event
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                if not isinstance(error, UnavailableError) or failures > self.max_retries + len(
                    endpoints
                ):
                    raise error from exc
                failures += 1
                self.retries += 1
                which = (which + 1) % len(endpoints)  # the next node, if named
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))
                continue
            finally:
                call.cancel()
            return  # the server ended the stream (it does not, but if it did: done)

    async def redrive(self, queue: str, job_ids: Iterable[int] = ()) -> int:
        """Make dead jobs ready again (all when ``job_ids`` is empty)."""
        req = pb.RedriveRequest(queue=queue, job_ids=list(job_ids))
        return (await self._call(lambda s: s.admin.Redrive, req)).redriven

    async def complete_job(
        self, queue: str, job_id: int, *, note: str = "", result: bytes | str = b""
    ) -> pb.Job:
        """Force-complete a ready, delayed, leased or dead job (a leased
        one's worker then finds its lease lost); the job as it is after."""
        data = result.encode() if isinstance(result, str) else result
        req = pb.CompleteJobRequest(queue=queue, job_id=job_id, note=note, result=data)
        return (await self._call(lambda s: s.admin.CompleteJob, req)).job

    async def cancel_job(self, queue: str, job_id: int, *, note: str = "") -> pb.Job:
        """Cancel a ready, delayed or leased job; the job as it is after."""
        req = pb.CancelJobRequest(queue=queue, job_id=job_id, note=note)
        return (await self._call(lambda s: s.admin.CancelJob, req)).job

    async def requeue_job(self, queue: str, job_id: int, *, delay_ms: int = 0) -> pb.Job:
        """Make a dead, completed or cancelled job ready again (after
        ``delay_ms``) with fresh attempts; its error history is kept."""
        req = pb.RequeueJobRequest(queue=queue, job_id=job_id, delay_ms=delay_ms)
        return (await self._call(lambda s: s.admin.RequeueJob, req)).job

    async def reprioritize_job(
        self,
        queue: str,
        job_id: int,
        *,
        priority: int | None = None,
        ready_at_ms: int | None = None,
    ) -> pb.Job:
        """Change a waiting job's priority, its ready time, or both."""
        req = pb.ReprioritizeJobRequest(queue=queue, job_id=job_id)
        if priority is not None:
            req.priority = priority
        if ready_at_ms is not None:
            req.ready_at_ms = ready_at_ms
        return (await self._call(lambda s: s.admin.ReprioritizeJob, req)).job

    async def node_status(self) -> pb.NodeStatusResponse:
        """The connected node's view of the cluster."""
        return await self._call(lambda s: s.admin.NodeStatus, pb.NodeStatusRequest(), retry=True)

    async def state_digest(self) -> pb.StateDigestResponse:
        """The connected node's state digest at its applied index (a cluster
        admin's call; through a balancer, whichever node it picks)."""
        return await self._call(lambda s: s.admin.StateDigest, pb.StateDigestRequest(), retry=True)

    async def balancer_status(self) -> bpb.BalancerStatusResponse:
        """The backends as the balancer at this endpoint sees them."""
        return await self._call(
            lambda s: s.balancer.Status, bpb.BalancerStatusRequest(), retry=True
        )

    async def delete_dead(self, queue: str, job_ids: Iterable[int] = ()) -> int:
        """Delete dead jobs (all when ``job_ids`` is empty)."""
        req = pb.DeleteDeadRequest(queue=queue, job_ids=list(job_ids))
        return (await self._call(lambda s: s.admin.DeleteDead, req)).deleted

    # ----------------------------------------------------------- schedules

    async def put_schedule(
        self,
        queue: str,
        name: str,
        cron: str,
        payload: bytes | str,
        *,
        priority: int = 0,
        group: str = "",
        timezone: str = "",
        missed: str = "once",
        paused: bool = False,
    ) -> pb.PutScheduleResponse:
        """Create or replace the cron schedule ``name`` of ``queue``: at each
        tick of ``cron`` (five fields, or six with seconds first) read in
        ``timezone`` (default UTC), the leader enqueues ``payload``. ``missed``
        says what ticks missed during an outage get: "once" (one job),
        "all" (one each, at most 100), "skip" (none). Same definition twice
        changes nothing, so it is retried."""
        policy = MISSED_POLICIES.get(missed)
        if policy is None:
            raise InvalidArgumentError("missed", f"one of {', '.join(MISSED_POLICIES)}")
        schedule = pb.Schedule(
            queue=queue,
            name=name,
            cron=cron,
            timezone=timezone,
            job=job_spec(payload, priority=priority, group=group),
            missed=policy,
            paused=paused,
        )
        req = pb.PutScheduleRequest(schedule=schedule)
        return await self._call(lambda s: s.admin.PutSchedule, req, retry=True)

    async def list_schedules(
        self, queue: str = "", *, consistent: bool = False
    ) -> list[pb.Schedule]:
        """The schedules of ``queue``, or of every queue the caller may see,
        with their last and next ticks."""
        req = pb.ListSchedulesRequest(
            queue=queue, consistent=consistent, min_index=self._min_index()
        )
        return list((await self._call(lambda s: s.admin.ListSchedules, req, retry=True)).schedules)

    async def delete_schedule(self, queue: str, name: str) -> None:
        """Delete a schedule (its jobs already enqueued stay)."""
        req = pb.DeleteScheduleRequest(queue=queue, name=name)
        await self._call(lambda s: s.admin.DeleteSchedule, req)

    async def pause_schedule(self, queue: str, name: str) -> pb.Schedule:
        """Stop a schedule's ticks; those that fall while it is paused are skipped."""
        req = pb.PauseScheduleRequest(queue=queue, name=name, paused=True)
        return (await self._call(lambda s: s.admin.PauseSchedule, req, retry=True)).schedule

    async def resume_schedule(self, queue: str, name: str) -> pb.Schedule:
        """Tick again from now on."""
        req = pb.PauseScheduleRequest(queue=queue, name=name, paused=False)
        return (await self._call(lambda s: s.admin.PauseSchedule, req, retry=True)).schedule


def _job_lease(job_id: int, lease_id: int, result: bytes = b"") -> pb.JobLease:
    return pb.JobLease(job_id=job_id, lease_id=lease_id, result=result)


def _blocking(
    method: Callable[Concatenate[Client, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[SyncClient, P], T]:
    def call(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self._client, *args, **kwargs))

    call.__doc__ = method.__doc__
    call.__name__ = method.__name__
    return call


class SyncClient:
    """The same calls, blocking: an event loop runs on a private thread."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="pq-sync-client", daemon=True
        )
        self._thread.start()

        async def make() -> Client:
            return Client(endpoint, **options)

        self._client = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Close the channel and stop the private loop."""
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    enqueue = _blocking(Client.enqueue)
    enqueue_batch = _blocking(Client.enqueue_batch)
    lease = _blocking(Client.lease)
    ack = _blocking(Client.ack)
    ack_many = _blocking(Client.ack_many)
    nack = _blocking(Client.nack)
    extend = _blocking(Client.extend)
    get_job = _blocking(Client.get_job)
    stats = _blocking(Client.stats)
    create_queue = _blocking(Client.create_queue)
    delete_queue = _blocking(Client.delete_queue)
    list_queues = _blocking(Client.list_queues)
    purge = _blocking(Client.purge)
    get_queue = _blocking(Client.get_queue)
    update_queue = _blocking(Client.update_queue)
    pause_queue = _blocking(Client.pause_queue)
    resume_queue = _blocking(Client.resume_queue)
    list_dead = _blocking(Client.list_dead)
    list_jobs = _blocking(Client.list_jobs)

    def iter_jobs(
        self,
        queue: str,
        state: StateLike,
        *,
        min_priority: int | None = None,
        max_priority: int | None = None,
        group: str = "",
        tenant: str = "",
        page_size: int = 0,
        consistent: bool = False,
    ) -> Iterator[pb.Job]:
        """Every job of ``list_jobs``, reading one page at a time as it goes."""
        token = ""
        while True:
            page = self.list_jobs(
                queue,
                state,
                min_priority=min_priority,
                max_priority=max_priority,
                group=group,
                tenant=tenant,
                page_token=token,
                limit=page_size,
                consistent=consistent,
            )
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def watch(
        self, queues: Iterable[str] = (), **options: Any
    ) -> Generator[pb.WatchEvent, None, None]:
        """``Client.watch``, blocking: each event as it comes (``close()`` it
        to end the stream early)."""
        events = self._client.watch(queues, **options)

        async def next_event() -> pb.WatchEvent:
            return await anext(events)

        async def close() -> None:
            await events.aclose()  # type: ignore[attr-defined]

        try:
            while True:
                try:
                    yield self._run(next_event())
                except StopAsyncIteration:
                    return
        finally:
            self._run(close())

    redrive = _blocking(Client.redrive)
    delete_dead = _blocking(Client.delete_dead)
    complete_job = _blocking(Client.complete_job)
    cancel_job = _blocking(Client.cancel_job)
    requeue_job = _blocking(Client.requeue_job)
    reprioritize_job = _blocking(Client.reprioritize_job)
    node_status = _blocking(Client.node_status)
    put_schedule = _blocking(Client.put_schedule)
    list_schedules = _blocking(Client.list_schedules)
    delete_schedule = _blocking(Client.delete_schedule)
    pause_schedule = _blocking(Client.pause_schedule)
    resume_schedule = _blocking(Client.resume_schedule)
