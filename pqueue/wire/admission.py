"""Admission: what a server checks before it parses a request.

Node and balancer install ``Admission`` as a server interceptor, after
``pqueue.wire.observe.Observer`` (so a refusal is logged and counted like any
other call). For each method it

- caps the request's encoded size *before* parsing: gRPC hands the
  deserializer the whole message, already decompressed, so ``len(data)``
  is the decompressed size. A request over its method's cap is answered
  ``RESOURCE_EXHAUSTED`` and never parsed; the caps (``request_caps``) are a
  few KiB for calls that carry ids and names, and the payload limit plus a
  little for enqueues. The peer service keeps its own, larger cap.
  The balancer proxies raw bytes: it gets the same caps on ``len``.
- refuses unknown fields (``INVALID_ARGUMENT`` naming the field path) in
  every request of the public services, so nothing a node does not
  understand reaches the log (a 1-byte enqueue padded with 32 MiB of
  unknown fields used to be stored and replicated whole).
- bounds concurrent ``Health.Watch`` streams per server and per client IP:
  they need no credentials, so without a bound they hold memory and tasks
  without limit. Past the bound: ``RESOURCE_EXHAUSTED``.

- with auth on, refuses a call of the public services whose bearer
  token is missing or not valid (``UNAUTHENTICATED``) before its request is
  parsed: a stranger's 60 MiB request used to be parsed before anyone
  looked at its token (the peer service checks its own before it reads a
  message, and says why it refused). Roles and tenants are still the servicer's to check
  (they need the queue name), from the same verifier's cache.
- on a node, refuses a call whose ``pq-cluster`` metadata names another
  cluster than the node's (``UNAVAILABLE``, ``NOT_TAKEN``, cause
  ``WRONG_CLUSTER``; the SDK's look-aside calls carry the cluster their
  balancer named): first of all, before the token, which is the other
  cluster's and may mean nothing here.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

import grpc
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_health.v1 import health_pb2

from pqueue.errors import InvalidArgumentError, NotTakenError, UnauthenticatedError
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire import sizes as limits
from pqueue.wire.keys import CLUSTER_KEY, WRONG_CLUSTER, bearer, value_of
from pqueue.wire.status import to_status

logger = logging.getLogger(__name__)


class TokenVerifier(Protocol):
    """What admission needs of the node's verifier (``pqueue.node.auth.Verifier``)."""

    def verify(self, token: str) -> object:
        """The token's principal; ``UnauthenticatedError`` if it is not valid now."""
        ...


Context = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Behaviour = Callable[..., Any]

KIB = 1 << 10
#: Room for a request's names, ids and flags (queue names are <= 128
#: characters after a tenant's, texts are checked in characters: 4 bytes each).
SMALL_REQUEST_BYTES = 16 * KIB
#: Everything of an ``Enqueue`` but the payload (keys, group, delays).
ENQUEUE_OVERHEAD_BYTES = 64 * KIB
#: Any method not listed (health, reflection, the balancer's status).
DEFAULT_REQUEST_BYTES = 64 * KIB

HEALTH_WATCH = "/" + health_pb2.DESCRIPTOR.services_by_name["Health"].full_name + "/Watch"
#: Concurrent ``Health.Watch`` streams one server holds, and one client IP may hold.
MAX_HEALTH_WATCHES = 1024
MAX_HEALTH_WATCHES_PER_IP = 32

PEER_SEND = "/pqueue.v1.Peer/Send"
_Q = "/pqueue.v1.Queue/"
_A = "/pqueue.v1.Admin/"


