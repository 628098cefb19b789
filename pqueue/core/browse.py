"""Browsing a queue (``ListJobs``): a page of one state's jobs, in the order
they would be served. A pure read of the machine's state; it changes nothing.

**Order.** READY: lease order, the serving key ``(first_key(priority,
ready_at), ready_at_ms, job_id)``, aging included. That is the order of one
tenant's lane; where tenants share a queue, leases interleave the lanes by
fairness (weights, virtual time), which a static list cannot show: the list
gives the key order over all lanes. A group's later jobs are listed at their
own key, though only the group's head may be leased. DELAYED: by
``(ready_at_ms, job_id)``; LEASED: by ``(lease_expires_at_ms, job_id)``;
DEAD, COMPLETED, CANCELLED: newest first, ``(finished_at_ms, job_id)``
descending (dead jobs from before ``finished_at_ms`` was recorded have 0
there, so they come last, newest id first).

**Pages.** A page token holds the last listed job's sort fields, so the next
page starts strictly after that place in the order: jobs added or removed
meanwhile neither repeat nor shift the rest (a job whose own key changed,
say nacked to a later ready time, is listed where it is now).

**Cost.** A backlog is mostly READY jobs in the compact form (``jobs.py``),
held per lane and priority in FIFOs that are already in serving order. A
page binary-searches each FIFO for its resume point and merges the FIFOs
lazily with the sorted candidates among the queue's ``Job`` objects, so it
reads about ``limit`` rows however long the backlog (``bench/browse.py``:
about 1 ms at 1M ready jobs, a few deep into them). Jobs held as objects
(every other state, and READY jobs delivered before or grouped) have no
sorted index: a page reads each object of the state once (through the
state's own index when that is much smaller than the queue's objects and
finds them all, checked against the state's count; else a pass over every
object of the queue) and keeps the ``limit + 1`` first, O(n log limit)
without sorting them all: about 0.1-0.3 us a job, so 100,000 delayed or
dead jobs cost a page some 12-30 ms.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import compress, islice
from operator import attrgetter

from pqueue.core import limits
from pqueue.core.jobs import (
    CANCELLED,
    COMPLETED,
    DEAD,
    DELAYED,
    LEASED,
    READY,
    STATES,
    Job,
    QueueState,
    row_ready_at,
)
from pqueue.errors import InvalidArgumentError
from pqueue.v1 import queue_pb2 as pb

#: A job's place in its state's order: smaller is listed first.
SortKey = tuple[int, ...]

#: Newest first: these sort by (finished_at_ms, job_id) descending.
ENDED = (DEAD, COMPLETED, CANCELLED)

#: A page carries at most this many bytes of payloads and results (and at
#: least one job), as a lease response does: a page of 1 MiB payloads stops
#: short of ``limit`` (its token goes on from there) rather than exceed
#: gRPC's message limit.
MAX_PAGE_BYTES = limits.MAX_LEASE_RESPONSE_BYTES

#: Page tokens: a version, the state, then the last job's sort fields (READY:
#: priority, ready_at_ms, job_id; the others: their time and job_id).
_TOKEN_HEAD = struct.Struct("<BB")
_TOKEN_VERSION = 1
_FIELD = struct.Struct("<q")


@dataclass(frozen=True, slots=True)
class Query:
    """A checked ``ListJobsRequest``: what to list, and where to start."""

    state: int
    min_priority: int | None
    max_priority: int | None
    group: str
    tenant: str
    limit: int
    #: The last job of the previous page, as its token holds it (None: start).
    after: tuple[int, ...] | None

    @property
    def filtered(self) -> bool:
        """Whether any filter is set."""
        return (
            self.min_priority is not None
            or self.max_priority is not None
            or bool(self.group)
            or bool(self.tenant)
        )

    def admits(self, job: Job) -> bool:
        """Whether the filters let ``job`` through (its state aside)."""
        return (
            (self.min_priority is None or job.priority >= self.min_priority)
            and (self.max_priority is None or job.priority <= self.max_priority)
            and (not self.group or job.group == self.group)
            and (not self.tenant or job.tenant == self.tenant)
        )

    def admits_priority(self, priority: int) -> bool:
        return (self.min_priority is None or priority >= self.min_priority) and (
            self.max_priority is None or priority <= self.max_priority
        )


def parse(req: pb.ListJobsRequest) -> Query:
    """The request checked; InvalidArgumentError naming the field at fault."""
    if req.state == pb.JOB_STATE_UNSPECIFIED:
        raise InvalidArgumentError(
            "state", "required: READY, DELAYED, LEASED, DEAD, COMPLETED or CANCELLED"
        )
    if req.state not in STATES:
        raise InvalidArgumentError("state", f"unknown job state {req.state}")
    if req.limit > limits.MAX_LIST_LIMIT:
        raise InvalidArgumentError("limit", f"at most {limits.MAX_LIST_LIMIT}")
    low = req.min_priority if req.HasField("min_priority") else None
    high = req.max_priority if req.HasField("max_priority") else None
    if low is not None and high is not None and low > high:
        raise InvalidArgumentError("min_priority", f"{low} is above max_priority {high}")
    return Query(
        state=req.state,
        min_priority=low,
        max_priority=high,
        group=req.group,
        tenant=req.tenant,
        limit=req.limit or limits.DEFAULT_LIST_LIMIT,
        after=decode_token(req.page_token, req.state) if req.page_token else None,
    )


def _fields_of(state: int) -> int:
    return 3 if state == READY else 2


def encode_token(state: int, fields: tuple[int, ...]) -> str:
    """The opaque token that resumes after a job with these sort fields."""
    raw = _TOKEN_HEAD.pack(_TOKEN_VERSION, state) + b"".join(_FIELD.pack(f) for f in fields)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, state: int) -> tuple[int, ...]:
    """The sort fields a token holds; INVALID_ARGUMENT naming ``page_token``
    for anything this module did not make for ``state``."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgumentError("page_token", "not a token this server gave") from exc
    if len(raw) < _TOKEN_HEAD.size or raw[0] != _TOKEN_VERSION:
        raise InvalidArgumentError("page_token", "not a token this server gave")
    token_state = raw[1]
    if token_state != state and token_state in STATES:
        name = pb.JobState.Name(token_state)  # type: ignore[arg-type]
        raise InvalidArgumentError("page_token", f"a token for another state ({name})")
    count = _fields_of(state)
    if token_state != state or len(raw) != _TOKEN_HEAD.size + count * _FIELD.size:
        raise InvalidArgumentError("page_token", "not a token this server gave")
    return tuple(
        _FIELD.unpack_from(raw, _TOKEN_HEAD.size + i * _FIELD.size)[0] for i in range(count)
    )


