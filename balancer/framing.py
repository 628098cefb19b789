"""The few pieces of protobuf's wire format the coalescer needs, and no more.

The coalescer packs clients' single calls into a ``Submit`` without parsing
them: an ``Operation`` is a message whose one set field (``enqueue`` 1,
``ack`` 2, ``nack`` 3, ``extend`` 4) holds the single call's request, and a
``SubmitRequest`` is its ``ops`` (field 1) repeated, so each call's bytes
are framed by a tag and a length, twice, and the frames concatenated. The
answer is split the same way: each ``OpResult`` of the ``SubmitResponse``
gives back its ``status`` bytes (a google.rpc.Status) and the single call's
response bytes, as the node serialized them.

Pure: bytes in, bytes out (``tests/unit/test_framing.py`` checks it against
the protobuf runtime).
"""

from __future__ import annotations

#: ``Operation``'s field for each method that can ride in a ``Submit``.
OP_FIELDS = {"Enqueue": 1, "Ack": 2, "Nack": 3, "ExtendLease": 4}
#: Wire types.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
#: ``SubmitRequest.ops`` and ``SubmitResponse.results``: field 1, length-delimited.
_FIELD_1_LEN = b"\x0a"
#: ``OpResult``'s fields holding a response: the ``Operation`` field plus one.
_RESULT_FIELDS = frozenset(f + 1 for f in OP_FIELDS.values())
#: A varint carrying a negative int32 takes ten bytes.
_SIGN = 1 << 63


class FramingError(ValueError):
    """Bytes that are not the protobuf message they should be."""


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a base-128 varint."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


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


def split_results(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """The results of a ``SubmitResponse``, in order: each as (its status's
    bytes, the ``Operation`` field of its response or 0, the response's bytes)."""
    results: list[tuple[bytes, int, bytes]] = []
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
        results.append((status, which, response))
    return results


def status_code(status: bytes) -> int:
    """The ``code`` of a google.rpc.Status's bytes (0: OK)."""
    code = 0
    for number, kind, value in fields(status):
        if number == 1 and kind == _VARINT:
            assert isinstance(value, int)
            code = value - (1 << 64) if value & _SIGN else value
    return code
