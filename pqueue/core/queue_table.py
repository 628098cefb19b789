"""The state machine's queues by stored name, with a sorted index per tenant.

A tenant's ``ListQueues`` or ``Stats('')`` reads a page of its own queues
(binary search into its sorted names), never every tenant's: one tenant
listing 5,000 queues used to slow every other tenant's writes. Pure.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort

from pqueue.core import limits
from pqueue.core.jobs import QueueState


class QueueTable(dict[str, QueueState]):
    """A dict of queues that keeps their names sorted, in all and per tenant.

    Add with ``table[name] = queue`` and remove with ``del table[name]``
    (the only two ways the machine and snapshots change it)."""

    def __init__(self) -> None:
        super().__init__()
        self._names: list[str] = []
        self._by_tenant: dict[str, list[str]] = {}

    def __setitem__(self, name: str, queue: QueueState) -> None:
        if name not in self:
            insort(self._names, name)
            insort(self._by_tenant.setdefault(limits.tenant_of(name), []), name)
        super().__setitem__(name, queue)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        _remove(self._names, name)
        tenant = limits.tenant_of(name)
        names = self._by_tenant[tenant]
        _remove(names, name)
        if not names:
            del self._by_tenant[tenant]

    def held_by(self, tenant: str) -> int:
        """How many queues a tenant holds ("" : names without a tenant)."""
        return len(self._by_tenant.get(tenant, ()))

    def names_of(self, tenant: str) -> list[str]:
        """A tenant's queue names, sorted (do not change the list)."""
        return self._by_tenant.get(tenant, [])

    def page(self, tenant: str | None, after: str, limit: int) -> tuple[list[str], bool]:
        """Up to ``limit`` names after ``after`` (a tenant's, or all with None),
        sorted, and whether more follow."""
        names = self._names if tenant is None else self._by_tenant.get(tenant, [])
        start = bisect_right(names, after) if after else 0
        return names[start : start + limit], start + limit < len(names)


def _remove(names: list[str], name: str) -> None:
    i = bisect_left(names, name)
    if i < len(names) and names[i] == name:
        del names[i]
