"""A node's Prometheus metrics, on a registry of its own (one per server).

Three kinds of figures:

- **Events as they happen**: calls (``pqueue.wire.observe``), commands per log
  entry, durable-write seconds, elections. Histograms and counters fed by
  the log through ``LogObserver``.
- **State at scrape time**: jobs by queue and state, the oldest ready job's
  age, per-queue totals, consensus indexes, replication lag, serving. Read
  from the node by ``NodeCollector`` when Prometheus asks, so nothing is
  kept twice and nothing goes stale. Queue state is replicated: every node
  reports the same figures for the same applied index (dashboards take
  ``max by (queue)``).
- **The process**: CPU and memory (``pqueue.wire.process_metrics``).

Queue names label the per-queue families: the first ``max_queues`` by name
get series of their own, the rest are summed under ``queue="_other"``, so
the series stay bounded however many queues the cluster holds (up to
``limits.MAX_QUEUES``), and a scrape stays cheap for the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pqueue.core.jobs import CANCELLED, COMPLETED, DEAD, DELAYED, LEASED, READY, QueueState
from pqueue.node.memory import MemoryBudget
from pqueue.node.peer_tcp import PeerListener
from pqueue.node.peers import PeerService
from pqueue.node.queue_node import QueueNode
from pqueue.node.replicated import ReplicatedLog
from pqueue.node.scheduler import ENQUEUED, SKIPPED
from pqueue.wire.observe import GrpcMetrics
from pqueue.wire.process_metrics import ProcessCollector

try:
    VERSION = metadata.version("pqueue")
except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
    VERSION = "unknown"

_STATES = (
    ("ready", READY),
    ("delayed", DELAYED),
    ("leased", LEASED),
    ("dead", DEAD),
    ("completed", COMPLETED),
    ("cancelled", CANCELLED),
)
#: (family suffix, Counters attribute, help)
_TOTALS = (
    ("enqueued", "enqueued", "Jobs enqueued (duplicates of an idempotency key not counted)."),
    ("leased", "leased", "Deliveries: jobs handed to a consumer under a lease."),
    ("acked", "acked", "Jobs acknowledged as done."),
    ("nacked", "nacked", "Jobs handed back by a consumer."),
    ("expired", "expired", "Leases that ran out before an ack."),
    ("dead_lettered", "dead", "Jobs moved to the dead letters."),
    ("completed", "completed", "Jobs acked or force-completed."),
    ("cancelled", "cancelled", "Jobs cancelled by an operator."),
    (
        "ttl_expired",
        "ttl_expired",
        "Jobs dead because they expired before a lease (counted in dead_lettered too).",
    ),
)
#: Queues given series of their own, by name; the rest are summed as one.
DEFAULT_MAX_QUEUES = 500
#: The label of the row that sums the queues beyond the budget.
OTHER_QUEUES = "_other"
#: What the ``queue`` label of the per-queue families holds
#: (``pq node --metrics-queue-labels``): each queue's name; each tenant's
#: name with ``/*`` (its queues summed, no queue names shown); or one row
#: ``*`` summing every queue (nothing about tenants shown).
QUEUE_LABEL_MODES = ("queue", "tenant", "off")
ALL_QUEUES = "*"


class NodeMetrics:
    """The registry, plus the families fed as things happen. A ``LogObserver``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.grpc = GrpcMetrics(r)
        self.batch_commands = Histogram(
            "pq_consensus_batch_commands",
            "Commands packed into one log entry by the leader (group commit).",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
        )
        self.fsync_seconds = Histogram(
            "pq_storage_fsync_seconds",
            "Time of each durable write of the log (an fsync, or a committed transaction).",
            registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1),
        )
        self.mix_holds = Counter(
            "pq_consensus_mix_holds",
            "Entries an idle leader held for the other side's commands (producers' "
            "for consumers', or the reverse: --mix-wait-ms), by outcome: joined (they "
            "came and went in the same entry), timed_out, or cut (an admin command or a "
            "tick came, or the entry filled, first).",
            ["outcome"],
            registry=r,
        )
        self._mix_outcomes = {
            outcome: self.mix_holds.labels(outcome) for outcome in ("joined", "timed_out", "cut")
        }
        self.mix_hold_seconds = Counter(
            "pq_consensus_mix_hold_seconds",
            "Time entries were held for the other side's commands, in all.",
            registry=r,
        )
        self.operations = Counter(
            "pq_operations",
            "Operations of Submit calls and Consume settles this node answered, by kind "
            "(enqueue, ack, nack, extend) and outcome (OK, or the operation's status code): "
            "a Submit answers OK with each operation's own status.",
            ["op", "code"],
            registry=r,
        )
        self._operation_children: dict[tuple[str, str], Counter] = {}
        self.elections = Counter(
            "pq_consensus_elections",
            "Elections (phase-1 rounds) this node started.",
            registry=r,
        )
        self.snapshot_seconds = Histogram(
            "pq_snapshot_seconds",
            "Time of each snapshot this node took: the state encoded and stored.",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.snapshot_bytes = Gauge(
            "pq_snapshot_bytes", "Size of the last snapshot this node took.", registry=r
        )
        self.snapshot_time = Gauge(
            "pq_snapshot_last_timestamp_seconds",
            "Unix time the last snapshot this node took was stored (0: none since start).",
            registry=r,
        )
        r.register(ProcessCollector())

    def operation(self, kind: str, code: str) -> None:
        """One operation of a Submit or a Consume settle answered (``code``: OK or its error's)."""
        child = self._operation_children.get((kind, code))
        if child is None:  # labels() takes a lock and builds a key: once per pair
            child = self._operation_children[(kind, code)] = self.operations.labels(kind, code)
        child.inc()

    # LogObserver
    def batch(self, commands: int) -> None:
        self.batch_commands.observe(commands)

    def persisted(self, seconds: float) -> None:
        self.fsync_seconds.observe(seconds)

    def held(self, seconds: float, outcome: str) -> None:
        self._mix_outcomes[outcome].inc()
        self.mix_hold_seconds.inc(seconds)

    def election(self) -> None:
        self.elections.inc()

    def snapshot(self, seconds: float, size: int) -> None:
        self.snapshot_seconds.observe(seconds)
        self.snapshot_bytes.set(size)
        self.snapshot_time.set_to_current_time()


class NodeCollector(Collector):
    """Figures read from a running node at scrape time."""

    def __init__(
        self,
        node: QueueNode,
        max_queues: int = DEFAULT_MAX_QUEUES,
        queue_labels: str = "queue",
        memory: MemoryBudget | None = None,
        receiving: Callable[[], tuple[PeerService | None, PeerListener | None]] | None = None,
    ) -> None:
        if queue_labels not in QUEUE_LABEL_MODES:
            raise ValueError(f"queue_labels must be one of {', '.join(QUEUE_LABEL_MODES)}")
        self._node = node
        #: Queues with series of their own (17 each, per node); the rest are summed.
        self.max_queues = max_queues
        #: One of QUEUE_LABEL_MODES.
        self.queue_labels = queue_labels
        self.memory = memory
        #: The peer service and TCP listener, once bound (their counters).
        self.receiving = receiving

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        node = self._node
        info = GaugeMetricFamily(
            "pq_node_info", "This node's name and version (always 1).", labels=["node", "version"]
        )
        info.add_metric([node.config.node_id, VERSION], 1)
        yield info
        yield GaugeMetricFamily(
            "pq_node_serving",
            "1 while the node takes calls (not draining, log healthy, storage reachable).",
            value=int(node.serving),
        )
        yield GaugeMetricFamily(
            "pq_node_calls_in_flight", "Client calls being served now.", value=node.calls_in_flight
        )
        yield GaugeMetricFamily(
            "pq_node_consume_streams",
            "Open Consume streams (served here, or relayed to the leader).",
            value=node.consume_streams,
        )
        yield GaugeMetricFamily(
            "pq_node_submit_streams",
            "Open SubmitStream streams served here.",
            value=node.submit_streams,
        )
        yield CounterMetricFamily(
            "pq_node_submit_stream_requests",
            "Requests (Submit batches) read on SubmitStream streams.",
            value=node.submit_stream_requests,
        )
        yield GaugeMetricFamily(
            "pq_storage_available",
            "1 while the store is reachable.",
            value=int(node.storage.available),
        )
        if self.memory is not None:
            yield GaugeMetricFamily(
                "pq_node_memory_budget_bytes",
                "RSS at which the node refuses enqueues (pq node --memory-budget-mb; 0: none).",
                value=self.memory.budget_bytes,
            )
            yield CounterMetricFamily(
                "pq_node_memory_refusals",
                "Enqueue calls refused because the node's RSS was at or above its budget.",
                value=self.memory.refusals,
            )
        yield from self._queues(node)
        yield self._schedule_ticks(node)
        st = node.log.status()
        yield GaugeMetricFamily(
            "pq_consensus_leader", "1 while this node leads.", value=int(node.log.is_leader)
        )
        yield GaugeMetricFamily(
            "pq_consensus_ballot_round",
            "Round of the ballot this node leads or follows.",
            value=st.ballot[0],
        )
        for name, value, text in (
            ("commit", st.commit_index, "Highest log index known chosen."),
            ("applied", st.applied_index, "Highest log index applied to the queues."),
            ("snapshot", st.snapshot_index, "Log index of the last snapshot."),
        ):
            yield GaugeMetricFamily(f"pq_consensus_{name}_index", text, value=value)
        yield GaugeMetricFamily(
            "pq_consensus_pending_commands",
            "Commands waiting for, or in, a log entry not yet applied.",
            value=st.pending,
        )
        lag = GaugeMetricFamily(
            "pq_consensus_replication_lag_entries",
            "On the leader: entries each peer's reported commit index trails the leader's.",
            labels=["peer"],
        )
        if isinstance(node.log, ReplicatedLog):
            for peer, entries in sorted(node.log.replication_lag().items()):
                lag.add_metric([str(peer)], entries)
        yield lag
        yield from self._peers(node)

    def _peers(self, node: QueueNode) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        over = GaugeMetricFamily(
            "pq_peer_link_transport",
            "1 for how each link to a peer sends now: tcp (--peer-ports) or grpc.",
            labels=["peer", "lane", "transport"],
        )
        dropped = CounterMetricFamily(
            "pq_peer_messages_dropped",
            "Messages a link's full queue dropped, oldest first (consensus resends).",
            labels=["peer", "lane"],
        )
        for link in node.transport.links():
            if link.transport:
                over.add_metric([str(link.peer), link.lane, link.transport], 1)
            dropped.add_metric([str(link.peer), link.lane], link.dropped)
        yield over
        yield dropped
        service, listener = self.receiving() if self.receiving is not None else (None, None)
        counts: list[tuple[str, str, int]] = []
        if service is not None:
            counts += [
                (
                    "pq_peer_refused",
                    "Peer streams and hellos refused or ended for their token (none, bad, "
                    "expired, revoked, another node's).",
                    service.refused,
                ),
                (
                    "pq_peer_spoofed_messages",
                    "Peer messages dropped for claiming another sender than their link's node.",
                    service.spoofed,
                ),
            ]
        if listener is not None:
            counts += [
                ("pq_peer_tcp_batches", "Batches taken on the TCP peer port.", listener.batches),
                (
                    "pq_peer_tcp_broken",
                    "TCP peer connections ended for a protocol error (a bad or oversized frame).",
                    listener.broken,
                ),
                (
                    "pq_peer_tcp_turned_away",
                    "TCP peer connections closed at once: too many were owing a hello.",
                    listener.turned_away,
                ),
            ]
        for name, documentation, value in counts:
            yield CounterMetricFamily(name, documentation, value=value)

    def _queues(self, node: QueueNode) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        jobs = GaugeMetricFamily(
            "pq_queue_jobs", "Jobs in each queue, by state.", labels=["queue", "state"]
        )
        age = GaugeMetricFamily(
            "pq_queue_oldest_ready_age_seconds",
            "Age of each queue's oldest ready job (0: none).",
            labels=["queue"],
        )
        paused = GaugeMetricFamily(
            "pq_queue_paused",
            "1 while a queue's leases are paused (a row summing queues: how many are).",
            labels=["queue"],
        )
        totals = {
            attr: CounterMetricFamily(f"pq_queue_jobs_{name}", text, labels=["queue"])
            for name, attr, text in _TOTALS
        }
        # Replicated totals must never go backwards: wait until this node has
        # applied what the leader has chosen (see ReplicatedLog.caught_up).
        if isinstance(node.log, ReplicatedLog) and not node.log.caught_up:
            return
        now = node.clock_ms()
        for label, group in self._rows(node.machine.queues):
            for state, key in _STATES:
                jobs.add_metric([label, state], sum(q.counts[key] for q in group))
            oldest = [t for t in (q.oldest_ready_at() for q in group) if t is not None]
            age.add_metric([label], max(0, now - min(oldest)) / 1000 if oldest else 0.0)
            paused.add_metric([label], sum(q.paused for q in group))
            for attr, family in totals.items():
                family.add_metric([label], sum(getattr(q.counters, attr) for q in group))
        yield jobs
        yield age
        yield paused
        yield from totals.values()

    def _schedule_ticks(self, node: QueueNode) -> CounterMetricFamily:
        """Cron ticks this node applied while it led, by queue and outcome
        (counted by the leader: followers show none; ``pqueue.node.scheduler``)."""
        family = CounterMetricFamily(
            "pq_schedule_ticks",
            "Cron schedule ticks applied while this node led: enqueued (a job) or skipped "
            "(recorded without one: the missed-tick policy, or the queue refused the job).",
            labels=["queue", "outcome"],
        )
        counts = node.scheduler.ticks
        if counts:
            for label, group in self._rows(node.machine.queues):
                for outcome in (ENQUEUED, SKIPPED):
                    value = sum(counts[q.name, outcome] for q in group)
                    if value:
                        family.add_metric([label, outcome], value)
        return family

    def _rows(self, queues: dict[str, QueueState]) -> list[tuple[str, list[QueueState]]]:
        """(label, queues summed under it), at most ``max_queues`` + 1 rows."""
        if self.queue_labels == "off":
            return [(ALL_QUEUES, list(queues.values()))] if queues else []
        groups: dict[str, list[QueueState]] = {}
        for name in sorted(queues):
            if self.queue_labels == "tenant":
                tenant, slash, _ = name.partition("/")
                label = f"{tenant}/*" if slash else ALL_QUEUES
            else:
                label = name
            groups.setdefault(label, []).append(queues[name])
        labels = sorted(groups)
        rows = [(label, groups[label]) for label in labels[: self.max_queues]]
        rest = labels[self.max_queues :]
        if rest:  # beyond the budget: one row for all of them
            rows.append((OTHER_QUEUES, [q for label in rest for q in groups[label]]))
        return rows
