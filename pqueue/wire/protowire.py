"""The bit of Protobuf's wire format that programs write by hand (pure).

Where a message is framed from bytes that are already encoded (a log entry
from its commands' bytes, a ``Submit`` from clients' raw requests), these
are the two pieces needed: a base-128 varint, and a length-delimited field.
"""

from __future__ import annotations

#: Wire type 2: length-delimited (a message, bytes, a string).
LEN = 2


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


def length_delimited(field: int, payload: bytes) -> bytes:
    """The wire bytes of a length-delimited field (a message or bytes)."""
    return varint(field << 3 | LEN) + varint(len(payload)) + payload
