"""A follower writes its accept vote before it applies what the same
message told it was chosen.

The leader's Accept for slot k+1 also says that k is chosen: the follower
persists k+1, sends its vote and applies k. The vote leaves from the peer
link's own task; when the follower applied first, every commit's round trip
waited for the apply of the entry before (about 0.5 ms a round in the
single-job bench: ``docs/benchmarks.md``, session 15)."""

from __future__ import annotations

from collections.abc import Callable

from consensus.messages import Accepted, Message
from pqueue.client import Client
from pqueue.core.effects import Effects
from pqueue.node.replicated import ReplicatedLog
from pqueue.v1 import log_pb2 as logpb
from tests.inproc import Cluster


async def test_a_followers_vote_is_written_before_it_applies_the_entry_before(
    cluster: Cluster,
) -> None:
    leader = await cluster.leader()
    #: (follower, what happened): "vote" queued, "write" by its link to the
    #: leader, "apply" of an entry, in the order they happened.
    events: list[tuple[int, str]] = []
    for i, server in cluster.servers.items():
        if i == leader:
            continue
        node = server.node
        log = node.log
        assert isinstance(log, ReplicatedLog)
        send = log._send

        def spy_send(msg: Message, i: int = i, send: Callable[[Message], None] = send) -> None:
            if isinstance(msg, Accepted) and msg.ok and msg.dst == leader:
                events.append((i, "vote"))
            send(msg)

        apply = node.apply

        def spy_apply(
            entry: logpb.LogEntry,
            respond: bool = True,
            i: int = i,
            apply: Callable[[logpb.LogEntry, bool], Effects] = apply,
        ) -> Effects:
            events.append((i, "apply"))
            return apply(entry, respond)

        log._send = spy_send
        node.apply = spy_apply  # type: ignore[method-assign]
        for link in node.transport.links():
            if link.peer == leader:
                take = link.take_batch

                def spy_take(i: int = i, take: Callable[[], bytes] = take) -> bytes:
                    events.append((i, "write"))
                    return take()

                link.take_batch = spy_take  # type: ignore[method-assign]

    async with Client(cluster.addresses[leader], max_retries=0, batching=False) as c:
        await c.create_queue("q")
        for k in range(20):  # one at a time: each entry's Accept commits the one before
            await c.enqueue("q", f"job-{k}".encode())

    checked = 0
    for follower in {i for i, _ in events}:
        mine = [what for i, what in events if i == follower]
        for at, what in enumerate(mine):
            if what != "vote":
                continue
            after = [w for w in mine[at + 1 :] if w != "vote"]
            if after:
                assert after[0] == "write", (follower, mine[at : at + 4])
                checked += 1
    # Most votes came with an entry to apply (the one before was chosen).
    assert checked >= 20
