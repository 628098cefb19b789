"""The few pieces of protobuf's wire format the coalescer needs, and no more.

The coalescer packs clients' single calls into a ``Submit`` without parsing
them: an ``Operation`` is a message whose one set field (``enqueue`` 1,
``ack`` 2, ``nack`` 3, ``extend`` 4) holds the single call's request, and a
``SubmitRequest`` is its ``ops`` (field 1) repeated, so each call's bytes
are framed by a tag and a length, twice, and the frames concatenated. A
client's own ``SubmitRequest`` is already such frames: it joins as it is
(``count_ops`` says how many). The answer is split the same way: each
``OpResult`` of the ``SubmitResponse`` gives back its bytes, its ``status``
bytes (a google.rpc.Status) and the single call's response bytes, as the
node serialized them; a client's ``Submit`` gets its own results framed
back into a ``SubmitResponse`` (``submit_response``).

Pure: bytes in, bytes out (``tests/unit/test_framing.py`` checks it against
the protobuf runtime).
"""

from __future__ import annotations

from dataclasses import dataclass

from pqueue.wire.protowire import varint

#: ``Operation``'s field for each method that can ride in a ``Submit``.
OP_FIELDS = {"Enqueue": 1, "Ack": 2, "Nack": 3, "ExtendLease": 4}
#: Wire types.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
#: ``SubmitRequest.ops`` and ``SubmitResponse.results``: field 1, length-delimited.
_FIELD_1_LEN = b"\x0a"
#: ``OpResult``'s fields holding a response: the ``Operation`` field plus one.
_RESULT_FIELDS = frozenset(f + 1 for f in OP_FIELDS.values())
#: Each response's ``log_index`` field, by the ``Operation`` field of its call.
_LOG_INDEX_FIELDS = {1: 3, 2: 2, 3: 4, 4: 3}
#: ``SubmitResponse.log_index``: field 2, a varint.
_FIELD_2_VARINT = b"\x10"
#: A varint carrying a negative int32 takes ten bytes.
_SIGN = 1 << 63


class FramingError(ValueError):
    """Bytes that are not the protobuf message they should be."""


def op_header(field: int, request_bytes: int) -> bytes:
    """What goes before a request of ``request_bytes`` bytes to make it one
    ``SubmitRequest.ops`` entry whose ``Operation`` field ``field`` holds it."""
    inner = bytes((field << 3 | _LEN,)) + varint(request_bytes)
    return _FIELD_1_LEN + varint(len(inner) + request_bytes) + inner


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    end = len(data)
    while True:
        if pos >= end or shift > 63:
            raise FramingError("truncated or overlong varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """Each field of a message as (number, wire type, value): an int for
    varints and fixed-width fields, the raw bytes for length-delimited ones.
    Groups (deprecated) are refused."""
    out: list[tuple[int, int, int | bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        value: int | bytes
        if kind == _VARINT:
            value, pos = _read_varint(data, pos)
        elif kind == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > end:
                raise FramingError("a length-delimited field runs past the end")
            value, pos = data[pos : pos + size], pos + size
        elif kind == _I64:
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif kind == _I32:
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        else:
            raise FramingError(f"wire type {kind} is not used by this contract")
        if pos > end or number == 0:
            raise FramingError("a field runs past the end, or has number 0")
        out.append((number, kind, value))
    return out


@dataclass(frozen=True, slots=True)
class Result:
    """One ``OpResult`` of a ``SubmitResponse``, as bytes."""

    #: The whole ``OpResult``.
    raw: bytes
    #: Its ``status`` (a google.rpc.Status; empty: OK).
    status: bytes
    #: The ``Operation`` field of the call it answers (0: none, it failed).
    which: int
    #: The single call's response.
    response: bytes

    @property
    def ok(self) -> bool:
        """Whether the operation succeeded (status code 0)."""
        return not self.status or status_code(self.status) == 0

    def log_index(self) -> int:
        """The response's ``log_index`` (0 for a failure)."""
        number = _LOG_INDEX_FIELDS.get(self.which)
        if number is None:
            return 0
        for n, kind, value in fields(self.response):
            if n == number and kind == _VARINT:
                assert isinstance(value, int)
                return value
        return 0


def split_results(data: bytes) -> list[Result]:
    """The results of a ``SubmitResponse``, in order."""
    results: list[Result] = []
    for number, kind, value in fields(data):
        if number != 1 or kind != _LEN:
            continue  # log_index, or a field newer than this balancer
        assert isinstance(value, bytes)
        status, which, response = b"", 0, b""
        for n, k, v in fields(value):
            if k != _LEN:
                continue
            assert isinstance(v, bytes)
            if n == 1:
                status = v
            elif n in _RESULT_FIELDS:
                which, response = n - 1, v
        results.append(Result(value, status, which, response))
    return results


def count_ops(data: bytes) -> int:
    """How many operations a ``SubmitRequest``'s bytes hold; ``FramingError``
    if they hold anything else (then it does not join others)."""
    n = pos = 0
    end = len(data)
    while pos < end:
        if data[pos] != 0x0A:  # field 1, length-delimited
            raise FramingError("not only operations")
        size, pos = _read_varint(data, pos + 1)
        pos += size
        n += 1
    if pos != end:
        raise FramingError("an operation runs past the end")
    return n


def submit_response(results: list[Result]) -> bytes:
    """A ``SubmitResponse`` of ``results``: their highest ``log_index`` with them,
    as the node answers a ``Submit`` of just their operations."""
    parts: list[bytes] = []
    top = 0
    for result in results:
        parts += (_FIELD_1_LEN, varint(len(result.raw)), result.raw)
        if result.ok:
            top = max(top, result.log_index())
    if top:
        parts += (_FIELD_2_VARINT, varint(top))
    return b"".join(parts)


def status_code(status: bytes) -> int:
    """The ``code`` of a google.rpc.Status's bytes (0: OK)."""
    code = 0
    for number, kind, value in fields(status):
        if number == 1 and kind == _VARINT:
            assert isinstance(value, int)
            code = value - (1 << 64) if value & _SIGN else value
    return code
