"""Argument types and helpers the ``pq`` programs share."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pqueue.wire.tls import Tls
from pqueue.wire.tokens import read_key

if TYPE_CHECKING:
    from pqueue.client import Client

Outcome = tuple[Any, Sequence[str] | None]
Command = Callable[["Client", argparse.Namespace], Awaitable[Outcome]]
Adder = Callable[..., argparse.ArgumentParser]


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help line ends with its default, when it has one worth
    showing (not None, off, empty, or already said in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default in ("", [], argparse.SUPPRESS)
            or not (action.option_strings or action.nargs in ("?", "*"))
        ):
            return text
        shown = f"{default:g}" if isinstance(default, float) else default
        if isinstance(default, Path):
            shown = str(default)
        return f"{text} (default: {str(shown).replace('%', '%%')})".lstrip()


def adder(sub: Any) -> Adder:
    """``add(name, fn, help, parent=sub)``: a client command's subparser."""

    def add(name: str, fn: Command, help_: str, parent: Any = sub) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        return sp

    return add


def parse_node_id(text: str) -> int:
    value = int(text.removeprefix("n"))
    if value < 1:
        raise argparse.ArgumentTypeError("node ids start at 1")
    return value


def parse_addresses(text: str) -> tuple[str, ...]:
    addresses = tuple(a.strip() for a in text.split(",") if a.strip())
    if not addresses or any(":" not in a for a in addresses):
        raise argparse.ArgumentTypeError("expected HOST:PORT,HOST:PORT,...")
    return addresses


def parse_peers(text: str) -> dict[int, str]:
    peers = {}
    for part in text.split(","):
        node, sep, address = part.partition("=")
        if not sep or ":" not in address:
            raise argparse.ArgumentTypeError(f"{part!r}: expected ID=HOST:PORT")
        peers[parse_node_id(node)] = address
    return peers


def parse_peer_ports(text: str) -> int | dict[int, int]:
    """``PORT`` (every node's) or ``ID=PORT,ID=PORT,...``."""

    def port(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = -1
        if not 1 <= n <= 65535:
            raise argparse.ArgumentTypeError(f"{value!r}: a port is 1 to 65535")
        return n

    if "=" not in text:
        return port(text)
    ports = {}
    for part in text.split(","):
        node, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{part!r}: expected ID=PORT")
        ports[parse_node_id(node)] = port(value)
    return ports


def metrics_token(path: Path | None) -> str | None:
    """The /metrics scrape token in ``path`` (None: no file given)."""
    if path is None:
        return None
    token = read_key(path).decode().strip()
    if not token:
        raise ValueError(f"{path} is empty: a metrics token file needs the token")
    return token


def tls_of(cert: Path | None, key: Path | None, ca: Path | None, server: bool) -> Tls | None:
    """TLS from whichever flags were given (none: plaintext); refuses half a setup."""
    if cert is None and key is None and ca is None:
        return None
    if server and cert is None:
        raise ValueError("a TLS server needs --tls-cert and --tls-key")
    if not server and ca is None:
        raise ValueError("TLS to the nodes needs --backend-tls-ca (their CA)")
    return Tls.from_files(cert, key, ca)


def parse_duration_s(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError as exc:
        raise ValueError(f"not a duration: {text!r} (3600, 90s, 30m, 24h, 7d)") from exc
    if value <= 0:
        raise ValueError("a duration must be positive")
    return value


_BYTE_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}
_BYTE_UNITS |= {"g": 1 << 30, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """A byte count: 67108864, 64MiB, 64M, 512KiB, 1GiB (binary units)."""
    stripped = text.strip().lower()
    number = stripped.rstrip("kmgib")
    unit = stripped[len(number) :].strip()
    try:
        value = int(float(number) * _BYTE_UNITS[unit])
    except (ValueError, KeyError) as exc:
        raise ValueError(f"not a byte count: {text!r} (67108864, 64MiB, 512KiB, 1GiB)") from exc
    if value <= 0:
        raise ValueError("a byte count must be positive")
    return value


def parse_time_ms(text: str) -> int:
    """A point in time as Unix milliseconds: an integer is taken as such,
    anything else as ISO-8601 (``2026-01-31T12:00:00Z``; without an offset,
    the local time)."""
    if text.strip().lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither Unix milliseconds nor an ISO-8601 time"
        ) from None
    return round(moment.astimezone(UTC).timestamp() * 1000)


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high`` (a protobuf
    field's range), refused at the command line rather than by protobuf
    (``Value out of range``) or by the server."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            if high >= 1 << 62:
                raise argparse.ArgumentTypeError(f"must be {low} or more, not {value}")
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {value}")
        return value

    parse.__name__ = "integer"  # argparse's "invalid integer value" names the type
    return parse


INT32 = (-(1 << 31), (1 << 31) - 1)
UINT32 = (0, (1 << 32) - 1)
#: Durations and times in ms: never negative, int64.
MS = (0, (1 << 63) - 1)
#: Job and lease ids: uint64, 0 is never one.
ID = (1, (1 << 64) - 1)

priority_arg = int_in(*INT32)
ms_arg = int_in(*MS)
id_arg = int_in(*ID)
count_arg = int_in(*UINT32)


def add_gc_young(parser: argparse.ArgumentParser) -> None:
    """``--gc-young``, for a server process (a node, a balancer)."""
    from pqueue.wire.loop import GC_YOUNG, GC_YOUNG_MIN

    parser.add_argument(
        "--gc-young",
        type=int_in(GC_YOUNG_MIN, 10_000_000),
        default=GC_YOUNG,
        metavar="N",
        help="collect the cyclic collector's youngest generation once N more objects "
        f"were made than freed (default {GC_YOUNG:,}; CPython's own is 700: more "
        "collections, each shorter, and more CPU in all)",
    )
