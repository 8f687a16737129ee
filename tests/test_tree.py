"""TokenTree: merging, send order, verification and re-rooting, checked against independent models."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowspec_zmq.tree import ROOT_PARENT, DraftTree, Node, TokenTree


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VOCAB = 4  # few tokens: drafts collide with each other and targets often match a child


@st.composite
def draft_trees(draw, max_size: int = 14, consistent: bool = True) -> DraftTree:
    """A draft: parents index earlier entries or -1; with `consistent`, scores never increase along
    a path (cumulative log-probs), else they are arbitrary."""
    size = draw(st.integers(0, max_size))
    tokens, parents, scores = [], [], []
    for i in range(size):
        parent = draw(st.integers(-1, i - 1))
        tokens.append(draw(st.integers(0, VOCAB - 1)))
        parents.append(parent)
        if consistent:
            base = 0.0 if parent == ROOT_PARENT else scores[parent]
            # Whole-number steps make exact ties between parent and child likely.
            scores.append(base - draw(st.integers(0, 3)) * 0.5)
        else:
            scores.append(draw(st.integers(-8, 2)) * 0.5)
    return DraftTree(tuple(tokens), tuple(parents), tuple(scores))


# -- independent views of the tree, computed from parent pointers only ------------------------


def children_of(tree: TokenTree, node_id: int) -> list[Node]:
    return [n for n in tree.nodes.values() if n.parent == node_id and n.id != tree.root]


def subtree_ids(tree: TokenTree, node_id: int) -> set[int]:
    """Nodes whose chain of parents reaches node_id (node_id included)."""
    out = set()
    for n in tree.nodes.values():
        current = n.id
        while current in tree.nodes:
            if current == node_id:
                out.add(n.id)
                break
            if current == tree.root:
                break
            current = tree.nodes[current].parent
    return out


def check_structure(tree: TokenTree) -> None:
    root = tree.nodes[tree.root]
    assert root.parent == ROOT_PARENT and root.depth == 0
    for node in tree.nodes.values():
        assert tree.nodes[node.id] is node
        if node.id == tree.root:
            continue
        parent = tree.nodes[node.parent]  # every parent is alive: the tree is connected
        assert node.depth == parent.depth + 1
        assert node.position == parent.position + 1
        assert parent.children.get(node.token) == node.id
    for node in tree.nodes.values():
        kids = children_of(tree, node.id)
        tokens = [k.token for k in kids]
        assert len(tokens) == len(set(tokens)), f"duplicate sibling tokens below {node.id}: {tokens}"
        assert node.children == {k.token: k.id for k in kids}
    # Everything hangs off the root.
    assert subtree_ids(tree, tree.root) == set(tree.nodes)


def check_unsent_order(tree: TokenTree) -> list[Node]:
    order = tree.unsent()
    ids = [n.id for n in order]
    assert len(ids) == len(set(ids))
    assert set(ids) == {n.id for n in tree.nodes.values() if not n.sent}
    seen = set()
    for node in order:
        if node.id != tree.root:
            parent = tree.nodes[node.parent]
            assert parent.sent or parent.id in seen, f"node {node.id} listed before its unsent parent {parent.id}"
        seen.add(node.id)
    return order


def paths(tree: TokenTree) -> set[tuple[int, ...]]:
    return {tuple(tree.path_tokens(i)) for i in tree.nodes}


def draft_paths(draft: DraftTree) -> set[tuple[int, ...]]:
    out = set()
    for i in range(len(draft.tokens)):
        path, j = [], i
        while j != ROOT_PARENT:
            path.append(draft.tokens[j])
            j = draft.parents[j]
        out.add(tuple(reversed(path)))
    return out


def expected_walk(tree: TokenTree) -> tuple[list[int], list[int], int | None]:
    """The greedy walk from the root using parent pointers only: (tokens, accepted ids, the id of the
    node where the walk stops, or None when it falls off the tree with a bonus token)."""
    tokens, accepted = [], []
    node = tree.nodes[tree.root]
    while node.target is not None:
        tokens.append(node.target)
        accepted.append(node.id)
        match = [c for c in children_of(tree, node.id) if c.token == node.target]
        if not match:
            return tokens, accepted, None
        node = match[0]
    return tokens, accepted, node.id


# -- properties ------------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 100), st.integers(0, 1000), st.lists(draft_trees(), min_size=1, max_size=4))
def test_merge_keeps_a_well_formed_tree(root_token: int, root_position: int, drafts: list[DraftTree]) -> None:
    tree = TokenTree(root_token, root_position)
    expected_paths = {()}
    for draft in drafts:
        before = set(tree.nodes)
        created = tree.merge(draft)
        assert set(created) == set(tree.nodes) - before
        assert len(created) == len(set(created))
        expected_paths |= draft_paths(draft)
        check_structure(tree)
        # The tree holds exactly the union of the drafts' token paths, each once.
        assert paths(tree) == expected_paths
        assert len(tree) == len(expected_paths)
        for node in tree.nodes.values():
            assert node.position == root_position + node.depth
            if node.id != tree.root:
                # Merging keeps every parent scored at or above its children.
                assert tree.nodes[node.parent].score >= node.score
        order = check_unsent_order(tree)
        # With consistent scores no child waits for its parent: the order is plain score order.
        assert order == sorted(order, key=lambda n: (-n.score, n.depth, n.id))


@SETTINGS
@given(draft_trees())
def test_merge_takes_the_best_score_of_a_repeated_path(draft: DraftTree) -> None:
    tree = TokenTree(7, 3)
    tree.merge(draft)
    best: dict[tuple[int, ...], float] = {}
    for i, path in enumerate(_entry_paths(draft)):
        best[path] = max(best.get(path, float("-inf")), draft.scores[i])
    for node_id in tree.nodes:
        if node_id != tree.root:
            assert tree.nodes[node_id].score == best[tuple(tree.path_tokens(node_id))]


def _entry_paths(draft: DraftTree) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for token, parent in zip(draft.tokens, draft.parents):
        out.append((out[parent] if parent != ROOT_PARENT else ()) + (token,))
    return out


@st.composite
def sessions(draw, consistent: bool = True):
    """A random decoding session: (root token, position, list of steps); each step merges a draft,
    sends a prefix of unsent(), returns targets for some in-flight nodes and verifies."""
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        steps.append(
            (
                draw(draft_trees(max_size=10, consistent=consistent)),
                draw(st.integers(0, 12)),  # how many unsent nodes to send
                draw(st.lists(st.integers(0, VOCAB - 1), max_size=30)),  # target tokens to hand out
                draw(st.lists(st.booleans(), max_size=30)),  # which in-flight nodes get one
            )
        )
    return draw(st.integers(0, VOCAB - 1)), draw(st.integers(0, 50)), steps


def run_session(session, check_order_is_score_order: bool) -> None:
    root_token, root_position, steps = session
    tree = TokenTree(root_token, root_position)
    ever_seen: set[int] = set(tree.nodes)
    committed_length = root_position + 1  # tokens up to and including the root
    for draft, send_count, targets, chosen in steps:
        created = tree.merge(draft)
        assert all(i not in ever_seen for i in created), "merge reused an id"
        assert all(i > max(ever_seen) for i in created), "ids must grow"
        ever_seen |= set(created)
        check_structure(tree)
        order = check_unsent_order(tree)
        if check_order_is_score_order:
            assert order == sorted(order, key=lambda n: (-n.score, n.depth, n.id))

        tree.mark_sent(order[:send_count])
        in_flight = [n.id for n in tree.nodes.values() if n.sent and n.target is None]
        assert sorted(tree.in_flight()) == sorted(in_flight)
        returned = [i for i, pick in zip(in_flight, chosen) if pick]
        tree.set_targets(returned, targets[: len(returned)])
        tree.set_targets([max(ever_seen) + 1000], [0])  # unknown ids are ignored

        old_root = tree.root
        old_nodes = {i: (n.depth, n.position, n.score, n.sent, n.token) for i, n in tree.nodes.items()}
        old_parent = {i: n.parent for i, n in tree.nodes.items()}
        tokens, accepted, stop = expected_walk(tree)
        max_before = max(ever_seen)
        advance = tree.verify()

        assert list(advance.tokens) == tokens
        assert list(advance.accepted) == accepted
        if not accepted:
            assert tree.root == old_root and set(tree.nodes) == set(old_nodes)
        elif stop is None:
            # Fell off the tree: a fresh, unsent root holding the bonus token, nothing survives.
            assert tree.root > max_before and tree.root not in ever_seen
            assert list(tree.nodes) == [tree.root]
            root = tree.nodes[tree.root]
            assert root.token == tokens[-1] and not root.sent and root.target is None
            assert root.position == old_nodes[accepted[-1]][1] + 1
            assert root.score == 0.0 and root.depth == 0
        else:
            assert tree.root == stop
            assert tree.nodes[stop].token == tokens[-1]
            # Exactly the new root's subtree remains (computed on the old tree from parent pointers).
            assert set(tree.nodes) == descendants(old_parent, stop)
            base_depth, _, base_score, _, _ = old_nodes[stop]
            for i, node in tree.nodes.items():
                depth, position, score, sent, token = old_nodes[i]
                assert (node.position, node.sent, node.token) == (position, sent, token)
                assert node.depth == depth - base_depth
                assert node.score == score - base_score
        assert set(advance.survivors) == {i for i, n in tree.nodes.items() if n.sent}
        assert len(advance.survivors) == len(set(advance.survivors))
        ever_seen |= set(tree.nodes)
        committed_length += len(tokens)
        assert tree.nodes[tree.root].position == committed_length - 1
        check_structure(tree)
        check_unsent_order(tree)


def descendants(parent_of: dict[int, int], node_id: int) -> set[int]:
    """node_id and every node whose chain of parents passes through it."""
    out = set()
    for i in parent_of:
        j = i
        while j != ROOT_PARENT:
            if j == node_id:
                out.add(i)
                break
            j = parent_of[j]
    return out


@SETTINGS
@given(sessions())
def test_sessions_with_consistent_drafts(session) -> None:
    run_session(session, check_order_is_score_order=True)


@SETTINGS
@given(sessions(consistent=False))
def test_sessions_with_inconsistent_scores_keep_parents_first(session) -> None:
    run_session(session, check_order_is_score_order=False)


@SETTINGS
@given(draft_trees(max_size=16), st.data())
def test_verify_keeps_exactly_the_subtree_of_the_new_root(draft: DraftTree, data) -> None:
    """An explicit check of re-rooting against a copy of the tree taken before verify()."""
    tree = TokenTree(0, 10)
    tree.merge(draft)
    tree.mark_sent(tree.unsent()[: data.draw(st.integers(0, len(tree)))])
    sent = [n.id for n in tree.nodes.values() if n.sent]
    returned = data.draw(st.lists(st.sampled_from(sent), unique=True)) if sent else []
    tree.set_targets(returned, [data.draw(st.integers(0, VOCAB - 1)) for _ in returned])
    parent_of = {i: n.parent for i, n in tree.nodes.items()}
    sent_before = {i for i, n in tree.nodes.items() if n.sent}
    _, accepted, stop = expected_walk(tree)
    advance = tree.verify()
    if accepted and stop is not None:
        kept = descendants(parent_of, stop)
        assert set(tree.nodes) == kept
        assert set(advance.survivors) == kept & sent_before


# -- examples ------------------------------------------------------------------------------------


def hand_built() -> tuple[TokenTree, dict[str, int]]:
    """Root 100 at position 9:

        100 ─┬─ 1 (-0.1) ─┬─ 2 (-0.3) ── 3 (-0.6)
             │            └─ 4 (-0.9)
             └─ 5 (-0.2) ── 6 (-0.5)
    """
    tree = TokenTree(100, 9)
    created = tree.merge(
        DraftTree(
            tokens=(1, 5, 2, 4, 6, 3),
            parents=(-1, -1, 0, 0, 1, 2),
            scores=(-0.1, -0.2, -0.3, -0.9, -0.5, -0.6),
        )
    )
    names = {"root": tree.root}
    names.update({f"t{tree.nodes[i].token}": i for i in created})
    return tree, names


def test_hand_built_tree_shape_and_order() -> None:
    tree, n = hand_built()
    assert len(tree) == 7 and n["t1"] in tree and 999 not in tree
    assert tree.path_tokens(n["t3"]) == [1, 2, 3]
    assert tree.path_tokens(tree.root) == []
    assert sorted(tree.subtree(n["t1"])) == sorted([n["t1"], n["t2"], n["t3"], n["t4"]])
    assert [(x.token, x.depth, x.position) for x in tree.unsent()] == [
        (100, 0, 9), (1, 1, 10), (5, 1, 10), (2, 2, 11), (6, 2, 11), (3, 3, 12), (4, 2, 11)
    ]
    # Re-merging an existing path creates nothing and raises a score only upwards.
    assert tree.merge(DraftTree((1, 2), (-1, 0), (-0.05, -0.07))) == []
    assert tree.nodes[n["t1"]].score == -0.05 and tree.nodes[n["t2"]].score == -0.07
    assert tree.merge(DraftTree((1,), (-1,), (-3.0,))) == []
    assert tree.nodes[n["t1"]].score == -0.05
    assert tree.add_child(n["t1"], 2, -9.0) == n["t2"]


def test_hand_built_partial_acceptance_reroots_into_an_in_flight_child() -> None:
    tree, n = hand_built()
    first = tree.unsent()[:4]  # root, 1, 5, 2
    tree.mark_sent(first)
    tree.mark_sent(tree.unsent()[:2])  # 6, 3 — in flight, no targets yet
    tree.set_targets([n["root"], n["t1"], n["t5"]], [1, 2, 6])
    advance = tree.verify()
    # root -> 1 (target 1), 1 -> 2 (target 2); node 2 has no target yet: it becomes the root.
    assert advance.tokens == (1, 2)
    assert advance.accepted == (n["root"], n["t1"])
    assert tree.root == n["t2"]
    assert set(tree.nodes) == {n["t2"], n["t3"]}
    assert set(advance.survivors) == {n["t2"], n["t3"]}
    root = tree.nodes[tree.root]
    assert (root.parent, root.depth, root.position, root.score) == (ROOT_PARENT, 0, 11, 0.0)
    assert tree.nodes[n["t3"]].position == 12
    assert tree.unsent() == []


def test_reroot_rebases_descendants() -> None:
    tree, n = hand_built()
    tree.mark_sent(tree.unsent()[:4])  # root, 1, 5, 2
    tree.set_targets([n["root"]], [1])
    tree.verify()
    assert tree.root == n["t1"]
    # Relative to node 1 (depth 1, score -0.1): 2 -> (1, -0.2), 4 -> (1, -0.8), 3 -> (2, -0.5).
    got = {tree.nodes[i].token: (tree.nodes[i].depth, round(tree.nodes[i].score, 9)) for i in tree.nodes}
    assert got == {1: (0, 0.0), 2: (1, -0.2), 4: (1, -0.8), 3: (2, -0.5)}


def test_hand_built_mismatch_ends_the_round_with_a_bonus_token() -> None:
    tree, n = hand_built()
    tree.mark_sent(tree.unsent())
    tree.set_targets([n["root"], n["t5"]], [5, 42])
    advance = tree.verify()
    assert advance.tokens == (5, 42)
    assert advance.accepted == (n["root"], n["t5"])
    assert advance.survivors == ()
    assert len(tree) == 1
    root = tree.nodes[tree.root]
    assert root.token == 42 and root.position == 11 and not root.sent
    assert tree.root > max(n.values())
    assert [x.id for x in tree.unsent()] == [tree.root]


def test_hand_built_acceptance_into_an_unsent_child() -> None:
    tree, n = hand_built()
    tree.mark_sent(tree.unsent()[:2])  # root and 1
    tree.set_targets([n["root"], n["t1"]], [1, 4])
    advance = tree.verify()
    assert advance.tokens == (1, 4) and advance.accepted == (n["root"], n["t1"])
    assert tree.root == n["t4"] and set(tree.nodes) == {n["t4"]}
    assert advance.survivors == ()
    assert not tree.nodes[tree.root].sent


def test_no_target_for_the_root_changes_nothing() -> None:
    tree, n = hand_built()
    tree.mark_sent(tree.unsent())
    tree.set_targets([n["t1"]], [2])
    advance = tree.verify()
    assert advance.tokens == () and advance.accepted == ()
    assert tree.root == n["root"] and len(tree) == 7
    assert set(advance.survivors) == set(n.values())
    assert sorted(tree.in_flight()) == sorted(i for i in n.values() if i != n["t1"])


def test_unsent_defers_a_child_scored_above_its_unsent_parent() -> None:
    tree = TokenTree(0, 0)
    a = tree.add_child(tree.root, 1, -2.0)
    b = tree.add_child(a, 2, -0.5)  # scores above its parent
    c = tree.add_child(tree.root, 3, -1.0)
    d = tree.add_child(b, 4, -0.1)
    assert [x.id for x in tree.unsent()] == [tree.root, c, a, b, d]
    tree.mark_sent([tree.nodes[tree.root], tree.nodes[a]])
    # b may go now (its parent is sent) and brings d straight after it.
    assert [x.id for x in tree.unsent()] == [b, d, c]


def test_merged_drafts_after_a_reroot_rank_with_old_nodes() -> None:
    tree, n = hand_built()
    tree.mark_sent(tree.unsent()[:3])  # root, 1, 5
    tree.set_targets([n["root"]], [1])
    tree.verify()
    assert tree.root == n["t1"]
    # Scores are now relative to node 1: 2 -> -0.2, 4 -> -0.8.
    created = tree.merge(DraftTree((2, 7, 4), (-1, 0, -1), (-0.1, -0.4, -0.3)))
    assert [tree.nodes[i].token for i in created] == [7]
    assert abs(tree.nodes[n["t2"]].score - (-0.1)) < 1e-12
    assert abs(tree.nodes[n["t4"]].score - (-0.3)) < 1e-12
    assert [x.token for x in tree.unsent()] == [2, 4, 7, 3]


# -- incremental drafting: proposals for frontier nodes ------------------------------------------------

def test_proposals_grow_the_tree_by_score_within_the_budget() -> None:
    tree = TokenTree(100, 9)
    added = tree.add_proposals([(tree.root, [(1, -0.1), (2, -1.0), (3, -2.0)])], budget=2)
    assert added.stale == 0 and len(added.created) == 2  # the budget keeps only the two best
    assert [tree.nodes[i].token for i in added.created] == [1, 2]
    assert tree.nodes[tree.root].expanded and tree.pending() == 2
    assert tree.expansion_floor(2) == pytest.approx(-1.0)  # only nodes above the worst leaf may grow
    one = tree.nodes[tree.root].children[1]
    # At the budget a better grandchild replaces the worst spare leaf (token 2); a worse one does not.
    added = tree.add_proposals([(one, [(7, -0.5), (8, -3.0)])], budget=2)
    child = tree.nodes[added.created[0]]
    assert (child.token, child.depth, child.position, child.score) == (7, 2, 11, pytest.approx(-0.6))
    assert len(added.created) == 1 and 2 not in tree.nodes[tree.root].children and tree.pending() == 2
    assert tree.add_proposals([(one, [(7, -0.5)])], budget=10).created == ()  # no duplicate siblings


def test_sent_and_expanded_nodes_are_never_replaced() -> None:
    tree = TokenTree(100, 9)
    tree.add_proposals([(tree.root, [(1, -0.1), (2, -5.0)])], budget=2)
    tree.mark_sent(tree.unsent())  # both children are in flight
    one = tree.nodes[tree.root].children[1]
    assert tree.add_proposals([(one, [(7, -0.2)])], budget=2).created == ()
    assert tree.expansion_floor(2) == math.inf


def test_proposals_whose_parent_a_verification_removed_are_dropped() -> None:
    tree = TokenTree(100, 9)
    tree.add_proposals([(tree.root, [(1, -0.1), (2, -1.0)])], budget=8)
    one, two = tree.nodes[tree.root].children[1], tree.nodes[tree.root].children[2]
    tree.mark_sent(tree.unsent())
    # A draft step for both children is running when the target picks token 1 after the root.
    tree.set_targets([tree.root], [1])
    advance = tree.verify()
    assert advance.tokens == (1,) and tree.root == one and two not in tree
    before = {i: (n.token, n.parent, n.depth, n.position) for i, n in tree.nodes.items()}
    added = tree.add_proposals([(one, [(5, -0.2)]), (two, [(6, -0.1), (7, -0.3)])], budget=8)
    assert added.stale == 2
    (five,) = added.created
    assert tree.nodes[five].parent == one and tree.nodes[five].token == 5
    assert {i: (n.token, n.parent, n.depth, n.position) for i, n in tree.nodes.items() if i != five} == before
    assert check_unsent_order(tree) == [tree.nodes[five]]