def request_caps() -> dict[str, int]:
    """The largest encoded request each public method takes, in bytes."""
    ids = limits.MAX_BATCH_JOBS * 11  # a repeated uint64: up to 10 bytes each, packed
    return {
        _Q + "Enqueue": limits.MAX_PAYLOAD_BYTES_LIMIT + ENQUEUE_OVERHEAD_BYTES,
        _Q + "EnqueueBatch": limits.MAX_MESSAGE_BYTES,
        _Q + "Lease": SMALL_REQUEST_BYTES,
        # Each lease may carry a result.
        _Q + "Ack": limits.MAX_MESSAGE_BYTES,
        _Q + "Nack": limits.MAX_REASON_CHARS * 4 + SMALL_REQUEST_BYTES,
        _Q + "ExtendLease": SMALL_REQUEST_BYTES,
        _Q + "GetJob": SMALL_REQUEST_BYTES,
        _Q + "Stats": SMALL_REQUEST_BYTES,
        _Q + "Submit": limits.MAX_MESSAGE_BYTES,
        # Each message of the stream: a Submit's operations and an id.
        _Q + "SubmitStream": limits.MAX_MESSAGE_BYTES,
        # Each message of the stream: a start, credits, and settlements.
        _Q + "Consume": limits.MAX_MESSAGE_BYTES,
        # Up to 1000 queue names of at most 128 characters after a tenant's.
        _Q + "Watch": 1000 * 260 + SMALL_REQUEST_BYTES,
        _A + "CreateQueue": DEFAULT_REQUEST_BYTES,
        _A + "DeleteQueue": SMALL_REQUEST_BYTES,
        _A + "ListQueues": SMALL_REQUEST_BYTES,
        _A + "PurgeQueue": SMALL_REQUEST_BYTES,
        _A + "ListDead": SMALL_REQUEST_BYTES,
        _A + "Redrive": 10 * ids + SMALL_REQUEST_BYTES,
        _A + "DeleteDead": 10 * ids + SMALL_REQUEST_BYTES,
        _A + "UpdateQueue": DEFAULT_REQUEST_BYTES,
        _A + "PauseQueue": SMALL_REQUEST_BYTES,
        _A + "ResumeQueue": SMALL_REQUEST_BYTES,
        _A + "CompleteJob": limits.MAX_RESULT_BYTES_LIMIT + SMALL_REQUEST_BYTES,
        _A + "CancelJob": SMALL_REQUEST_BYTES,
        _A + "RequeueJob": SMALL_REQUEST_BYTES,
        _A + "ReprioritizeJob": SMALL_REQUEST_BYTES,
        _A + "ListJobs": SMALL_REQUEST_BYTES,
        _A + "PutSchedule": limits.MAX_PAYLOAD_BYTES_LIMIT + ENQUEUE_OVERHEAD_BYTES,
        _A + "ListSchedules": SMALL_REQUEST_BYTES,
        _A + "DeleteSchedule": SMALL_REQUEST_BYTES,
        _A + "PauseSchedule": SMALL_REQUEST_BYTES,
        _A + "NodeStatus": SMALL_REQUEST_BYTES,
        _A + "StateDigest": SMALL_REQUEST_BYTES,
        PEER_SEND: limits.MAX_PEER_MESSAGE_BYTES,
    }


def _public_methods() -> frozenset[str]:
    return frozenset(
        f"/{s.full_name}/{m.name}"
        for s in pb.DESCRIPTOR.services_by_name.values()
        for m in s.methods
    )


@dataclass(frozen=True)
class AdmissionConfig:
    """Per-method request caps and stream bounds."""

    #: Largest encoded (decompressed) request per full method name.
    caps: Mapping[str, int] = field(default_factory=request_caps)
    #: Cap of a method not in ``caps``.
    default_cap_bytes: int = DEFAULT_REQUEST_BYTES
    #: Methods whose requests may carry no unknown fields.
    strict_methods: frozenset[str] = field(default_factory=_public_methods)
    max_health_watches: int = MAX_HEALTH_WATCHES
    max_health_watches_per_ip: int = MAX_HEALTH_WATCHES_PER_IP

    def validate(self) -> None:
        """Raise ``ValueError`` on a bound that would refuse everything."""
        if self.default_cap_bytes <= 0 or any(c <= 0 for c in self.caps.values()):
            raise ValueError("request caps must be positive")
        if self.max_health_watches <= 0 or self.max_health_watches_per_ip <= 0:
            raise ValueError("health watch bounds must be positive")

    def cap(self, method: str) -> int:
        """The cap of one method."""
        return self.caps.get(method, self.default_cap_bytes)


class _Refused:
    """A request refused before parsing; the behaviour answers with its status."""

    __slots__ = ("code", "details")

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details


