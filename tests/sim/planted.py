"""Replicas broken on purpose: the simulator's checker must catch each one."""

from __future__ import annotations

from dataclasses import replace

from consensus.messages import Ballot, Promise, Record
from consensus.replica import Replica, Role


class SkipsPromiseFsync(Replica):
    """Promises without persisting the promise: a restart forgets it."""

    def _promise(self, ballot: Ballot) -> None:
        if ballot > self.promised:
            self.promised = ballot  # but nothing for the shell to persist
        self.max_round = max(self.max_round, ballot[0])


class VotesBeforeFsync(Replica):
    """The leader counts its own accept vote before its own persist.

    It then trusts that vote to be durable, so it also skips storing the
    chosen value at commit (the real core's second line of defence, which on
    its own makes an early vote harmless).
    """

    def _propose_at(self, slot: int, value: bytes) -> None:
        super()._propose_at(slot, value)
        self.votes[slot].add(self.id)

    def _store_chosen(self, slot: int, value: bytes) -> None:
        self.log.setdefault(slot, Record(slot, self.ballot, value))  # in memory only


class ReadsWithoutQuorum(Replica):
    """Answers a read index at once, without confirming it still leads: a
    leader cut off from the majority serves stale reads."""

    def read_index(self, ctx: int) -> bool:
        if self.role is not Role.LEADER:
            return False
        self._out.read_states.append((ctx, self.commit_index))
        return True


class CountsPartialPromise(Replica):
    """Counts a promise's first part as the whole vote (never fetches the rest).

    With byte budgets of a few bytes a promise reports one record per part,
    so the new leader misses values a majority accepted and fills their
    slots with something else.
    """

    def _on_promise(self, msg: Promise) -> None:
        if msg.ok and msg.more_from:
            msg = replace(msg, more_from=0)
        super()._on_promise(msg)
