"""``pq node --peer-ports``: one port for every node, or one per node id;
what it cannot mean is refused before the node starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pqueue.cli import build_parser
from pqueue.cli.node import _node_options

PEERS = "1=10.0.0.1:7701,2=10.0.0.2:7701,3=10.0.0.3:7701"


def options(tmp_path: Path, *extra: str) -> dict[int, int] | None:
    args = build_parser().parse_args(
        ["node", "--data-dir", str(tmp_path), "--insecure-no-auth", *extra]
    )
    return _node_options(args).peer_ports


def test_one_port_is_every_nodes_and_a_list_names_each(tmp_path: Path) -> None:
    assert options(tmp_path, "--peers", PEERS) is None  # gRPC streams, as before
    assert options(tmp_path, "--peers", PEERS, "--peer-ports", "7711") == {
        1: 7711,
        2: 7711,
        3: 7711,
    }
    assert options(tmp_path, "--peers", PEERS, "--peer-ports", "1=7711,2=7712,n3=7713") == {
        1: 7711,
        2: 7712,
        3: 7713,
    }
    # A peer left out is reached over its gRPC stream.
    assert options(tmp_path, "--peers", PEERS, "--peer-ports", "1=7711,2=7712") == {
        1: 7711,
        2: 7712,
    }


@pytest.mark.parametrize("value", ["0", "65536", "x", "1=", "1=7711,7712", "1=-5"])
def test_a_port_that_is_no_port_is_refused_by_the_parser(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["node", "--data-dir", "d", "--peer-ports", value])
    assert "--peer-ports" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (("--peer-ports", "7711"), "needs --peers"),
        (("--peers", PEERS, "--peer-ports", "1=7711,4=7714"), "does not: [4]"),
        (("--peers", PEERS, "--peer-ports", "2=7712,3=7713"), "no port for this node (1)"),
    ],
)
def test_what_the_flags_cannot_mean_stops_the_start(
    tmp_path: Path, extra: tuple[str, ...], said: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(said)):
        options(tmp_path, *extra)
