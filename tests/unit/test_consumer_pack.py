"""How a stream's message packs acks: one ``Ack`` per queue, the rest as they are."""

from __future__ import annotations

import asyncio

from pqueue.consumer import _Settle, pack
from pqueue.v1 import queue_pb2 as pb


def _ack(queue: str, *job_ids: int) -> pb.Operation:
    leases = [pb.JobLease(job_id=j, lease_id=j + 100) for j in job_ids]
    return pb.Operation(ack=pb.AckRequest(queue=queue, leases=leases))


def _settles(*ops: pb.Operation) -> list[_Settle]:
    loop = asyncio.new_event_loop()
    try:
        return [_Settle(op, loop.create_future()) for op in ops]
    finally:
        loop.close()


def test_acks_of_one_queue_become_one_ack_and_the_rest_keep_their_place() -> None:
    nack = pb.Operation(nack=pb.NackRequest(queue="a", job_id=9, lease_id=109))
    settles = _settles(_ack("a", 1), _ack("b", 2), nack, _ack("a", 3, 4), _ack("b", 5))
    ops, groups = pack(settles)
    assert [op.WhichOneof("op") for op in ops] == ["ack", "ack", "nack"]
    assert [(op.ack.queue, [lease.job_id for lease in op.ack.leases]) for op in ops[:2]] == [
        ("a", [1, 3, 4]),
        ("b", [2, 5]),
    ]
    assert groups == [[settles[0], settles[3]], [settles[1], settles[4]], [settles[2]]]
    assert len(settles[0].op.ack.leases) == 1  # the callers' own operations are untouched


def test_an_ack_refused_packed_goes_alone() -> None:
    settles = _settles(_ack("a", 1), _ack("a", 2))
    settles[1].packable = False
    ops, groups = pack(settles)
    assert len(ops) == 2
    assert groups == [[settles[0]], [settles[1]]]


def test_a_packed_ack_holds_at_most_a_thousand_leases() -> None:
    settles = _settles(_ack("a", *range(600)), _ack("a", *range(600, 1200)))
    ops, _ = pack(settles)
    assert [len(op.ack.leases) for op in ops] == [600, 600]


def test_a_message_holds_at_most_its_share_of_bytes_results_included() -> None:
    from pqueue.batching import MAX_SUBMIT_BYTES
    from pqueue.consumer import _fitting

    big = pb.Operation(
        ack=pb.AckRequest(
            queue="a", leases=[pb.JobLease(job_id=1, lease_id=2, result=b"r" * (1 << 20))]
        )
    )
    settles = _settles(*[big] * 10)
    n = _fitting(settles)
    assert 1 <= n < 10
    assert n * big.ByteSize() <= MAX_SUBMIT_BYTES
    assert _fitting(_settles(_ack("a", 1))) == 1
    assert _fitting(_settles(*[_ack("a", i) for i in range(1500)])) == 1000
