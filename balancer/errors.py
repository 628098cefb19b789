"""The balancer's error root (one error root per package)."""

from __future__ import annotations


class BalancerError(Exception):
    """Root of every error the balancer raises itself."""

    retriable: bool = False


class ListenError(BalancerError):
    """The balancer could not bind its address."""
