"""Where a program's own token comes from: a string, or a file re-read when it
changes (rotation without a restart). The SDK, the balancer and a node's peer
links use these; verifying tokens is the node's business (``pqueue.node.auth``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from pqueue.wire.logs import describe

logger = logging.getLogger(__name__)


def read_key(path: Path) -> bytes:
    """A key file's bytes, exactly: the node and ``pq token issue`` read it alike."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the key {path}: {describe(exc)}") from exc


class TokenFile:
    """A token kept in a file, re-read when the file changes (rotation without
    a restart). Calling it gives the token now."""

    def __init__(self, path: Path, check_interval_s: float = 1.0) -> None:
        self.path = path
        #: The file is looked at (``stat``) at most this often: callers ask on
        #: every proxied or forwarded call, and a stat is a blocking syscall.
        self.check_interval_s = check_interval_s
        self._checked_s = -math.inf
        self._token = ""
        self._stamp: tuple[int, int, int] | None = None
        self()  # a file that cannot be read fails now, at start

    def __call__(self) -> str:
        now_s = time.monotonic()
        if self._stamp is not None and now_s - self._checked_s < self.check_interval_s:
            return self._token
        self._checked_s = now_s
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                token = read_key(self.path).decode().strip()
                if token or self._stamp is None:  # a file caught mid-write keeps the old one
                    self._token, self._stamp = token, stamp
        except (OSError, ValueError) as exc:
            if self._stamp is None:
                raise ValueError(f"cannot read the token {self.path}: {describe(exc)}") from exc
            logger.warning(
                "cannot re-read the token %s: %s (keeping the last)", self.path, describe(exc)
            )
        return self._token


#: A token, or where to get the current one (``TokenFile``).
TokenSource = str | Callable[[], str]


def current_token(source: TokenSource | None) -> str:
    """The token a source gives now ("" for none)."""
    if source is None:
        return ""
    return source if isinstance(source, str) else source()
