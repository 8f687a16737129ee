"""TreeKVCache bookkeeping with small random tensors standing in for a forward pass."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowspec_zmq.kv_cache import LayerShape, TreeKVCache
from flowspec_zmq.model_slices import load_layer_window

FIRST_LAYER = 3
SHAPES = [LayerShape(kv_heads=2, head_dim=3), LayerShape(kv_heads=1, head_dim=4)]


class Forward:
    """Drives a cache the way a layer window does, remembering every row it wrote so tests can
    check where each one ended up."""

    def __init__(self, capacity: int = 8, seed: int = 0) -> None:
        self.cache = TreeKVCache(FIRST_LAYER, SHAPES, torch.float32, capacity=capacity)
        self.generator = torch.Generator().manual_seed(seed)
        self.committed_rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per row, per layer
        self.node_rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.parent_of: dict[int, int] = {}
        self.position_of: dict[int, int] = {}

    def _random_kv(self, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (
                torch.randn(1, s.kv_heads, rows, s.head_dim, generator=self.generator),
                torch.randn(1, s.kv_heads, rows, s.head_dim, generator=self.generator),
            )
            for s in SHAPES
        ]

    def _write(self, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cache = self.cache
        cache.reserve(rows)
        assert cache.capacity >= cache.length + rows
        before = cache.length
        kv = self._random_kv(rows)
        for local, (key, value) in enumerate(kv):
            keys, values = cache.update(key, value, FIRST_LAYER + local)
            # Attention sees every earlier row plus the new ones, without a copy of the buffer.
            assert keys.shape[2] == values.shape[2] == before + rows
            assert torch.equal(keys[:, :, before:], key) and torch.equal(values[:, :, before:], value)
            assert keys.data_ptr() == cache.keys[local].data_ptr()
        return kv

    @staticmethod
    def _row(kv, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[0, :, i].clone(), v[0, :, i].clone()) for k, v in kv]

    def commit(self, rows: int) -> None:
        kv = self._write(rows)
        self.cache.append_committed(rows)
        self.committed_rows.extend(self._row(kv, i) for i in range(rows))

    def tree(self, node_ids: list[int], parents: list[int], positions: list[int]) -> torch.Tensor:
        rows = self.cache.tree_rows_for(node_ids, parents, positions)  # before the forward, as the window does
        kv = self._write(len(node_ids))
        self.cache.add_tree_rows(node_ids, positions, rows)
        for i, (node, parent, position) in enumerate(zip(node_ids, parents, positions)):
            self.node_rows[node] = self._row(kv, i)
            self.parent_of[node] = parent
            self.position_of[node] = position
        return rows

    def prune(self, accepted: list[int], survivors: list[int]) -> None:
        self.cache.prune(accepted, survivors)
        self.committed_rows.extend(self.node_rows[n] for n in accepted)

    # -- checks ---------------------------------------------------------------------------------
    def stored_row(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[0, :, row], v[0, :, row]) for k, v in zip(self.cache.keys, self.cache.values)]

    def ancestors(self, node: int) -> set[int]:
        """node and its ancestors among the nodes this driver wrote."""
        out = set()
        while node in self.parent_of:
            out.add(node)
            node = self.parent_of[node]
        return out

    def check(self) -> None:
        cache = self.cache
        assert cache.committed == len(self.committed_rows)
        for row, expected in enumerate(self.committed_rows):
            for (k, v), (ek, ev) in zip(self.stored_row(row), expected):
                assert torch.equal(k, ek) and torch.equal(v, ev), f"committed row {row} differs"
        assert cache.length == cache.committed + cache.tree_size
        assert cache.ancestors.shape == (cache.tree_size, cache.tree_size)
        assert cache.row_of == {n: i for i, n in enumerate(cache.node_ids)}
        for i, node in enumerate(cache.node_ids):
            for (k, v), (ek, ev) in zip(self.stored_row(cache.committed + i), self.node_rows[node]):
                assert torch.equal(k, ek) and torch.equal(v, ev), f"tree row of node {node} differs"
            assert cache.node_positions[i] == self.position_of[node]
            live_ancestors = self.ancestors(node) & set(cache.node_ids)
            assert {cache.node_ids[j] for j in torch.nonzero(cache.ancestors[i]).flatten().tolist()} == live_ancestors


def test_committed_rows_and_update_offsets() -> None:
    f = Forward(capacity=16)
    f.commit(3)
    f.commit(2)
    f.check()
    assert f.cache.committed == 5 and f.cache.tree_size == 0


def test_capacity_growth_preserves_committed_and_tree_rows() -> None:
    f = Forward(capacity=2, seed=1)
    f.commit(3)  # grows on the first write
    assert f.cache.capacity >= 3
    f.tree([10, 11], [-1, 10], [3, 4])
    f.tree([12, 13, 14, 15, 16], [11, 10, 12, -1, 15], [5, 4, 6, 3, 4])
    assert f.cache.capacity >= 10
    f.check()
    grown = f.cache.capacity
    f.cache.reserve(0)
    f.cache.reserve(grown - f.cache.length)
    assert f.cache.capacity == grown  # no growth when it fits
    f.tree([17], [16], [5])
    f.check()


def test_tree_rows_for_parents_in_segment_in_tree_and_root() -> None:
    f = Forward(capacity=4)
    f.commit(2)
    # Segment 1: 0 hangs off the committed prefix; 1, 2 are its children (parents in the segment).
    rows = f.tree([0, 1, 2], [-1, 0, 1], [2, 3, 4])
    assert rows.tolist() == [
        [True, False, False],
        [True, True, False],
        [True, True, True],
    ]
    # Segment 2: 3 below 1 (a live tree row), 4 below 3 (same segment), 6 below -1 (the prefix).
    rows = f.cache.tree_rows_for([3, 4, 6], [1, 3, -1], [4, 5, 2])
    assert rows.tolist() == [
        [True, True, False, True, False, False],
        [True, True, False, True, True, False],
        [False, False, False, False, False, True],
    ]
    f.tree([3, 4, 6], [1, 3, -1], [4, 5, 2])
    f.check()


def test_prune_moves_accepted_rows_and_keeps_survivors() -> None:
    f = Forward(capacity=4, seed=2)
    f.commit(3)
    f.tree([0, 1, 2, 3], [-1, 0, 0, 1], [3, 4, 4, 5])
    f.tree([4, 5, 6], [3, 2, 4], [6, 5, 7])
    f.tree([7], [4], [7])
    # Accept 0 -> 1 -> 3 (3 is the last accepted), 4 becomes the new root; its subtree {4, 6, 7}
    # survives, and 9 (still upstream) is named but not here.
    f.prune([0, 1, 3], [4, 9, 6, 7])
    assert f.cache.committed == 6
    assert f.cache.node_ids == [4, 6, 7]
    assert f.cache.node_positions == [6, 7, 7]
    assert f.cache.ancestors.tolist() == [
        [True, False, False],
        [True, True, False],
        [True, False, True],
    ]
    f.check()
    # The next segment hangs off the surviving rows.
    f.tree([8], [6], [8])
    assert f.cache.ancestors[-1].tolist() == [True, True, False, True]
    f.check()


def test_prune_in_place_and_drop_everything() -> None:
    f = Forward(capacity=32, seed=3)
    f.commit(1)
    f.tree([0, 1, 2], [-1, 0, 1], [1, 2, 3])
    data_before = [k.clone() for k in f.cache.keys]
    f.prune([0], [1, 2])  # already in place: nothing moves
    f.check()
    assert all(torch.equal(a, b) for a, b in zip(data_before, f.cache.keys))
    f.prune([], [])  # drop every tree row
    f.check()
    assert f.cache.tree_size == 0 and f.cache.committed == 2
    f.commit(2)  # committed rows can be appended again once no tree row is live
    f.check()


def test_prune_of_missing_accepted_row_raises_and_changes_nothing() -> None:
    f = Forward(capacity=16, seed=4)
    f.commit(2)
    f.tree([0, 1], [-1, 0], [2, 3])
    with pytest.raises(KeyError):
        f.cache.prune([0, 5], [1])
    f.check()  # untouched


def test_append_committed_refuses_while_tree_rows_are_live() -> None:
    f = Forward(capacity=16)
    f.tree([0], [-1], [0])
    with pytest.raises(RuntimeError):
        f.cache.append_committed(1)


def test_a_commit_segment_while_tree_rows_are_live_is_refused_before_attention() -> None:
    f = Forward(capacity=16)
    f.commit(2)
    f.tree([0, 1], [-1, 0], [2, 3])
    with pytest.raises(RuntimeError, match=r"a commit segment \(3 rows\) arrived while 2 tree rows are live"):
        f.commit(3)  # refused at the first update(), before attention reads a mask of the wrong shape
    f.check()  # untouched


def test_a_layer_window_refuses_prefill_rows_while_tree_rows_are_live(model_dir) -> None:
    window = load_layer_window(model_dir, 0, 1, torch.float32)
    cache = window.new_cache()
    hidden = torch.randn(3, window.config.hidden_size)
    window(hidden[:2], cache, True, [0, 1], [-1, -1], [0, 1])
    window(hidden[2:], cache, False, [0], [-1], [2])
    with pytest.raises(RuntimeError, match=r"a commit segment \(1 rows\) arrived while 1 tree rows are live"):
        window(hidden[2:], cache, True, [2], [-1], [2])
    assert (cache.committed, cache.node_ids) == (2, [0])


def test_a_tree_row_under_an_unknown_parent_is_refused() -> None:
    f = Forward(capacity=16)
    f.commit(2)
    f.tree([0, 1], [-1, 0], [2, 3])
    with pytest.raises(LookupError, match=r"node 5 at position 4 names parent 77, which is neither a live tree row"):
        f.tree([5], [77], [4])
    f.check()  # untouched
    # A parent that a prune has just committed is no tree row either: the next root comes under -1.
    f.prune([0], [1])
    with pytest.raises(LookupError, match=r"node 6 at position 3 names parent 0"):
        f.tree([6], [0], [3])
    f.check()


def test_a_root_row_must_sit_right_after_the_committed_prefix() -> None:
    f = Forward(capacity=16)
    f.commit(3)
    with pytest.raises(ValueError, match=r"node 0 at position 5 hangs off the committed prefix \(parent -1\), so it "
                                         r"must sit right after it, at position 3"):
        f.tree([0], [-1], [5])
    f.check()  # untouched
    f.tree([0], [-1], [3])
    f.check()


def test_a_node_id_twice_in_one_segment_is_refused() -> None:
    f = Forward(capacity=16)
    f.commit(1)
    with pytest.raises(ValueError, match=r"node id 2 \(position 2\) appears twice in one segment"):
        f.tree([1, 2, 2], [-1, 1, 1], [1, 2, 2])
    f.check()  # untouched


def test_a_node_id_already_live_is_refused() -> None:
    f = Forward(capacity=16)
    f.commit(1)
    f.tree([0, 1], [-1, 0], [1, 2])
    with pytest.raises(ValueError, match=r"node id 1 \(position 2\) already has a live tree row here"):
        f.tree([3, 1], [0, 0], [2, 2])
    f.check()  # untouched


def test_truncate_forgets_tree_rows_and_later_committed_rows() -> None:
    f = Forward(capacity=16, seed=5)
    f.commit(6)
    f.tree([0, 1], [-1, 0], [6, 7])
    f.cache.truncate(4)
    assert (f.cache.committed, f.cache.tree_size, f.cache.length) == (4, 0, 4)
    assert f.cache.ancestors.shape == (0, 0) and f.cache.row_of == {} and f.cache.node_positions == []
    del f.committed_rows[4:]
    f.check()
    f.commit(1)  # the next write lands at row 4
    f.check()
    f.cache.truncate(100)  # beyond the prefix: only the tree is forgotten
    assert f.cache.committed == 5
    f.check()


@st.composite
def prune_scenarios(draw):
    """A random tree sent in random segments (parents before children), then a verification
    outcome: an accepted root-to-node path and the new root's subtree as survivors, with some
    survivors not yet written (still upstream)."""
    size = draw(st.integers(1, 14))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, size)]
    written = draw(st.integers(1, size))  # nodes [written, size) are still upstream
    cuts = sorted(draw(st.sets(st.integers(1, written - 1), max_size=4))) if written > 1 else []
    segments = [list(range(a, b)) for a, b in zip([0, *cuts], [*cuts, written])]
    children = {i: [j for j in range(size) if parents[j] == i] for i in range(size)}
    # Walk down written nodes for the accepted path.
    path = [0]
    while draw(st.booleans()):
        options = [c for c in children[path[-1]] if c < written]
        if not options:
            break
        path.append(draw(st.sampled_from(options)))
    new_root = draw(st.sampled_from(children[path[-1]])) if children[path[-1]] and draw(st.booleans()) else None
    survivors = []
    if new_root is not None:
        stack = [new_root]
        while stack:
            node = stack.pop()
            survivors.append(node)
            stack.extend(children[node])
        survivors = draw(st.permutations(survivors))
    prefix = draw(st.integers(0, 5))
    capacity = draw(st.integers(1, 12))
    return prefix, capacity, parents, segments, path, list(survivors), draw(st.integers(0, 2**31))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prune_scenarios())
def test_prune_random_outcomes(scenario) -> None:
    prefix, capacity, parents, segments, accepted, survivors, seed = scenario
    f = Forward(capacity=capacity, seed=seed)
    if prefix:
        f.commit(prefix)
    node_ids = {}  # tree index -> node id (sparse, not row order, to catch index/id confusion)
    rng = random.Random(seed)
    for i in range(len(parents)):
        node_ids[i] = 1000 + 7 * i + rng.randrange(7)
    for segment in segments:
        f.tree(
            [node_ids[i] for i in segment],
            [-1 if parents[i] == -1 else node_ids[parents[i]] for i in segment],
            [prefix + depth_of(parents, i) for i in segment],
        )
    f.check()
    written = {node_ids[i] for segment in segments for i in segment}
    accepted_ids = [node_ids[i] for i in accepted]
    survivor_ids = [node_ids[i] for i in survivors]
    f.prune(accepted_ids, survivor_ids)
    assert f.cache.committed == prefix + len(accepted)
    assert f.cache.node_ids == [n for n in survivor_ids if n in written]
    f.check()
    # A further segment below a surviving (or accepted) node still sees the right ancestors.
    anchor = f.cache.node_ids[-1] if f.cache.node_ids else -1
    position = f.cache.committed if anchor == -1 else 99  # a root sits right after the prefix
    f.tree([5000, 5001], [anchor, 5000], [position, position + 1])
    f.check()


def depth_of(parents: list[int], i: int) -> int:
    depth = 0
    while parents[i] != -1:
        i = parents[i]
        depth += 1
    return depth


def test_a_cache_grown_during_a_forward_can_still_be_pruned_outside_it():
    # Stages run forwards in inference mode but apply prunes outside it; a cache that grew past its
    # capacity inside a forward (prompts longer than 256 tokens) must still accept the in-place move.
    cache = TreeKVCache(0, [LayerShape(1, 4)], torch.float32, capacity=4)
    with torch.inference_mode():
        cache.reserve(6)
        kv = torch.randn(1, 1, 6, 4)
        cache.update(kv, kv, 0)
        ids = [1, 2, 3, 4, 5, 6]
        cache.add_tree_rows(ids, [0, 0, 1, 2, 3, 4], cache.tree_rows_for(ids, [-1, -1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 4]))
    cache.prune([2, 3], [4])  # the second branch is accepted: its rows move to the front
    assert cache.committed == 2 and cache.node_ids == [4]
    assert torch.equal(cache.keys[0][0, 0, :3], kv[0, 0, 1:4])
