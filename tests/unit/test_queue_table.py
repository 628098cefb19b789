"""The machine's queue table: pages of one tenant's queues, kept through deletes and snapshots."""

from __future__ import annotations

from pqueue.core import snapshot
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver


def _names(
    d: Driver, tenant: str | None, after: str = "", limit: int = 100
) -> tuple[list[str], str]:
    stats, last = d.m.stats_page(tenant, after, limit, d.now)
    return [s.queue for s in stats], last


def test_a_tenants_page_holds_only_its_queues_in_order() -> None:
    d = Driver()
    for name in ("b/q2", "a/q3", "a/q1", "b/q1", "a/q2", "plain"):
        d.create(name)
    assert _names(d, "a") == (["a/q1", "a/q2", "a/q3"], "")
    assert _names(d, "a", limit=2) == (["a/q1", "a/q2"], "a/q2")
    assert _names(d, "a", after="a/q2", limit=2) == (["a/q3"], "")
    assert _names(d, "c") == ([], "")
    assert _names(d, "") == (["plain"], "")  # names without a tenant
    assert _names(d, None, limit=4) == (["a/q1", "a/q2", "a/q3", "b/q1"], "b/q1")
    infos, last = d.m.queues_page("b", "", 1, d.now)
    assert ([i.queue for i in infos], last) == (["b/q1"], "b/q1")


def test_the_index_follows_deletes_and_snapshots() -> None:
    d = Driver()
    for name in ("a/q1", "a/q2", "b/q1"):
        d.create(name)
    d.ok(delete_queue=pb.DeleteQueueRequest(queue="a/q1"))
    assert _names(d, "a") == (["a/q2"], "")
    assert d.m.queues.held_by("a") == 1
    restored = Driver(snapshot.restore(snapshot.snapshot_bytes(d.m)))
    assert _names(restored, "a") == (["a/q2"], "")
    assert _names(restored, None) == (["a/q2", "b/q1"], "")
    restored.ok(delete_queue=pb.DeleteQueueRequest(queue="b/q1"))
    assert _names(restored, "b") == ([], "")
    assert restored.m.queues.held_by("b") == 0