#: The Job fields a state's jobs are ordered by (READY: see ``_key_of``).
_ORDER_FIELDS: dict[int, tuple[str, ...]] = {
    DELAYED: ("ready_at_ms", "job_id"),
    LEASED: ("lease_expires_at_ms", "job_id"),
    DEAD: ("finished_at_ms", "job_id"),
    COMPLETED: ("finished_at_ms", "job_id"),
    CANCELLED: ("finished_at_ms", "job_id"),
}
_READY_FIELDS = attrgetter("priority", "ready_at_ms", "job_id")


def _token_fields(job: Job) -> tuple[int, ...]:
    """What a token keeps of the last job listed (READY keeps the priority
    rather than the aged key: the queue's aging may change between pages)."""
    fields = _READY_FIELDS if job.state == READY else attrgetter(*_ORDER_FIELDS[job.state])
    return tuple(fields(job))


def _key_of(queue: QueueState, state: int) -> Callable[[Job], SortKey]:
    """The state's order as a key (read in C where it can be): READY's is
    the serving key ``QueueState.ready_key`` without its token."""
    if state != READY:
        return attrgetter(*_ORDER_FIELDS[state])
    interval = queue.config.aging_interval_ms
    if not interval:  # first_key is the priority
        return _READY_FIELDS
    return lambda job: (job.priority * interval + job.ready_at_ms, job.ready_at_ms, job.job_id)


def _cursor(queue: QueueState, query: Query) -> SortKey | None:
    """The previous page's last place, as a key of the state's order."""
    after = query.after
    if after is None or query.state != READY:
        return after
    priority, ready_at, job_id = after
    return (queue.first_key(priority, ready_at), ready_at, job_id)


def page(queue: QueueState, query: Query) -> tuple[list[Job], str]:
    """Up to ``query.limit`` jobs after the cursor, in the state's order, and
    the token of the next page ("": none)."""
    state = query.state
    key = _key_of(queue, state)
    after = _cursor(queue, query)
    newest_first = state in ENDED
    wanted = query.limit + 1  # one more than a page tells whether more follow
    jobs = _objects(queue, state)
    if query.filtered:
        jobs = [job for job in jobs if query.admits(job)]
    if after is not None:  # past the cursor, compared in C
        past = after.__gt__ if newest_first else after.__lt__
        jobs = list(compress(jobs, map(past, map(key, jobs))))
    if newest_first:
        # Objects come roughly oldest first; reversed, few displace the heap.
        found = heapq.nlargest(wanted, reversed(jobs), key=key)
    else:
        found = heapq.nsmallest(wanted, jobs, key=key)
    if state == READY and not query.group:  # compact jobs have no group
        found = _merge_fifos(queue, query, found, key, after, wanted)
    kept = _fitting(found, query.limit)
    more = len(found) > kept
    del found[kept:]
    return found, encode_token(state, _token_fields(found[-1])) if more else ""


def _fitting(jobs: list[Job], limit: int) -> int:
    """How many of ``jobs`` (at most ``limit``, at least one) a page holds
    within ``MAX_PAGE_BYTES`` of payloads and results."""
    size = 0
    for count, job in enumerate(jobs[:limit]):
        size += len(job.payload) + len(job.result)
        if count and size > MAX_PAGE_BYTES:
            return count
    return min(len(jobs), limit)


