"""The interceptor's pure helpers: who called, and which request id holds."""

from __future__ import annotations

from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.keys import FORWARDED_FOR_KEY, REQUEST_ID_KEY
from pqueue.wire.observe import (
    _ip_of,
    client_ip,
    hop_metadata,
    request_id,
    served_methods,
)


def test_the_peer_string_becomes_an_ip() -> None:
    assert _ip_of("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert _ip_of("ipv6:[::1]:5555") == "::1"
    assert _ip_of("unix:/tmp/sock") == "unix:/tmp/sock"


def test_a_hop_onwards_carries_the_id_and_the_first_caller() -> None:
    assert hop_metadata() == ()  # outside a call: nothing to pass
    rid, ip = request_id.set("abc"), client_ip.set("10.0.0.9")
    try:
        assert hop_metadata() == ((REQUEST_ID_KEY, "abc"), (FORWARDED_FOR_KEY, "10.0.0.9"))
    finally:
        request_id.reset(rid)
        client_ip.reset(ip)


def test_method_labels_come_from_the_contract() -> None:
    methods = served_methods(pb.DESCRIPTOR)
    assert "/pqueue.v1.Queue/Enqueue" in methods
    assert "/pqueue.v1.Admin/NodeStatus" in methods
    assert all(m.count("/") == 2 for m in methods)
