"""The command set: which machine method applies each ``Command`` oneof field.

A handler says which field it applies with ``@handles("field")``; the
table is derived from ``Command``'s ``kind`` oneof when ``pqueue.core.machine``
is imported (``@checked_commands`` on ``QueueMachine``), so a field without a
handler (or with two, or a handler for a field the log does not have) stops
the process at startup with an error naming it, instead of failing the
command on every replica.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pqueue.v1 import log_pb2 as logpb

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)

_MARK = "__pqueue_command__"

#: Checked tables, by class (``checked_commands``).
_TABLES: dict[type, dict[str, str]] = {}

#: Every command the log carries: the fields of ``Command.kind``.
COMMAND_KINDS: tuple[str, ...] = tuple(
    f.name for f in logpb.Command.DESCRIPTOR.oneofs_by_name["kind"].fields
)


class CommandTableError(TypeError):
    """The handlers do not match the ``Command`` oneof one to one."""


def handles(kind: str) -> Callable[[F], F]:
    """Mark a method ``(self, request, now) -> response`` as the handler of
    the ``Command`` field ``kind``."""

    def mark(method: F) -> F:
        setattr(method, _MARK, kind)
        return method

    return mark


def handler_table(cls: type, kinds: Iterable[str] = COMMAND_KINDS) -> dict[str, str]:
    """Command field -> the name of the method of ``cls`` that applies it.

    Raises ``CommandTableError`` naming every field without exactly one
    handler, and every handler of a field not in ``kinds``.
    """
    wanted = tuple(kinds)
    claims: dict[str, list[str]] = {}
    for name in dir(cls):
        kind = getattr(getattr(cls, name, None), _MARK, None)
        if isinstance(kind, str):
            claims.setdefault(kind, []).append(name)
    problems = [f"no handler for Command.{k}" for k in wanted if k not in claims]
    problems += [
        f"Command.{k} has {len(names)} handlers: {', '.join(sorted(names))}"
        for k, names in sorted(claims.items())
        if len(names) > 1
    ]
    problems += [
        f"{', '.join(names)} handles Command.{k}, which is not a Command field"
        for k, names in sorted(claims.items())
        if k not in wanted
    ]
    if problems:
        raise CommandTableError(f"{cls.__name__}: " + "; ".join(problems))
    return {kind: claims[kind][0] for kind in wanted}


def checked_commands(cls: C) -> C:
    """Class decorator: check ``cls``'s handlers against the oneof now (at
    import: a mismatch is a startup error) and keep the table for ``bind``."""
    _TABLES[cls] = handler_table(cls)
    return cls


def bind(machine: object) -> dict[str, Callable[[Any, int], Any]]:
    """Command field -> ``machine``'s bound handler for it."""
    cls = type(machine)
    table = _TABLES.get(cls)
    if table is None:
        table = _TABLES[cls] = handler_table(cls)
    return {kind: getattr(machine, method) for kind, method in table.items()}
