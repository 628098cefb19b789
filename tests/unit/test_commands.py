"""The command set is checked: every ``Command`` oneof field has exactly one
handler, and a mismatch is an error naming it when the machine is defined."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from pqueue.core.commands import (
    COMMAND_KINDS,
    CommandTableError,
    bind,
    checked_commands,
    handler_table,
    handles,
)
from pqueue.core.machine import QueueMachine
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb


def test_every_command_field_has_exactly_one_handler() -> None:
    oneof = logpb.Command.DESCRIPTOR.oneofs_by_name["kind"]
    kinds = {f.name for f in oneof.fields}
    assert kinds
    assert set(COMMAND_KINDS) == kinds
    table = handler_table(QueueMachine)
    assert set(table) == kinds
    assert len(set(table.values())) == len(table)  # no method serves two commands
    handlers = bind(QueueMachine())
    assert set(handlers) == kinds
    assert all(callable(h) for h in handlers.values())


def test_each_command_reaches_its_handler() -> None:
    """An empty request of every kind is answered (a result or an error), not a KeyError."""
    machine = QueueMachine()
    for kind in COMMAND_KINDS:
        cmd = logpb.Command()
        getattr(cmd, kind).SetInParent()
        assert cmd.WhichOneof("kind") == kind
        result = machine.apply_command(cmd, 1)
        assert isinstance(result, Message | Exception), kind


def test_a_command_without_a_handler_is_a_startup_error_naming_it() -> None:
    with pytest.raises(CommandTableError, match=r"no handler for Command\.not_a_command"):
        handler_table(QueueMachine, (*COMMAND_KINDS, "not_a_command"))


def test_a_machine_losing_a_handler_cannot_be_defined() -> None:
    with pytest.raises(CommandTableError, match=r"no handler for Command\.purge"):

        @checked_commands
        class Broken(QueueMachine):
            def _purge(self, req: pb.PurgeQueueRequest, now: int) -> pb.PurgeQueueResponse:
                return pb.PurgeQueueResponse()  # not marked: the purge command has no handler


def test_two_handlers_for_one_command_are_refused() -> None:
    with pytest.raises(CommandTableError, match=r"Command\.ack has 2 handlers: _ack, _ack_again"):

        @checked_commands
        class Twice(QueueMachine):
            @handles("ack")
            def _ack_again(self, req: pb.AckRequest, now: int) -> pb.AckResponse:
                return pb.AckResponse()


def test_a_handler_for_no_command_is_refused() -> None:
    with pytest.raises(CommandTableError, match=r"_frobnicate handles Command\.frobnicate"):

        @checked_commands
        class Extra(QueueMachine):
            @handles("frobnicate")
            def _frobnicate(self, req: pb.AckRequest, now: int) -> pb.AckResponse:
                return pb.AckResponse()
