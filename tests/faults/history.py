"""A history of queue operations and the checker run over it (after Jepsen's total-queue).

- lost: an acknowledged enqueue never delivered (must be 0);
- unexpected: a delivery of something never enqueued (must be 0);
- duplicates: deliveries beyond the first (allowed after expiry or failover);
- double holds: two leases of one job valid at the same time (must be 0);
- double completions: one job acked under two leases (must be 0).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Lease:
    job_id: int
    lease_id: int
    payload: bytes
    starts_ms: int
    expires_ms: int
    ended_ms: int | None = None  # when an ack for it succeeded (leader time, approx.)


@dataclass
class History:
    attempted: set[bytes] = field(default_factory=set)
    acked_enqueues: set[bytes] = field(default_factory=set)
    leases: list[Lease] = field(default_factory=list)
    completions: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))

    def enqueue_attempt(self, payload: bytes) -> None:
        self.attempted.add(payload)

    def enqueue_ok(self, payload: bytes) -> None:
        self.acked_enqueues.add(payload)

    def leased(
        self, job_id: int, lease_id: int, payload: bytes, expires_ms: int, lease_ms: int
    ) -> Lease:
        lease = Lease(job_id, lease_id, payload, expires_ms - lease_ms, expires_ms)
        self.leases.append(lease)
        return lease

    def ack_ok(self, lease: Lease, now_ms: int) -> None:
        lease.ended_ms = now_ms
        self.completions[lease.job_id].append(lease.lease_id)

    def assert_safe(self) -> dict[str, int]:
        """The counts, after asserting every must-be-zero one is."""
        counts = self.check()
        for name in ("lost", "unexpected", "double_holds", "double_completions"):
            assert counts[name] == 0, counts
        return counts

    def check(self) -> dict[str, int]:
        delivered: dict[bytes, int] = defaultdict(int)
        for lease in self.leases:
            delivered[lease.payload] += 1
        by_job: dict[int, list[Lease]] = defaultdict(list)
        for lease in self.leases:
            by_job[lease.job_id].append(lease)
        double_holds = 0
        for leases in by_job.values():
            leases.sort(key=lambda le: le.lease_id)  # fencing tokens order deliveries
            for earlier, later in itertools.pairwise(leases):
                valid_until = min(earlier.expires_ms, earlier.ended_ms or earlier.expires_ms)
                if later.starts_ms < valid_until:
                    double_holds += 1
        return {
            "enqueued": len(self.acked_enqueues),
            "lost": len(self.acked_enqueues - delivered.keys()),
            "unexpected": len(delivered.keys() - self.attempted),
            "duplicates": sum(n - 1 for n in delivered.values()),
            "double_holds": double_holds,
            "double_completions": sum(1 for ids in self.completions.values() if len(ids) > 1),
        }
