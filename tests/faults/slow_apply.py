"""``python -m tests.faults.slow_apply SECONDS node ...``: ``pq``, whose node
takes ``SECONDS`` longer to apply each command of a log entry.

A loaded 2-core machine applying a large batched entry, made repeatable: a
restart replaying such a log takes as long as the test needs (issue 14: a
replay longer than the leader's wait killed the node). The sleep holds the
event loop as a slow apply does.
"""

from __future__ import annotations

import sys
import time

from pqueue.cli import main
from pqueue.core.effects import Effects
from pqueue.node.queue_node import QueueNode
from pqueue.v1 import log_pb2 as logpb


def slowed(delay_s: float) -> None:
    """Make every ``QueueNode`` in this process take ``delay_s`` longer per command
    (per command, not per entry: group commit packs concurrent calls together)."""
    apply = QueueNode.apply

    def slow_apply(self: QueueNode, entry: logpb.LogEntry, respond: bool = True) -> Effects:
        time.sleep(delay_s * len(entry.commands))
        return apply(self, entry, respond)

    QueueNode.apply = slow_apply  # type: ignore[method-assign]


if __name__ == "__main__":
    slowed(float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
