"""``Guard``: a server's services behind the observer and admission, wrapped
once, without a chain of interceptors.

``pqueue.wire.observe.Observer`` and ``pqueue.wire.admission.Admission`` are
server interceptors; as such, gRPC runs each call through an async chain of
them (a coroutine and a continuation per interceptor per call: about 15 us of
CPU a call for the two, here) only for them to hand back the same wrapped
handler every time. ``Guard`` is the server's one generic handler instead:
services are added to it (``add_QueueServicer_to_server(servicer, guard)``:
it takes the two calls a ``grpc.aio.Server`` takes for that), and for each
call it finds the method's handler and returns it behind admission and the
observer, as the interceptors would (the observer outermost, so a refusal is
logged and counted like any call): wrapped once per method, checked per call
only where a call needs it (the bearer token, before the request is parsed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import grpc

from pqueue.wire.admission import Admission
from pqueue.wire.observe import Observer

Handler: TypeAlias = "grpc.RpcMethodHandler[object, object]"


class Guard(grpc.GenericRpcHandler):
    """Observed and admitted handlers for a server's services (see module doc)."""

    def __init__(self, observer: Observer, admission: Admission) -> None:
        self.observer = observer
        self.admission = admission
        #: Handlers by full method path (``/pqueue.v1.Queue/Enqueue``).
        self._methods: dict[str, Handler] = {}
        #: Services known only by a generic handler of their own, asked in order.
        self._generic: list[grpc.GenericRpcHandler] = []

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, Handler]
    ) -> None:
        """What generated ``add_*_to_server`` functions call: a service's handlers."""
        for name, handler in method_handlers.items():
            self._methods[f"/{service_name}/{name}"] = handler

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]
    ) -> None:
        """Kept for methods not registered by name (generated code registers both)."""
        self._generic.extend(generic_rpc_handlers)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        handler = self._methods.get(method)
        if handler is None:
            for generic in self._generic:
                handler = generic.service(handler_call_details)
                if handler is not None:
                    break
            else:
                return None  # gRPC answers UNIMPLEMENTED; nothing ran
        return self.observer.wrap(method, self.admission.admit(handler_call_details, handler))
