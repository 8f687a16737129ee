"""Tree selection, the n-gram draft source and the decoding modes' segment cutting."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowspec_zmq.draft import DraftContext, NgramDraft, TreeShape, select_connected
from flowspec_zmq.strategies import MODES, cut_by_layer, cut_by_score, cut_into_parts, make_strategy
from flowspec_zmq.tree import ROOT_PARENT, DraftTree, TokenTree

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_draft_tree(draft: DraftTree) -> None:
    """Parents index earlier entries (or the root); no two siblings share a token."""
    assert len(draft.tokens) == len(draft.parents) == len(draft.scores)
    siblings = set()
    for i, parent in enumerate(draft.parents):
        assert parent == ROOT_PARENT or 0 <= parent < i
        assert (parent, draft.tokens[i]) not in siblings
        siblings.add((parent, draft.tokens[i]))


def entry_paths(draft: DraftTree) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for token, parent in zip(draft.tokens, draft.parents):
        out.append((out[parent] if parent != ROOT_PARENT else ()) + (token,))
    return out


# -- select_connected -----------------------------------------------------------------------------


@st.composite
def candidate_lists(draw, consistent: bool):
    size = draw(st.integers(0, 40))
    tokens, parents, scores = [], [], []
    for i in range(size):
        parent = draw(st.integers(-1, i - 1))
        tokens.append(i)  # unique tokens: every candidate is its own path
        parents.append(parent)
        if consistent:
            base = 0.0 if parent == ROOT_PARENT else scores[parent]
            scores.append(base - draw(st.floats(0.001, 3.0)))
        else:
            scores.append(draw(st.floats(-10.0, 0.0)))
    return tokens, parents, scores


@SETTINGS
@given(candidate_lists(consistent=False), st.integers(0, 45))
def test_select_connected_is_a_connected_tree_within_budget(candidates, budget: int) -> None:
    tokens, parents, scores = candidates
    draft = select_connected(tokens, parents, scores, budget)
    check_draft_tree(draft)
    assert len(draft.tokens) <= budget
    # Every chosen entry is a real candidate whose whole path was chosen with it.
    original_paths = {tuple(p) for p in _paths(tokens, parents)}
    assert set(entry_paths(draft)) <= original_paths
    for token, score in zip(draft.tokens, draft.scores):
        assert scores[token] == score


def _paths(tokens, parents) -> list[tuple[int, ...]]:
    return entry_paths(DraftTree(tuple(tokens), tuple(parents), tuple(0.0 for _ in tokens)))


@SETTINGS
@given(candidate_lists(consistent=True), st.integers(0, 45))
def test_select_connected_takes_the_best_budget_when_scores_fall_along_paths(candidates, budget: int) -> None:
    tokens, parents, scores = candidates
    draft = select_connected(tokens, parents, scores, budget)
    check_draft_tree(draft)
    # Exactly the `budget` best scores (compared as scores, so ties cannot matter).
    assert sorted(draft.scores) == sorted(scores, reverse=True)[:budget][::-1]
    # Re-indexed parents point at the same original parents.
    for j, token in enumerate(draft.tokens):
        parent = draft.parents[j]
        assert parents[token] == (ROOT_PARENT if parent == ROOT_PARENT else draft.tokens[parent])
    # Best first, which also puts parents first.
    assert list(draft.scores) == sorted(draft.scores, reverse=True)


def test_select_connected_skips_a_child_outranking_its_missing_parent() -> None:
    # Candidate 1 (score -0.1) hangs off candidate 0 (score -5), which the budget leaves out.
    draft = select_connected([10, 11, 12], [ROOT_PARENT, 0, ROOT_PARENT], [-5.0, -0.1, -1.0], budget=1)
    assert draft == DraftTree((12,), (ROOT_PARENT,), (-1.0,))
    draft = select_connected([10, 11, 12], [ROOT_PARENT, 0, ROOT_PARENT], [-5.0, -0.1, -1.0], budget=3)
    check_draft_tree(draft)
    assert draft.tokens[:2] == (12, 10)


# -- NgramDraft -----------------------------------------------------------------------------------


def ngram(tokens, depth: int = 3, top_k: int = 4, total: int = 16, max_ngram: int = 3) -> DraftTree:
    return NgramDraft(max_ngram).draft(DraftContext(tokens, TreeShape(depth=depth, top_k=top_k, total_tokens=total)))


def test_ngram_continues_a_repeated_pattern() -> None:
    draft = ngram([1, 2, 3, 4, 1, 2, 3], depth=3)
    check_draft_tree(draft)
    assert draft.tokens[0] == 4 and draft.parents[0] == ROOT_PARENT
    assert entry_paths(draft)[:3] == [(4,), (4, 1), (4, 1, 2)]
    assert max(len(p) for p in entry_paths(draft)) <= 3


def test_ngram_prefers_the_longest_match() -> None:
    # After ...7 8 9 the 3-gram match continues with 5; the 1-gram "9" also occurs before 6.
    draft = ngram([9, 6, 0, 7, 8, 9, 5, 2, 7, 8, 9], depth=2, total=8)
    check_draft_tree(draft)
    assert draft.tokens[0] == 5
    assert (6,) in entry_paths(draft)
    assert entry_paths(draft).index((5,)) < entry_paths(draft).index((6,))


def test_ngram_without_a_repeat_proposes_nothing() -> None:
    assert ngram([1, 2, 3, 4, 5]) == DraftTree.empty()
    assert ngram([7]) == DraftTree.empty()
    assert ngram([]) == DraftTree.empty()
    assert ngram([1, 2, 1, 2], total=0) == DraftTree.empty()
    assert ngram([1, 2, 1, 2], depth=0) == DraftTree.empty()


@SETTINGS
@given(
    st.lists(st.integers(0, 5), min_size=0, max_size=60),
    st.integers(0, 6),
    st.integers(0, 20),
    st.integers(1, 4),
)
def test_ngram_proposals_are_real_continuations(tokens: list[int], depth: int, total: int, max_ngram: int) -> None:
    draft = ngram(tokens, depth=depth, total=total, max_ngram=max_ngram)
    check_draft_tree(draft)
    assert len(draft.tokens) <= total
    paths = entry_paths(draft)
    assert all(1 <= len(p) <= depth for p in paths)
    for i, parent in enumerate(draft.parents):
        if parent != ROOT_PARENT:
            assert draft.scores[parent] >= draft.scores[i]
    # Each path follows an earlier occurrence of (at least) the context's last token.
    for path in paths:
        assert any(
            tokens[start] == tokens[-1] and tuple(tokens[start + 1 : start + 1 + len(path)]) == path
            for start in range(len(tokens) - 1)
        ), f"{path} continues no earlier occurrence of {tokens[-1]}"


def test_ngram_fills_the_budget_on_a_rich_context() -> None:
    tokens = [random.Random(i).randrange(4) for i in range(300)]  # many distinct continuations
    draft = ngram(tokens, depth=4, total=10)
    check_draft_tree(draft)
    assert len(draft.tokens) == 10


# -- strategies -----------------------------------------------------------------------------------


def small_tree(width: int = 3, depth: int = 3) -> TokenTree:
    """A full `width`-ary tree of the given depth with distinct scores falling along paths."""
    tree = TokenTree(0, 20)
    frontier = [tree.root]
    counter = 0
    for _ in range(depth):
        nxt = []
        for parent in frontier:
            for token in range(width):
                counter += 1
                score = tree.nodes[parent].score - 0.1 * (token + 1) - 0.001 * counter
                nxt.append(tree.add_child(parent, token, score))
        frontier = nxt
    return tree


def drain(tree: TokenTree, strategy_cut, max_in_flight: int) -> list[list[int]]:
    segments = []
    while len(segments) < max_in_flight and (nodes := strategy_cut(tree, len(segments))):
        tree.mark_sent(nodes)
        segments.append([n.id for n in nodes])
    return segments


def score_order(tree: TokenTree) -> list[int]:
    return [n.id for n in sorted(tree.nodes.values(), key=lambda n: -n.score)]


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5])
def test_cut_into_parts_splits_the_tree_into_score_ordered_segments(parts: int) -> None:
    tree = small_tree()
    n = len(tree)  # 40
    expected = score_order(tree)
    segments = drain(tree, cut_into_parts(parts), max_in_flight=parts)
    assert len(segments) == parts
    assert [i for s in segments for i in s] == expected
    sizes = [len(s) for s in segments]
    assert max(sizes) - min(sizes) <= 1 and sizes[0] == math.ceil(n / parts)
    assert tree.unsent() == []


@SETTINGS
@given(st.integers(1, 60), st.integers(1, 8))
def test_cut_into_parts_sizes(nodes: int, parts: int) -> None:
    tree = TokenTree(0, 0)
    for i in range(nodes - 1):
        tree.add_child(tree.root, i, -float(i + 1))
    segments = drain(tree, cut_into_parts(parts), max_in_flight=parts)
    sizes = [len(s) for s in segments]
    assert sum(sizes) == nodes and len(segments) == min(parts, nodes)
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_cut_by_layer_sends_shallowest_layer_capped_at_width() -> None:
    tree = small_tree(width=3, depth=3)
    cut = cut_by_layer(2)
    layers = []
    while nodes := cut(tree, 0):
        assert len(nodes) <= 2
        depths = {n.depth for n in nodes}
        assert len(depths) == 1
        waiting = [n for n in tree.nodes.values() if not n.sent]
        assert depths == {min(n.depth for n in waiting)}
        # The best of that layer first.
        layer = sorted((n for n in waiting if n.depth in depths), key=lambda n: -n.score)
        assert [n.id for n in nodes] == [n.id for n in layer[:2]]
        tree.mark_sent(nodes)
        layers.append(depths.pop())
    assert layers == [0] + [1] * 2 + [2] * 5 + [3] * 14
    assert cut(tree, 0) == []


def test_cut_by_score_returns_the_best_unsent_nodes() -> None:
    tree = small_tree()
    expected = score_order(tree)
    cut = cut_by_score(16)
    assert [n.id for n in cut(tree, 0)] == expected[:16]
    tree.mark_sent(cut(tree, 0))
    assert [n.id for n in cut(tree, 3)] == expected[16:32]
    tree.mark_sent(cut(tree, 0))
    assert [n.id for n in cut(tree, 0)] == expected[32:]
    tree.mark_sent(cut(tree, 0))
    assert cut(tree, 0) == []


@pytest.mark.parametrize("mode", MODES)
def test_make_strategy_modes(mode) -> None:
    stages, segment_size, layer_width = 4, 6, 5
    strategy = make_strategy(mode, stages, segment_size, layer_width)
    assert strategy.mode == mode
    tree = small_tree()
    expected = score_order(tree)
    segments = drain(tree, strategy.cut, strategy.max_in_flight)
    if mode == "ar":
        assert (strategy.max_in_flight, strategy.uses_draft) == (1, False)
        assert not strategy.verify_when_drained and not strategy.send_when_settled
        assert segments == [[tree.root]]
    elif mode == "tree":  # Chunk-PP: the whole tree in `stages` parts, verified once all return
        assert (strategy.max_in_flight, strategy.uses_draft) == (stages, True)
        assert strategy.verify_when_drained and strategy.send_when_settled and not strategy.draft_while_in_flight
        assert len(segments) == stages and [i for s in segments for i in s] == expected
    elif mode == "specpipe":  # one tree layer per step, `layer_width` wide
        assert (strategy.max_in_flight, strategy.uses_draft) == (stages, True)
        assert not strategy.verify_when_drained and strategy.draft_while_in_flight
        assert strategy.full_segment == layer_width
        assert [len(s) for s in segments] == [1, 3, 5, 4]
        assert [{tree.nodes[i].depth for i in s} for s in segments] == [{0}, {1}, {2}, {2}]
    else:  # flowspec: best `segment_size` nodes per step
        assert (strategy.max_in_flight, strategy.uses_draft) == (stages, True)
        assert not strategy.verify_when_drained and strategy.draft_while_in_flight
        assert strategy.full_segment == segment_size
        assert segments == [expected[i : i + segment_size] for i in range(0, stages * segment_size, segment_size)]


def test_make_strategy_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        make_strategy("beam", 2, 8, 8)  # type: ignore[arg-type]
