"""Every call a server takes, counted, timed and logged, in one interceptor.

Node and balancer both install ``Observer``. For each call it

- logs one request line when the call arrives and, if the call fails, one
  error line when it ends (``pqueue.wire.logs`` gives the format);
- counts it by service, method and final status code, and times it, on the
  server's own registry (``pq_grpc_server_handled_total``,
  ``pq_grpc_server_handling_seconds``);
- gives it a request id: the caller's ``x-request-id``, or a new one. The id
  is held in a context variable for the call's task, so a hop onwards (the
  balancer's proxy, a follower forwarding to the leader) passes it on;
- names the client: the connection's address, or the address a hop passes
  on (``x-forwarded-for``) when the hop proves it is one (``hops``: a
  ``pq-forwarder-token`` with the ``balancer`` or ``peer`` role). An address
  nobody vouches for is logged as ``claimed_client``, never as the client.

Health checks, load probes, reflection and peer traffic log at DEBUG: they
are machines talking, several times a second. Method labels come from the
methods actually served, so a caller cannot grow them: an unknown name is
``unknown``.

Over 400 lines on purpose: one interceptor, wrapping four call shapes alike.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

from pqueue.wire.keys import (
    FORWARDED_FOR_KEY,
    FORWARDED_KEY,
    FORWARDER_TOKEN_KEY,
    REQUEST_ID_KEY,
)

#: Longest request id taken from a caller (longer ones are replaced).
MAX_REQUEST_ID_CHARS = 64
#: Longest claimed client address kept for a log line.
MAX_CLAIM_CHARS = 64

#: Whether a call's ``pq-forwarder-token`` proves it comes from a hop.
HopCheck = Callable[[str], bool]

#: The request id of the call being served by this task ("" outside a call).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("pq_request_id", default="")
#: The original caller's IP of the call being served ("" outside a call).
client_ip: contextvars.ContextVar[str] = contextvars.ContextVar("pq_client_ip", default="")
#: The route of the call being served ("" outside a call).
call_route: contextvars.ContextVar[str] = contextvars.ContextVar("pq_call_route", default="")


def log_op_failure(index: int, kind: str, code: str, message: str) -> None:
    """The error line of one operation of a ``Submit`` (or a stream's settle)
    that failed alone: the call itself answers OK, so without this line a
    refused enqueue would leave no error line. Same level and shape as a
    call's error line, the operation named where the duration would be."""
    if logger.isEnabledFor(logging.ERROR):
        rid = request_id.get()
        logger.error(
            "%s: %s (request_id=%s, op %d, %s)",
            code,
            message or "-",
            rid,
            index,
            kind,
            extra={"route": call_route.get() or "-", "request_id": rid, "code": code},
        )


def log_stream_request(name: str, submit_id: int, ops: int) -> None:
    """The request line of one request read on a stream whose every message
    is a request of its own (``SubmitStream``): as a call's, the stream's
    request id with the message's id after a slash."""
    if logger.isEnabledFor(logging.INFO):
        rid = request_id.get()
        ip = client_ip.get()
        logger.info(
            "Received %s request %s/%d (%d ops) from IP: %s",
            name,
            rid,
            submit_id,
            ops,
            ip,
            extra={"route": call_route.get() or "-", "request_id": rid, "client_ip": ip},
        )


_QUIET_SERVICES = frozenset(
    (
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name,
        "pqueue.v1.Peer",
    )
)
_QUIET_METHODS = frozenset(("/pqueue.v1.Admin/NodeStatus", "/pqueue.v1.Balancer/Status"))

#: Latency buckets: sub-millisecond reads up to a minute-long poll.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)

logger = logging.getLogger("pqueue.requests")

# No ``*_created`` series: they double every counter and histogram and no
# dashboard of ours reads them (Prometheus detects counter resets itself).
disable_created_metrics()  # type: ignore[no-untyped-call]

Context = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Behaviour = Callable[..., Any]  # the stubs type behaviours as sync; ours are async


class GrpcMetrics:
    """Calls by service, method and code, and their latency, on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter(
            "pq_grpc_server_handled_total",
            "Calls finished, by service, method and status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "pq_grpc_server_handling_seconds",
            "Time from a call's arrival to its answer, by service and method.",
            ["service", "method"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )


_REQUEST_ID_RE = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_CHARS}}}")


def new_request_id() -> str:
    """A fresh request id: 16 hex digits (64 random bits: ids tell calls
    apart in the logs, they guard nothing, so no system entropy per call)."""
    return f"{random.getrandbits(64):016x}"


def _ip_of(peer: str) -> str:
    """``ipv4:1.2.3.4:5`` -> ``1.2.3.4``; ``ipv6:[::1]:5`` -> ``::1``; else as is."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


_HEADERS = frozenset((REQUEST_ID_KEY, FORWARDED_FOR_KEY, FORWARDED_KEY, FORWARDER_TOKEN_KEY))


def _headers(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """The first value of each header the observer reads, in one pass."""
    found: dict[str, str] = {}
    for k, v in metadata or ():
        if k in _HEADERS and k not in found and isinstance(v, str):
            found[k] = v
    return found


def never_a_hop(token: str) -> bool:
    """For the first hop (the balancer): no caller's forwarded address is believed."""
    return False


def hop_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata for a hop onwards from the call this task serves: its id and caller."""
    rid, ip = request_id.get(), client_ip.get()
    out: list[tuple[str, str]] = []
    if rid:
        out.append((REQUEST_ID_KEY, rid))
    if ip:
        out.append((FORWARDED_FOR_KEY, ip))
    return tuple(out)


class _Call:
    """One call's bookkeeping: start, request line, outcome."""

    __slots__ = (
        "claimed",
        "ip",
        "method",
        "name",
        "observer",
        "quiet",
        "rid",
        "service",
        "started",
    )

    def __init__(
        self, observer: Observer, method: _Method, metadata: Any, context: Context
    ) -> None:
        self.observer = observer
        self.method = method
        self.service, self.name, self.quiet = method.service, method.name, method.quiet
        self.started = time.perf_counter()
        headers = _headers(metadata)
        rid = headers.get(REQUEST_ID_KEY, "")
        self.rid = rid if _REQUEST_ID_RE.fullmatch(rid) else new_request_id()
        # The first caller, as a balancer or a forwarding follower saw it: any
        # client can send these headers, so they are believed only from a hop
        # that proves it is one; else the line says the address is claimed.
        ip = _ip_of(context.peer() or "")
        claimed = headers.get(FORWARDED_FOR_KEY, "").split(",")[0].strip()
        claimed = claimed[:MAX_CLAIM_CHARS]
        onward = ip
        if claimed:
            hops = observer.hops
            if hops is None:  # auth off: informational, passed on as a claim
                onward = claimed
            elif headers.get(FORWARDED_KEY) and hops(headers.get(FORWARDER_TOKEN_KEY, "")):
                ip, onward, claimed = claimed, claimed, ""
        self.ip = ip
        self.claimed = claimed if claimed != ip else ""  # nothing to doubt
        request_id.set(self.rid)
        client_ip.set(onward)
        call_route.set(method.route)

    @property
    def route(self) -> str:
        return self.method.route

    def received(self) -> None:
        level = logging.DEBUG if self.quiet else logging.INFO
        if not logger.isEnabledFor(level):
            return
        uri = f"{self.method.uri(self.observer.authority)}{self.rid}"
        extra = {
            "route": self.route,
            "request_id": self.rid,
            "client_ip": self.ip,
            "grpc_method": self.method.path,
        }
        if self.claimed:
            extra["claimed_client"] = self.claimed
            logger.log(
                level,
                "Received %s request for %s from IP: %s claimed_client=%s",
                self.name,
                uri,
                self.ip,
                self.claimed,
                extra=extra,
            )
            return
        logger.log(
            level, "Received %s request for %s from IP: %s", self.name, uri, self.ip, extra=extra
        )

    def finished(
        self, code: grpc.StatusCode, details: str, exc: BaseException | None = None
    ) -> None:
        elapsed = time.perf_counter() - self.started
        handled, seconds = self.observer.children(self.service, self.name, code)
        handled.inc()
        seconds.observe(elapsed)
        if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            return  # a caller that went away is not an error here
        level = logging.DEBUG if self.quiet else logging.ERROR
        if logger.isEnabledFor(level):
            logger.log(
                level,
                "%s: %s (request_id=%s, %.1f ms)",
                code.name,
                details or "-",
                self.rid,
                elapsed * 1000,
                exc_info=exc,
                extra={
                    "route": self.route,
                    "request_id": self.rid,
                    "code": code.name,
                    "duration_ms": round(elapsed * 1000, 3),
                },
            )

    def outcome(self, context: Context, exc: BaseException | None) -> None:
        """Work out the final status from how the behaviour ended."""
        remaining = context.time_remaining()
        late = remaining is not None and remaining <= 0
        unexpected = None
        if exc is None:
            code = context.code() or grpc.StatusCode.OK
        elif isinstance(exc, grpc.aio.AbortError):
            code = context.code() or grpc.StatusCode.UNKNOWN
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            # gRPC cancels the call's task when its deadline passes, or when
            # the client goes away (a stream left mid-write is closed).
            code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
        elif late:
            code = grpc.StatusCode.DEADLINE_EXCEEDED  # too late even to answer
        else:
            code, unexpected = grpc.StatusCode.UNKNOWN, exc  # a bug: the line carries it
        details = ""
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            details = "the caller's deadline passed"
        elif code is not grpc.StatusCode.OK:
            details = context.details() or (str(exc) if exc is not None else "")
        self.finished(code, details if isinstance(details, str) else repr(details), unexpected)


class _Method:
    """What the observer knows of one method path, worked out once."""

    __slots__ = ("_uri", "name", "path", "quiet", "route", "service")

    def __init__(self, observer_name: str, path: str, known: bool) -> None:
        self.path = path
        self.service, _, self.name = path.lstrip("/").partition("/")
        self.quiet = self.service in _QUIET_SERVICES or path in _QUIET_METHODS
        if not known:
            self.service, self.name = "unknown", "unknown"
        #: Who serves and what: ``n1/pqueue.v1.Queue/Enqueue``.
        self.route = f"{observer_name}{path}"
        self._uri = ""

    def uri(self, authority: Callable[[], str]) -> str:
        """``grpc://<authority><path>?request_id=`` (the authority read at the
        first request line: a server's address is fixed once it serves)."""
        if not self._uri:
            self._uri = f"grpc://{authority()}{self.path}?request_id="
        return self._uri


class Observer(grpc.aio.ServerInterceptor):
    """Logs, counts and times every call; see the module docstring."""

    def __init__(
        self,
        name: str,
        authority: Callable[[], str],
        metrics: GrpcMetrics,
        known_methods: Iterable[str],
        hops: HopCheck | None = None,
    ) -> None:
        #: Who serves: ``n1``, ``balancer``. Prefixes every request route.
        self.name = name
        #: Which callers' ``x-forwarded-for`` is believed (see ``trusted_hops``);
        #: None: auth is off, a forwarded address is logged as claimed.
        self.hops = hops
        self.authority = authority
        self.metrics = metrics
        self.known_methods = frozenset(known_methods)
        #: Metric children by (service, method, code): ``labels()`` is not free.
        self._children: dict[tuple[str, str, grpc.StatusCode], tuple[Any, Any]] = {}
        self._cache: dict[str, tuple[Handler, Handler]] = {}

    def method(self, path: str) -> _Method:
        """What a method's calls share (an unknown one's is made per call:
        a caller must not grow what the server keeps)."""
        return _Method(self.name, path, path in self.known_methods)

    def children(self, service: str, method: str, code: grpc.StatusCode) -> tuple[Any, Any]:
        """The counter and histogram children for one outcome (bounded: known methods)."""
        key = (service, method, code)
        found = self._children.get(key)
        if found is None:
            found = (
                self.metrics.handled.labels(service, method, code.name),
                self.metrics.seconds.labels(service, method),
            )
            self._children[key] = found
        return found

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # gRPC answers UNIMPLEMENTED; nothing ran
        return self.wrap(handler_call_details.method, handler)

    def wrap(self, method: str, handler: Handler) -> Handler:
        """``handler`` observed: wrapped once per method (known methods only)."""
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        if method in self.known_methods:
            self._cache[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        parse = _lenient(handler.request_deserializer)
        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            behaviour = self._behaviour(method, handler.unary_unary, streaming=False)
            return grpc.unary_unary_rpc_method_handler(behaviour, parse, serialize)
        if handler.unary_stream is not None:
            behaviour = self._behaviour(method, handler.unary_stream, streaming=False)
            return grpc.unary_stream_rpc_method_handler(behaviour, parse, serialize)
        if handler.stream_unary is not None:
            behaviour = self._behaviour(method, handler.stream_unary, streaming=True)
            return grpc.stream_unary_rpc_method_handler(behaviour, parse, serialize)
        assert handler.stream_stream is not None
        behaviour = self._behaviour(method, handler.stream_stream, streaming=True)
        return grpc.stream_stream_rpc_method_handler(behaviour, parse, serialize)

    def _behaviour(self, path: str, inner: Behaviour, streaming: bool) -> Behaviour:
        """Wrap a behaviour, whether it returns, or yields its responses."""
        method = self.method(path)

        def checked(request: Any, context: Context) -> Any:
            return _checked_stream(request, context) if streaming else request

        if inspect.isasyncgenfunction(inner):

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                call = _Call(self, method, context.invocation_metadata(), context)
                call.received()
                error: BaseException | None = None
                try:
                    await _refuse_malformed(request, context)
                    async for response in inner(checked(request, context), context):
                        yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    call.outcome(context, error)

            return stream

        async def unary(request: Any, context: Context) -> Any:
            call = _Call(self, method, context.invocation_metadata(), context)
            call.received()
            error: BaseException | None = None
            try:
                await _refuse_malformed(request, context)
                return await inner(checked(request, context), context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                call.outcome(context, error)

        return unary


class _Malformed:
    """What a request that would not parse becomes (gRPC would answer INTERNAL)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if parse is None:
        return None  # raw bytes (the balancer's proxy): nothing to parse

    def lenient(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:
            return _Malformed(exc)

    return lenient


async def _refuse_malformed(request: Any, context: Context) -> None:
    if isinstance(request, _Malformed):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid message of this method: {request.error}",
        )


async def _checked_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    """A stream's messages, less those that do not parse (dropped, and said so).

    Aborting mid-stream while the client still writes ends the call with an
    INTERNAL error from gRPC's core, so a bad message is dropped instead, as
    the peer protocol drops any message it cannot use."""
    async for item in requests:
        if isinstance(item, _Malformed):
            logger.warning("dropped a stream message that does not parse: %s", item.error)
            continue
        yield item


def served_methods(*descriptors: Any) -> frozenset[str]:
    """Full method paths (``/pkg.Service/Method``) of the given file descriptors'
    services, and of health and reflection, which every server of ours serves."""
    return frozenset(
        f"/{service.full_name}/{m.name}"
        for d in (*descriptors, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        for service in d.services_by_name.values()
        for m in service.methods
    )