def has_unknown_fields(message: Message) -> bool:
    """Whether ``message``, or any message inside it, carries a field this
    release does not know. The protobuf runtime does the walk (on a copy: a
    100-job batch costs about 15 us here, where a walk in Python cost 200)."""
    probe = type(message)()
    probe.CopyFrom(message)
    size = probe.ByteSize()
    probe.DiscardUnknownFields()
    return probe.ByteSize() != size


class OversizeRequestError(ValueError):
    """A streamed message over its method's cap (the stream drops it)."""


#: Why a field this server does not know is refused (after the field's path).
UNKNOWN_FIELD = (
    "unknown field (this server does not know it, and stores nothing it does not know); "
    "remove it or upgrade the cluster first"
)


def check_known_fields(message: Message) -> None:
    """INVALID_ARGUMENT naming the first unknown field of ``message``, if it
    has one: for a stream's messages, which admission does not parse."""
    path = unknown_field_path(message)
    if path is not None:
        raise InvalidArgumentError(path, UNKNOWN_FIELD)


def unknown_field_path(message: Message, prefix: str = "") -> str | None:
    """Where the first unknown field of ``message`` is (``jobs[2].#1007``), or None."""
    if not prefix and not has_unknown_fields(message):
        return None  # the common case, at C speed; the walk below only names the field
    unknown = UnknownFieldSet(message)
    if len(unknown):
        return f"{prefix}#{unknown[0].field_number}"
    for fd, value in message.ListFields():
        if fd.message_type is None:
            continue
        name = prefix + fd.name
        if fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].message_type is None:
                continue
            items: Iterable[tuple[str, Message]] = ((f"[{k!r}]", v) for k, v in value.items())
        elif fd.is_repeated:
            items = ((f"[{i}]", v) for i, v in enumerate(value))
        else:
            items = (("", value),)
        for suffix, child in items:
            found = unknown_field_path(child, f"{name}{suffix}.")
            if found is not None:
                return found
    return None


def _ip_of(peer: str) -> str:
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class Admission(grpc.aio.ServerInterceptor):
    """Caps request sizes before parsing, refuses unknown fields, bounds watches."""

    def __init__(
        self,
        config: AdmissionConfig | None = None,
        verifier: TokenVerifier | None = None,
        cluster_id: Callable[[], str] | None = None,
    ) -> None:
        self.config = config or AdmissionConfig()
        self.config.validate()
        #: Checks tokens before parsing; None: auth is off (or not this server's).
        self.verifier = verifier
        #: A node's cluster id (read per call that names one); None: a
        #: server of no cluster (the balancer), which checks no ``pq-cluster``.
        self.cluster_id = cluster_id
        # Not ``Peer.Send``: the peer service checks its token itself before it
        # reads a single message (a client stream is parsed as it is read), and
        # says why it refused (throttled): a node whose token expired or was
        # revoked is otherwise refused here in silence (peer calls log at DEBUG).
        self._authenticated = self.config.strict_methods
        #: Open ``Health.Watch`` streams, in all and by client IP.
        self.watches = 0
        self.watches_by_ip: Counter[str] = Counter()
        self._cache: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self.admit(handler_call_details, handler)

    def admit(self, details: grpc.HandlerCallDetails, handler: Handler) -> Handler:
        """The handler one call gets: ``handler`` behind admission (wrapped
        once per method), or one that refuses the call's missing or bad token."""
        method = details.method
        if self.cluster_id is not None:
            named = value_of(details.invocation_metadata, CLUSTER_KEY)
            if named and named != self.cluster_id():
                # Only what the caller sent: it may hold no token of ours.
                refusal = NotTakenError(
                    f"this node is not of cluster {named!r}, which the call names: "
                    "send it through that cluster's balancer",
                    cause=WRONG_CLUSTER,
                )
                return _refusing_with(handler, to_status(refusal))
        if self.verifier is not None and method in self._authenticated:
            try:
                self.verifier.verify(bearer(details.invocation_metadata))
            except UnauthenticatedError as exc:
                return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        if len(self._cache) < 1024:  # names come from served methods or the balancer's routes
            self._cache[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        cap = self.config.cap(method)
        strict = method in self.config.strict_methods
        serialize = handler.response_serializer
        streamed_requests = handler.stream_unary is not None or handler.stream_stream is not None
        parse = _capped(method, cap, handler.request_deserializer, streamed_requests)
        if handler.unary_unary is not None:
            behaviour = _unary(handler.unary_unary, strict)
            return grpc.unary_unary_rpc_method_handler(behaviour, parse, serialize)
        if handler.unary_stream is not None:
            inner = handler.unary_stream
            if method == HEALTH_WATCH:
                inner = self._bounded_watch(inner)
            return grpc.unary_stream_rpc_method_handler(_streaming(inner, strict), parse, serialize)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(handler.stream_unary, parse, serialize)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(handler.stream_stream, parse, serialize)

    def _bounded_watch(self, inner: Behaviour) -> Behaviour:
        """``Health.Watch`` held to ``max_health_watches`` (and per IP)."""
        config = self.config

        async def admit(context: Context) -> str:
            ip = _ip_of(context.peer() or "")
            if self.watches >= config.max_health_watches:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this server holds its limit of {config.max_health_watches} health watches",
                )
            if self.watches_by_ip[ip] >= config.max_health_watches_per_ip:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{ip} holds its limit of {config.max_health_watches_per_ip} health watches",
                )
            self.watches += 1
            self.watches_by_ip[ip] += 1
            return ip

        def release(ip: str) -> None:
            self.watches -= 1
            self.watches_by_ip[ip] -= 1
            if self.watches_by_ip[ip] <= 0:
                del self.watches_by_ip[ip]

        if inspect.isasyncgenfunction(inner):

            async def watch_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                ip = await admit(context)
                try:
                    async for response in inner(request, context):
                        yield response
                finally:
                    release(ip)

            return watch_stream

        async def watch(request: Any, context: Context) -> Any:
            ip = await admit(context)
            try:
                return await inner(request, context)
            finally:
                release(ip)

        return watch


