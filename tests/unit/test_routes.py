"""Where each public method goes, and which failed calls may be sent again."""

from __future__ import annotations

from balancer.routes import ROUTES, Kind, route_for
from pqueue.v1 import queue_pb2 as pb


def test_every_public_method_has_a_route() -> None:
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            assert f"/{service.full_name}/{method.name}" in ROUTES


def test_writes_and_leases_lead_and_reads_spread() -> None:
    leader = {r.name for r in ROUTES.values() if r.kind is Kind.LEADER}
    reads = {r.name for r in ROUTES.values() if r.kind is Kind.READ}
    assert {"Enqueue", "EnqueueBatch", "Lease", "Ack", "Nack", "ExtendLease"} <= leader
    assert {"CreateQueue", "DeleteQueue", "PurgeQueue", "Redrive", "DeleteDead"} <= leader
    assert reads == {
        "GetJob",
        "Stats",
        "ListQueues",
        "ListDead",
        "ListJobs",
        "ListSchedules",
        "NodeStatus",
        "StateDigest",
        "Watch",
    }
    assert ROUTES["/pqueue.v1.Queue/Watch"].server_stream


def test_a_consistent_read_goes_to_the_leader() -> None:
    route = ROUTES["/pqueue.v1.Queue/Stats"]
    assert route.kind_of(pb.StatsRequest(queue="q").SerializeToString()) is Kind.READ
    consistent = pb.StatsRequest(queue="q", consistent=True).SerializeToString()
    assert route.kind_of(consistent) is Kind.LEADER
    get = ROUTES["/pqueue.v1.Queue/GetJob"]
    assert (
        get.kind_of(pb.GetJobRequest(job_id=1, consistent=True).SerializeToString()) is Kind.LEADER
    )
    assert get.kind_of(b"\xff\xff") is Kind.READ  # garbage: the node says INVALID_ARGUMENT
    dead = ROUTES["/pqueue.v1.Admin/ListDead"]
    assert dead.kind_of(pb.ListDeadRequest(queue="q").SerializeToString()) is Kind.READ
    consistent_dead = pb.ListDeadRequest(queue="q", consistent=True).SerializeToString()
    assert dead.kind_of(consistent_dead) is Kind.LEADER


def test_only_reads_and_keyed_enqueues_are_sent_again_after_unavailable() -> None:
    enqueue = ROUTES["/pqueue.v1.Queue/Enqueue"]
    keyed = pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=b"x", idempotency_key="k"))
    assert enqueue.retry_unavailable(keyed.SerializeToString())
    assert not enqueue.retry_unavailable(pb.EnqueueRequest(queue="q").SerializeToString())
    batch = ROUTES["/pqueue.v1.Queue/EnqueueBatch"]
    half = pb.EnqueueBatchRequest(
        queue="q", jobs=[pb.JobSpec(idempotency_key="k"), pb.JobSpec(payload=b"no key")]
    )
    assert not batch.retry_unavailable(half.SerializeToString())
    whole = pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec(idempotency_key="k")])
    assert batch.retry_unavailable(whole.SerializeToString())
    for name in ("Lease", "Ack", "Nack", "ExtendLease"):
        assert not ROUTES[f"/pqueue.v1.Queue/{name}"].retry_unavailable(b"")
    assert ROUTES["/pqueue.v1.Queue/Stats"].retry_unavailable(b"")


def test_an_unknown_method_of_a_public_service_leads_and_anything_else_is_refused() -> None:
    newer = route_for("/pqueue.v1.Queue/SomethingNewer")
    assert newer is not None
    assert newer.kind is Kind.LEADER
    assert not newer.retry_unavailable(b"")
    assert route_for("/pqueue.v1.Peer/Send") is None  # node-to-node only
    assert route_for("/other.Service/Call") is None


def test_a_long_poll_may_wait_its_wait_before_its_leader_is_suspected() -> None:
    lease = ROUTES["/pqueue.v1.Queue/Lease"]
    assert lease.waits_s(pb.LeaseRequest(queue="q", wait_ms=20_000).SerializeToString()) == 20.0
    assert lease.waits_s(pb.LeaseRequest(queue="q", wait_ms=-5).SerializeToString()) == 0.0
    assert lease.waits_s(b"\xff") == 0.0  # undecodable: the node will say why
    enqueue = ROUTES["/pqueue.v1.Queue/Enqueue"]
    assert enqueue.waits_s(pb.EnqueueRequest(queue="q").SerializeToString()) == 0.0


def test_a_client_submit_is_sent_again_after_unavailable_only_if_all_keyed_enqueues() -> None:
    submit = ROUTES["/pqueue.v1.Queue/Submit"]
    keyed = pb.Operation(enqueue=pb.EnqueueRequest(job=pb.JobSpec(idempotency_key="k")))
    unkeyed = pb.Operation(enqueue=pb.EnqueueRequest(job=pb.JobSpec(payload=b"x")))
    ack = pb.Operation(ack=pb.AckRequest(queue="q"))
    assert submit.kind is Kind.LEADER
    assert not submit.op_field  # proxied as it is
    assert submit.retry_unavailable(pb.SubmitRequest(ops=[keyed, keyed]).SerializeToString())
    for ops in ([keyed, unkeyed], [keyed, ack], []):
        assert not submit.retry_unavailable(pb.SubmitRequest(ops=ops).SerializeToString())
    assert not submit.retry_unavailable(b"\xff")


def test_single_job_writes_may_ride_in_a_submit_and_consume_and_submit_stream_are_streams() -> None:
    riders = {r.name: r.op_field for r in ROUTES.values() if r.op_field}
    fields = pb.Operation.DESCRIPTOR.fields_by_name
    assert riders == {
        "Enqueue": fields["enqueue"].number,
        "Ack": fields["ack"].number,
        "Nack": fields["nack"].number,
        "ExtendLease": fields["extend"].number,
    }
    assert {r.name for r in ROUTES.values() if r.streaming} == {"Consume", "SubmitStream"}
    assert ROUTES["/pqueue.v1.Queue/Consume"].kind is Kind.LEADER
    assert ROUTES["/pqueue.v1.Queue/SubmitStream"].kind is Kind.LEADER
    assert not ROUTES["/pqueue.v1.Queue/SubmitStream"].merges  # carried, not coalesced
