"""Long polls: leases that wait for work, parked per queue and woken by applied entries.

A ``Lease`` call with ``wait_ms`` and a ``Consume`` stream with credits left
both lease through ``LongPolls.lease``: the same ``lease`` log command, the
same line of waiters. An applied entry that makes jobs leasable (an enqueue, a
delayed job coming due, an expired lease, a resumed queue, a slot freed
under ``max_inflight``: ``Effects.woken``) wakes as many waiters as the new
jobs can serve, in arrival order; a woken waiter proposes its lease. One
beaten to the jobs keeps its place at the front; one that leaves holding a
wake-up hands it on, so no job is left with nobody woken for it. A paused
queue's waiters wait. A queue with ``max_dispatch_per_s`` whose bucket is
empty keeps one timer, set for when the next lease's worth is due
(``QueueMachine.next_dispatch_ms``), that wakes its first waiter: waiters
neither spin nor sleep through a token. A drain wakes them all (they
return empty). A queue that does not exist yet is waited on like an empty
one: lines are keyed by stored name, and the entry that creates the queue
with a job (the first enqueue auto-creates it) reports it woken like any
enqueue.

A leader that proposes an enqueue on a queue with waiters proposes their
leases right behind it (``ride``): group commit packs both into one entry,
where the lease, applied after the enqueue, finds its job; the waiter sees
that lease through instead of proposing one once the enqueue is applied,
which cost a second entry. The lease command is the one the waiter would
have proposed (only its moment changes), so it leases by the same rules; one
that finds nothing (the enqueue refused or a duplicate, the job taken by an
earlier lease, the queue paused meanwhile) puts its waiter back at the front
of its line, as a waiter beaten to a job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

from google.protobuf.message import Message

from pqueue.core import dispatch, limits
from pqueue.core.machine import QueueMachine
from pqueue.errors import NotFoundError, PQueueError
from pqueue.node.commitlog import CommandLog, Indexed
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

#: How long a lease on an unknown queue waits for the leader's read index
#: before it falls back to the log.
UNKNOWN_QUEUE_READ_S = 1.0


class LeaseHost(Protocol):
    """What long polls need of their node (``QueueNode``)."""

    machine: QueueMachine
    log: CommandLog
    draining: bool
    #: The clock the leader stamps entries with (Unix ms).
    clock_ms: Callable[[], int]

    def propose_indexed(self, command: logpb.Command) -> Awaitable[tuple[Message, int]]: ...

    def prepare(self, command: logpb.Command) -> None: ...

    def propose_many(self, commands: Sequence[logpb.Command]) -> list[asyncio.Future[Indexed]]: ...


class Waiter:
    """One parked long poll: woken by resolving ``future``; ``want()`` says how
    many jobs it would take (a stream's credits may grow while it waits).
    ``command()`` is the lease it would propose now (None: it would not
    propose, e.g. its stream is ending); ``riding`` is that lease's
    outcome once ``ride`` proposed it on the waiter's behalf."""

    __slots__ = ("command", "future", "riding", "want")

    def __init__(
        self,
        future: asyncio.Future[None],
        want: Callable[[], int],
        command: Callable[[], logpb.Command | None] | None = None,
    ) -> None:
        self.future = future
        self.want = want
        self.command = command
        self.riding: asyncio.Future[Indexed] | None = None


class LongPolls:
    """The waiter lines of one node, by stored queue name."""

    def __init__(self, host: LeaseHost) -> None:
        self._host = host
        self._lines: dict[str, deque[Waiter]] = {}
        #: Per queue whose dispatch rate holds its waiters back: the timer
        #: that wakes one when the next lease's worth of tokens is due, and
        #: that loop time.
        self._timers: dict[str, tuple[asyncio.TimerHandle, float]] = {}

    @property
    def waiting(self) -> int:
        """Long polls parked until a job comes (``Lease`` calls and streams)."""
        return sum(len(line) for line in self._lines.values())

    def lines(self) -> dict[str, int]:
        """Waiters per queue (for tests: nothing is left behind)."""
        return {queue: len(line) for queue, line in self._lines.items()}

    def wake(self, queue: str, jobs: int) -> None:
        """Wake waiting long polls in arrival order, enough to take ``jobs`` jobs.

        Waking only as many as can be served keeps the rest parked instead of
        each proposing a lease that would come back empty (a thundering herd
        of log writes). Nobody is woken while a lease would find nothing (the
        entry's own leases took the jobs: a waiter woken for nothing would
        lose its place in line).
        """
        if not self._host.machine.has_ready(queue):
            return
        line = self._lines.get(queue)
        while line and jobs > 0:
            waiter = line.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)
                jobs -= max(waiter.want(), 1)
        if line is not None and not line:
            del self._lines[queue]

    def ride(self, commands: Iterable[logpb.Command]) -> None:
        """Propose, right behind enqueues just queued for the log, the leases
        of waiters their jobs can serve (as many as ``wake`` would wake, in
        line order), so group commit packs them into the enqueue's entry.

        Each waiter leaves its line with its lease's outcome to see through
        (``Waiter.riding``). Only where a lease could take a job once the
        enqueue applies: jobs ready at once (no delay), a queue neither
        paused, nor at its ``max_inflight``, nor held back by its dispatch
        rate, as far as the state applied so far tells; the lease itself
        decides, in the log, as any lease does. The leader calls this only
        after the log took the enqueues (it leads).
        """
        host = self._host
        if host.draining:
            return
        now = host.clock_ms()
        for command in commands:
            if command.WhichOneof("kind") != "enqueue":
                continue
            req = command.enqueue
            line = self._lines.get(req.queue)
            if not line or not self._may_lease(req.queue):
                continue
            jobs = sum(1 for spec in req.jobs if spec.delay_ms <= 0 and spec.not_before_ms <= now)
            while line and jobs > 0:
                waiter = line[0]
                lease = None if waiter.future.done() else waiter.command and waiter.command()
                if lease is None:
                    break  # it proposes for itself once the enqueue applies
                try:
                    host.prepare(lease)
                    [riding] = host.propose_many([lease])
                except PQueueError:
                    break  # as above: it waits to be woken
                line.popleft()
                waiter.riding = riding
                waiter.future.set_result(None)
                jobs -= max(waiter.want(), 1)
            if not line:
                del self._lines[req.queue]

    def _may_lease(self, queue: str) -> bool:
        """Whether a lease on ``queue`` could take a job were one ready now
        (an unknown queue: the enqueue creates it)."""
        state = self._host.machine.queues.get(queue)
        if state is None:
            return True
        return dispatch.leasable(state, self._host.machine.lifecycle) and (
            self._dispatch_due_s(queue) == 0
        )

    def wake_all(self) -> None:
        """Wake every waiter (a drain: they find the node draining and return)."""
        for timer, _ in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for line in self._lines.values():
            for waiter in line:
                if not waiter.future.done():
                    waiter.future.set_result(None)
        self._lines.clear()

    async def lease(
        self,
        req: pb.LeaseRequest,
        bound: logpb.TenantLimits | None = None,
        *,
        want: Callable[[], int] | None = None,
        stop: asyncio.Future[None] | None = None,
    ) -> pb.LeaseResponse:
        """Lease, waiting up to ``req.wait_ms`` for a job (long poll); with
        ``stop``, until ``stop`` is done instead (a stream's).

        Wakes on an enqueue, a delayed job coming due, or an expired lease (all
        of which make a job ready through an applied entry). Returns an empty
        response when the wait ends (a proposal already made is seen
        through) or the node drains; never fails for lack of work. A queue
        that does not exist (yet) is waited for like an empty one when the
        call waits at all (``wait_ms`` > 0, or a stream): workers may start
        before producers create their queue. Only a lease that does not
        wait is refused NOT_FOUND (at once, without a log entry, when the
        leader can tell). The caller has checked the name is the caller's
        to use (its tenant's, its role) before it comes here. ``want``:
        how many jobs to lease, read again before each proposal (default
        ``req.max_jobs``).
        """
        host = self._host
        loop = asyncio.get_running_loop()
        deadline = None if stop is not None else loop.time() + req.wait_ms / 1000
        wanted = want or (lambda: max(req.max_jobs, 1))
        empty = pb.LeaseResponse()
        #: A long poll or a stream: a missing queue is waited for, not refused.
        waits = stop is not None or req.wait_ms > 0
        first_in_line = False
        parked = False
        #: Our lease, proposed by ``ride`` behind an enqueue while we waited:
        #: seen through (its jobs are ours) whatever else happened meanwhile.
        riding: asyncio.Future[Indexed] | None = None

        def command() -> logpb.Command | None:
            if host.draining or (stop is not None and stop.done()) or wanted() < 1:
                return None
            req.max_jobs = min(wanted(), limits.MAX_LEASE_JOBS)
            return logpb.Command(lease=req, limits=bound)

        while True:
            if riding is None and (host.draining or (stop is not None and stop.done())):
                return empty
            queue = req.queue
            if riding is not None:
                due_s = 0.0
            elif queue not in host.machine.queues and waits:
                # A queue not created yet waits like an empty one: the entry
                # that creates it with a job (a producer's first enqueue)
                # wakes this line, by the stored name the lease was scoped to.
                limits.check_queue_name(queue)
                due_s = -1.0
            elif queue not in host.machine.queues and await self.surely_unknown(queue):
                limits.check_queue_name(queue)  # the log's answer, without a log entry
                raise NotFoundError(f"queue {queue!r} not found")
            elif queue not in host.machine.queues:
                due_s = 0.0  # the log answers NOT_FOUND (or leases, if it came)
            elif host.machine.has_ready(queue):
                due_s = self._dispatch_due_s(queue)
                if due_s > 0:  # its dispatch rate: wait for the tokens, in line
                    self._arm(queue, due_s)
                    first_in_line = first_in_line or parked
            else:
                due_s = -1.0
            if due_s == 0:
                try:
                    if riding is not None:
                        result, index = await self._seen_through(riding)
                        riding = None
                    else:
                        req.max_jobs = min(wanted(), limits.MAX_LEASE_JOBS)
                        result, index = await host.propose_indexed(
                            logpb.Command(lease=req, limits=bound)
                        )
                except NotFoundError:
                    if not waits:
                        raise
                    # Deleted (or dropped when idle) while we proposed: wait
                    # for it to come back, as for a queue not created yet.
                    result = empty
                except BaseException:
                    self._pass_on(queue)  # we may hold a wake-up: hand it on
                    raise
                assert isinstance(result, pb.LeaseResponse)
                if result.jobs:
                    self._pass_on(queue)
                    result.log_index = index  # read your writes: your own lease
                    return result
                first_in_line = True  # beaten to it: keep our place in line
                if host.machine.has_ready(queue) and (due_s := self._dispatch_due_s(queue)) > 0:
                    self._arm(queue, due_s)  # the rate took the rest: wake us when due
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return empty
            waiter = Waiter(loop.create_future(), wanted, command)
            line = self._lines.setdefault(queue, deque())
            if first_in_line:
                line.appendleft(waiter)
            else:
                line.append(waiter)
            try:
                await asyncio.wait(
                    (waiter.future,) if stop is None else (waiter.future, stop),
                    timeout=remaining,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            except asyncio.CancelledError:
                self._leave(queue, waiter)
                raise
            parked = True
            riding = waiter.riding
            if not waiter.future.done():  # the wait ran out, or ``stop``
                self._leave(queue, waiter)
                return empty

    @staticmethod
    async def _seen_through(riding: asyncio.Future[Indexed]) -> tuple[Message, int]:
        """A ridden lease's result and index (its error raised), as
        ``propose_indexed`` gives them."""
        result, index = await riding
        if isinstance(result, PQueueError):
            raise result
        return result, index

    async def surely_unknown(self, queue: str) -> bool:
        """Whether no committed entry creates ``queue``, known without a log entry.

        Only a leader that has applied its commit index may say so, and only
        after a read index (a heartbeat round: no entry, no fsync) confirms
        it still leads and has applied every slot phase 1 found: a deposed
        leader, or a new one whose predecessor's entries are not yet applied
        here, could otherwise miss a queue another node already created.
        Anything short of that (not leading, lagging, no answer) says False,
        and the lease goes to the log as before.
        """
        log = self._host.log
        status = log.status()
        if not log.is_leader or status.applied_index != status.commit_index:
            return False
        try:
            await log.read_barrier(UNKNOWN_QUEUE_READ_S)
        except PQueueError:
            return False
        return queue not in self._host.machine.queues

    def _pass_on(self, queue: str) -> None:
        """Wake the next waiter if work is left that nobody was woken for
        (once the queue's dispatch rate lets a lease take it)."""
        if self._host.machine.has_ready(queue):
            due_s = self._dispatch_due_s(queue)
            if due_s > 0:
                self._arm(queue, due_s)
            else:
                self.wake(queue, 1)

    def _dispatch_due_s(self, queue: str) -> float:
        """Seconds until the queue's ``max_dispatch_per_s`` lets a lease
        take a job (0: it does now, or the queue has no rate)."""
        due = self._host.machine.next_dispatch_ms(queue)
        if due is None:
            return 0.0
        return max(0.0, (due - self._host.clock_ms()) / 1000)

    def _arm(self, queue: str, delay_s: float) -> None:
        """Wake the queue's first waiter in ``delay_s`` (or sooner, if its
        timer is due sooner already): one timer per queue, however many
        wait, so waiters held back by the rate never spin and never all
        propose at once."""
        loop = asyncio.get_running_loop()
        at = loop.time() + delay_s
        armed = self._timers.get(queue)
        if armed is not None:
            if armed[1] <= at:
                return
            armed[0].cancel()
        self._timers[queue] = (loop.call_at(at, self._tokens_due, queue), at)

    def _tokens_due(self, queue: str) -> None:
        """A queue's timer fired: the rate allows a lease now."""
        del self._timers[queue]
        if queue in self._lines:
            self._pass_on(queue)

    def _leave(self, queue: str, waiter: Waiter) -> None:
        """Take ``waiter`` out of its line; a wake-up it got goes to the next."""
        line = self._lines.get(queue)
        if line is not None:
            with contextlib.suppress(ValueError):
                line.remove(waiter)
            if not line:
                del self._lines[queue]
        if waiter.future.done():
            self._pass_on(queue)  # woken as it left: hand the wake-up on
        else:
            waiter.future.cancel()
