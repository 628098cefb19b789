"""The feature table (pqueue/core/features.py) and the rules built on it."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor

from pqueue.core import features
from pqueue.core.machine import QueueMachine
from pqueue.core.snapshot import restore, snapshot_bytes
from pqueue.errors import UpgradeRequiredError
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb


def _fields(root: Descriptor) -> set[str]:
    """Every field of every message reachable from ``root``."""
    seen: dict[str, Descriptor] = {}
    todo = [root]
    while todo:
        desc = todo.pop()
        if desc.full_name in seen:
            continue
        seen[desc.full_name] = desc
        todo.extend(f.message_type for f in desc.fields if f.message_type is not None)
    return {f.full_name for d in seen.values() for f in d.fields}


LOG_FIELDS = _fields(logpb.LogEntry.DESCRIPTOR) | _fields(logpb.Snapshot.DESCRIPTOR)


def test_every_log_field_is_v1_or_names_the_feature_it_needs() -> None:
    """A field added to an entry, a command or a snapshot must be classified:
    a replica that cannot apply it would otherwise drop it silently."""
    covered = features.V1_FIELDS | set(features.FIELD_FEATURES) | features.IGNORABLE_FIELDS
    assert LOG_FIELDS - covered == set()


def test_every_command_kind_is_covered() -> None:
    oneof = logpb.Command.DESCRIPTOR.oneofs_by_name["kind"]
    for field in oneof.fields:
        assert field.full_name in features.V1_FIELDS | set(features.FIELD_FEATURES)


def test_the_table_names_only_real_fields_and_known_features() -> None:
    assert features.V1_FIELDS <= LOG_FIELDS  # no stale names
    assert set(features.FIELD_FEATURES) <= LOG_FIELDS
    assert not features.V1_FIELDS & set(features.FIELD_FEATURES)
    for feature in features.FIELD_FEATURES.values():
        assert feature in features.SUPPORTED
        assert feature in features.USES
    assert features.LEGACY <= features.SUPPORTED


def _shared_queue() -> logpb.Command:
    config = pb.QueueConfig(shares=[pb.TenantShare(tenant="acme", weight=2)])
    return logpb.Command(create_queue=pb.CreateQueueRequest(queue="q", config=config))


def test_commands_need_the_features_of_the_fields_they_set() -> None:
    assert features.required(_shared_queue()) == {features.SHARES}
    enqueue = logpb.Command(
        enqueue=pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec(payload=b"x")]),
        limits=logpb.TenantLimits(max_queues=3),
        caller=logpb.Caller(tenant="acme"),
    )
    assert features.required(enqueue) == {features.CALLER, features.TENANT_LIMITS}
    plain = logpb.Command(create_queue=pb.CreateQueueRequest(queue="q"))
    assert features.required(plain) == set()
    assert features.required_by([plain, enqueue, _shared_queue()]) == [
        features.CALLER,
        features.SHARES,
        features.TENANT_LIMITS,
    ]


def test_an_entry_needing_an_unsupported_feature_is_refused() -> None:
    entry = logpb.LogEntry(index=9, commands=[_shared_queue()], required_features=["shares"])
    features.check_entry(entry, features.SUPPORTED)  # this release applies it
    with pytest.raises(UpgradeRequiredError) as err:
        features.check_entry(entry, features.SUPPORTED - {features.SHARES})
    assert err.value.index == 9
    assert err.value.features == ["shares"]
    assert "log entry 9 needs feature(s) 'shares'" in err.value.message
    assert "Upgrade this node" in err.value.message
    future = logpb.LogEntry(index=3, required_features=["teleport"])
    with pytest.raises(UpgradeRequiredError, match="'teleport'"):
        features.check_entry(future, features.SUPPORTED)


def test_an_entry_a_newer_release_wrote_is_refused_not_half_applied() -> None:
    """What an older decoder meets: a command kind it does not know (it would
    read it as an empty command), or a field it does not know in a command."""
    head = logpb.LogEntry(index=4).SerializeToString()
    # Command field 99 (varint 1): a kind added after this release.
    unknown_kind = head + b"\x1a\x03" + b"\x98\x06\x01"
    entry = logpb.LogEntry.FromString(unknown_kind)
    assert entry.commands[0].WhichOneof("kind") is None
    with pytest.raises(UpgradeRequiredError, match=r"log entry 4 holds command\(s\) \[0\]"):
        features.check_entry(entry, features.SUPPORTED)
    # A known command (an ack) carrying a field 99 of its own: the writer put it there.
    ack = pb.AckRequest(queue="q").SerializeToString()
    cmd = b"\x1a" + bytes([len(ack)]) + ack + b"\x98\x06\x01"
    newer_cmd = head + b"\x1a" + bytes([len(cmd)]) + cmd
    with pytest.raises(UpgradeRequiredError, match="fields this node's release does not know"):
        features.check_entry(logpb.LogEntry.FromString(newer_cmd), features.SUPPORTED)
    # A field 99 in what a leader stamps on a command (its tenant limits).
    stamped = logpb.Command(ack=pb.AckRequest(queue="q"))
    stamped.limits.MergeFromString(b"\x98\x06\x01")
    entry = logpb.LogEntry(index=4, commands=[stamped])
    with pytest.raises(UpgradeRequiredError, match="fields this node's release does not know"):
        features.check_entry(entry, features.SUPPORTED)
    # An entry-level field added later.
    with pytest.raises(UpgradeRequiredError):
        features.check_entry(logpb.LogEntry.FromString(head + b"\xf8\x06\x01"), set())
    features.check_entry(logpb.LogEntry.FromString(head), set())  # a plain entry passes


def test_a_clients_unknown_fields_an_older_leader_stored_are_dropped_not_fatal() -> None:
    """Releases before admission stored a client's request as sent, unknown
    fields and all (a newer client's field, or the issue's padded Ack), and
    every replica applied it without them. An upgraded node replaying that
    entry must apply it the same way, not stop at it on every restart."""
    field_99 = b"\x98\x06\x01"
    padded = pb.AckRequest.FromString(
        pb.AckRequest(queue="q", leases=[pb.JobLease(job_id=1, lease_id=2)]).SerializeToString()
        + field_99
    )
    config = pb.QueueConfig.FromString(
        pb.QueueConfig(max_attempts=3).SerializeToString() + field_99
    )
    entry = logpb.LogEntry(
        index=1,
        commands=[
            logpb.Command(create_queue=pb.CreateQueueRequest(queue="q", config=config)),
            logpb.Command(ack=padded),
        ],
    )
    stored = logpb.LogEntry.FromString(entry.SerializeToString())
    assert features.check_entry(stored, features.SUPPORTED) == 2  # used to stop the node
    assert stored.commands[1].ack == pb.AckRequest(
        queue="q", leases=[pb.JobLease(job_id=1, lease_id=2)]
    )
    # Applied like any entry, by a node of this release.
    machine = QueueMachine()
    machine.apply_entry(stored)
    assert machine.queues["q"].config.max_attempts == 3


def test_a_snapshot_keeps_no_clients_unknown_config_fields_and_is_restored() -> None:
    """An older release kept a client's unknown QueueConfig fields in the state
    (``effective_config`` copies them), so its snapshots carry them."""
    machine = QueueMachine()
    config = pb.QueueConfig.FromString(
        pb.QueueConfig(max_attempts=3).SerializeToString() + b"\x98\x06\x01"
    )
    machine.apply_entry(
        logpb.LogEntry(
            index=1,
            commands=[logpb.Command(create_queue=pb.CreateQueueRequest(queue="q", config=config))],
        )
    )
    data = snapshot_bytes(machine)  # as the older release wrote it
    restored = restore(data)
    assert restored.queues["q"].config.max_attempts == 3
    assert snapshot_bytes(restored) != data  # the client's field is gone


def test_a_snapshot_a_newer_release_wrote_is_refused() -> None:
    data = snapshot_bytes(QueueMachine())
    restore(data)
    with pytest.raises(UpgradeRequiredError, match="snapshot"):
        restore(data + b"\x98\x06\x01")


def test_the_leader_uses_a_feature_only_once_every_member_announced_it() -> None:
    announced = {1: features.SUPPORTED, 2: features.SUPPORTED}
    members = [1, 2, 3]
    # A member not heard from is taken to run at least the legacy release...
    assert features.lacking({features.SHARES}, members, announced) is None
    # ...which knows nothing of a feature added since.
    assert features.lacking({"teleport"}, members, announced) == ("teleport", (1, 2, 3))
    announced[3] = features.SUPPORTED - {features.SHARES}
    assert features.lacking({features.CALLER, features.SHARES}, members, announced) == (
        features.SHARES,
        (3,),
    )
    why = features.unavailable(features.SHARES, (3,), announced)
    assert "queue shares" in why
    assert "node 3 has not announced 'shares'" in why
    why = features.unavailable("teleport", (4,), announced)
    assert "node 4 has not been heard from" in why
    # A cluster of one supports what it has.
    assert features.lacking({features.SHARES}, [1], {1: features.SUPPORTED}) is None


def test_announcements_round_trip_and_ignore_junk() -> None:
    header = features.announce(features.SUPPORTED)
    assert features.parse_announcement(header) == features.SUPPORTED
    assert features.parse_announcement(None) == features.LEGACY
    assert features.parse_announcement("") == frozenset()
    assert features.parse_announcement("shares, Bad Name,\n,x" * 1) == {"shares", "x"}
    many = ",".join(f"f{i}" for i in range(10_000))
    assert len(features.parse_announcement(many)) <= features.MAX_ANNOUNCED


def test_a_snapshot_remembers_every_feature_its_entries_needed() -> None:
    machine = QueueMachine()
    machine.apply_entry(
        logpb.LogEntry(index=1, time_ms=5, commands=[_shared_queue()], required_features=["shares"])
    )
    machine.apply_entry(logpb.LogEntry(index=2, time_ms=6))
    restored = restore(snapshot_bytes(machine))
    assert restored.features == {"shares"}
    assert snapshot_bytes(restored) == snapshot_bytes(machine)
    features.check_restored(2, restored.features, features.SUPPORTED)
    with pytest.raises(UpgradeRequiredError, match="the snapshot at entry 2 needs"):
        features.check_restored(2, restored.features, features.SUPPORTED - {"shares"})


def test_features_already_known_are_left_out_of_the_gate_and_the_stamp() -> None:
    enqueue = logpb.Command(
        enqueue=pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec(payload=b"x")] * 3),
        limits=logpb.TenantLimits(max_queues=3),
        caller=logpb.Caller(tenant="acme"),
    )
    plain = logpb.Command(create_queue=pb.CreateQueueRequest(queue="q"))
    tick = logpb.Command(tick=logpb.Tick(lifecycle=True))
    every = sorted(features.SUPPORTED)
    for command in (plain, enqueue, _shared_queue(), tick):
        needed = features.required(command)
        for mask in range(1 << len(every)):  # every set of known features
            known = frozenset(f for i, f in enumerate(every) if mask >> i & 1)
            assert features.required(command, known) == needed - known
            assert features.required_by([command], known) == sorted(needed - known)
    assert features.required(tick) == {features.LIFECYCLE}


def test_only_the_first_entry_needing_a_feature_is_stamped_and_one_lacking_it_stops_there() -> None:
    leader = QueueMachine()
    entries = []
    for index, queue in enumerate(["a", "b", "c"], start=1):
        config = pb.QueueConfig(shares=[pb.TenantShare(tenant="acme", weight=2)])
        commands = [logpb.Command(create_queue=pb.CreateQueueRequest(queue=queue, config=config))]
        entry = logpb.LogEntry(
            index=index,
            time_ms=5,
            commands=commands,
            required_features=features.required_by(commands, leader.features),  # as the leader
        )
        leader.apply_entry(entry)
        entries.append(entry)
    assert [list(e.required_features) for e in entries] == [["shares"], [], []]
    assert leader.features == {"shares"}

    # A replica without the feature applies entries in order: it stops at
    # the first, before anything of it applies, and never reaches the rest.
    replica = QueueMachine()
    lacking = features.SUPPORTED - {features.SHARES}

    def apply_in_order(supported: frozenset[str]) -> None:
        for entry in entries:
            features.check_entry(entry, supported)
            replica.apply_entry(entry)

    with pytest.raises(UpgradeRequiredError, match="log entry 1 needs feature"):
        apply_in_order(lacking)
    assert replica.applied_index == 0
    # One that has the feature applies all three alike.
    apply_in_order(features.SUPPORTED)
    assert replica.features == leader.features
    assert snapshot_bytes(replica) == snapshot_bytes(leader)