def _refusing(handler: Handler, code: grpc.StatusCode, details: str) -> Handler:
    """A handler of ``handler``'s shape that parses nothing and answers ``code``."""

    async def refuse(request: Any, context: Context) -> None:
        await context.abort(code, details)

    return _answering(handler, refuse)


def _refusing_with(handler: Handler, status: grpc.Status) -> Handler:
    """``_refusing``, answering ``status`` (its rich details too)."""

    async def refuse(request: Any, context: Context) -> None:
        await context.abort_with_status(status)

    return _answering(handler, refuse)


def _answering(handler: Handler, refuse: Callable[[Any, Context], Awaitable[None]]) -> Handler:
    """A handler of ``handler``'s shape that parses nothing and runs ``refuse``."""

    def discard(data: bytes) -> None:
        return None

    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, discard, serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse, discard, serialize)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, discard, serialize)
    return grpc.stream_stream_rpc_method_handler(refuse, discard, serialize)


def _capped(
    method: str, cap: int, parse: Callable[[bytes], Any] | None, streamed: bool
) -> Callable[[bytes], Any]:
    """A deserializer that looks at the length first (raw bytes pass when ``parse`` is None)."""
    name = method.rsplit("/", 1)[-1]

    def deserialize(data: bytes) -> Any:
        if len(data) > cap:
            details = f"a {name} request may be at most {cap} bytes, this one has {len(data)}"
            if streamed:  # the observer drops a stream message that does not parse
                raise OversizeRequestError(details)
            return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, details)
        return data if parse is None else parse(data)

    return deserialize


async def _admit(request: Any, context: Context, strict: bool) -> None:
    if isinstance(request, _Refused):
        await context.abort(request.code, request.details)
    if strict and isinstance(request, Message):
        path = unknown_field_path(request)
        if path is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: {UNKNOWN_FIELD}")


def _unary(inner: Behaviour, strict: bool) -> Behaviour:
    async def unary(request: Any, context: Context) -> Any:
        await _admit(request, context, strict)
        return await inner(request, context)

    return unary


def _streaming(inner: Behaviour, strict: bool) -> Behaviour:
    if inspect.isasyncgenfunction(inner):

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            await _admit(request, context, strict)
            async for response in inner(request, context):
                yield response

        return stream

    async def writer(request: Any, context: Context) -> Any:
        await _admit(request, context, strict)
        return await inner(request, context)

    return writer
