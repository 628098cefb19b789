"""Identity on disk: which starts a data dir's record allows (pure)."""

from __future__ import annotations

import pytest

from pqueue.node.identity import DEFAULT_CLUSTER_ID, Identity, IdentityError, check

MEMBERS = {1: "h:1", 2: "h:2", 3: "h:3"}
RECORD = Identity("prod", 1, MEMBERS)


def test_a_first_start_records_what_it_was_given() -> None:
    wanted = Identity(DEFAULT_CLUSTER_ID, 2, MEMBERS)
    assert check(None, wanted, False, False, "d") == wanted


def test_the_same_start_again_is_allowed_and_keeps_the_cluster_id() -> None:
    wanted = Identity(DEFAULT_CLUSTER_ID, 1, MEMBERS)  # no --cluster-id this time
    assert check(RECORD, wanted, False, False, "d") == RECORD


def test_new_addresses_of_the_same_members_are_recorded() -> None:
    moved = {1: "h:1", 2: "elsewhere:2", 3: "h:3"}
    assert check(RECORD, Identity("prod", 1, moved), True, False, "d").members == moved


def test_another_node_id_is_refused_with_the_command_to_run() -> None:
    with pytest.raises(IdentityError, match="as node 2") as err:
        check(RECORD, Identity("prod", 2, MEMBERS), True, False, "/data/n1")
    assert (
        "pq node --data-dir /data/n1 --node-id 1 --cluster-id prod --peers 1=h:1,2=h:2,3=h:3"
        in err.value.message
    )
    assert "pq cluster start-node 1" in err.value.message


def test_a_member_alone_is_refused() -> None:
    with pytest.raises(IdentityError, match="alone"):
        check(RECORD, Identity("prod", 1, {1: ""}), False, False, "d")


def test_another_member_set_is_refused_unless_accepted() -> None:
    fewer = {1: "h:1", 2: "h:2"}
    with pytest.raises(IdentityError, match="accept-member-change"):
        check(RECORD, Identity("prod", 1, fewer), True, False, "d")
    assert check(RECORD, Identity("prod", 1, fewer), True, True, "d") == Identity("prod", 1, fewer)


def test_another_clusters_dir_is_refused_even_with_accepted_member_change() -> None:
    with pytest.raises(IdentityError, match="cluster 'other'"):
        check(RECORD, Identity("other", 1, MEMBERS), True, True, "d")


def test_the_record_round_trips() -> None:
    assert Identity.from_json(RECORD.to_json()) == RECORD


def test_a_dir_from_before_identity_records_is_not_started_alone_if_it_was_a_member() -> None:
    alone = Identity(DEFAULT_CLUSTER_ID, 1, {1: ""})
    with pytest.raises(IdentityError, match=r"holds ballots of nodes \[2, 3\]"):
        check(None, alone, False, False, "d", frozenset({1, 2, 3}))
    assert check(None, alone, False, False, "d", frozenset({1})) == alone  # its own log
    with_peers = Identity(DEFAULT_CLUSTER_ID, 1, MEMBERS)
    assert check(None, with_peers, False, False, "d", frozenset({1, 2, 3})) == with_peers