def _merge_fifos(
    queue: QueueState,
    query: Query,
    objects: list[Job],
    key: Callable[[Job], SortKey],
    after: SortKey | None,
    wanted: int,
) -> list[Job]:
    """The first ``wanted`` READY jobs: the (sorted) ``objects`` merged with
    the FIFOs of compact jobs, lazily. Keys are unique (they hold the job
    id), so the merge never compares jobs; a FIFO's items carry None, their
    job read from its row (``k[2]``: the id)."""
    streams: list[Iterable[tuple[SortKey, Job | None]]] = [((key(job), job) for job in objects)]
    streams += _fifo_streams(queue, query, after)
    return [
        job if job is not None else queue.jobs[k[2]]
        for k, job in islice(heapq.merge(*streams), wanted)
    ]


def _fifo_streams(
    queue: QueueState, query: Query, after: SortKey | None
) -> list[Iterator[tuple[SortKey, Job | None]]]:
    """One ordered stream per FIFO of compact jobs the filters admit, each
    from its first job after the cursor."""
    if query.tenant:
        lane = queue.lanes.get(query.tenant)
        lanes = [] if lane is None else [lane]
    else:
        lanes = list(queue.lanes.values())
    return [
        _fifo_keys(queue, line, 0 if after is None else _resume(queue, line, after))
        for lane in lanes
        for priority, line in lane.fifo.items()
        if query.admits_priority(priority)
    ]


def _fifo_keys(
    queue: QueueState, line: deque[int], start: int
) -> Iterator[tuple[SortKey, Job | None]]:
    """(key, None) of the FIFO's compact jobs from position ``start``, in
    order (ids of jobs that left the compact form are skipped)."""
    rows = queue.jobs
    for job_id in _ids_from(line, start):
        row = rows.row(job_id)
        if row is not None:
            priority, ready_at = row_ready_at(row)
            yield (queue.first_key(priority, ready_at), ready_at, job_id), None


def _ids_from(line: deque[int], start: int, chunk: int = 128) -> Iterator[int]:
    """``line[start:]`` lazily. A deque is reached only from its ends (about
    2.5 ns an id, in C), so from the nearer one: past the middle, chunks
    are read backwards from the right end, each twice the last."""
    size = len(line)
    if start <= size - start:
        yield from islice(line, start, None)
        return
    while start < size:
        stop = min(start + chunk, size)
        part = list(islice(reversed(line), size - stop, size - start))
        part.reverse()
        yield from part
        start, chunk = stop, 2 * chunk


def _resume(queue: QueueState, line: deque[int], after: SortKey) -> int:
    """The position in ``line`` of its first compact job after ``after``: a
    binary search over the FIFO, which is sorted by key (an id whose job
    left the compact form stands for its next live neighbour)."""
    lo, hi = 0, len(line)
    while lo < hi:
        mid = (lo + hi) // 2
        live = _live_at(queue, line, mid, hi)
        if live is None:
            hi = mid
            continue
        pos, job_id, row = live
        priority, ready_at = row_ready_at(row)
        if (queue.first_key(priority, ready_at), ready_at, job_id) <= after:
            lo = pos + 1
        else:
            hi = mid
    return lo


def _live_at(
    queue: QueueState, line: deque[int], pos: int, stop: int
) -> tuple[int, int, bytes] | None:
    """(position, id, row) of the first compact job in ``line[pos:stop]``."""
    job_id = line[pos]  # indexing walks the deque's blocks in C
    row = queue.jobs.row(job_id)
    if row is not None:
        return pos, job_id, row
    # A run of ids whose jobs left: walk it to a live one.
    for at, job_id in enumerate(islice(line, pos + 1, stop), pos + 1):
        row = queue.jobs.row(job_id)
        if row is not None:
            return at, job_id, row
    return None


def _objects(queue: QueueState, state: int) -> list[Job]:
    """The queue's jobs in ``state`` that are held as ``Job`` objects: from
    the state's own index when that is much smaller than the queue's objects
    and finds them all (it may hold stale or repeated ids; what it finds is
    checked against the state's count), else from a pass over every object
    of the queue (in C but for the state test: about 40 ns an object)."""
    table = queue.jobs
    expected = queue.counts[state] - (table.compact if state == READY else 0)
    if expected <= 0:
        return []
    index = _index(queue, state)
    if index is not None and 4 * len(index) < len(table) - table.compact:
        found: dict[int, Job] = {}
        for job_id in index:
            if job_id not in found and table.row(job_id) is None:
                job = table.get(job_id)
                if job is not None and job.state == state:
                    found[job_id] = job
        if len(found) == expected:
            return list(found.values())
    return [job for job in table.full_values() if job.state == state]


def _index(queue: QueueState, state: int) -> list[int] | set[int] | None:
    """Ids that include every object of ``state`` (and maybe others), if the
    queue keeps such an index."""
    if state == DEAD:
        return queue.dead_ids
    if state == READY:
        return [job_id for _, job_id in queue.oldest]
    if state in (COMPLETED, CANCELLED):
        return [job_id for _, job_id in queue.finished]
    return None
