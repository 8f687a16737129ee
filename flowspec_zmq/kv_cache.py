"""KV cache of one request on one layer window: a committed prefix plus live draft-tree rows.

Per layer the keys and values live in one buffer: rows [0, committed) are the accepted sequence,
rows [committed, committed + tree) are draft-tree nodes still being verified, in arrival order.
The HF attention modules call `update()`, which writes the new rows after the existing ones and
returns views over everything, so attention reads the cache without copying it.

A layer window drives one forward per segment: a commit segment (prefill rows) only while no tree
rows are live; a tree segment as `tree_rows_for()`, which refuses rows whose ids or parents do not
fit this cache before anything runs (a stage reports that to the head instead of returning hidden
states computed against the wrong rows), the forward, then `add_tree_rows()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .tree import ROOT_PARENT

FIRST_CAPACITY = 256  # rows a new cache holds before it first grows


def grown_capacity(rows: int, capacity: int = FIRST_CAPACITY) -> int:
    """The capacity a cache reaches to hold `rows`: it doubles, so a long request is copied only
    a few times. The head reserves KV memory by the same rule the stages allocate it."""
    while capacity < rows:
        capacity *= 2
    return capacity


@dataclass(frozen=True)
class LayerShape:
    kv_heads: int
    head_dim: int


class TreeKVCache:
    def __init__(
        self,
        first_layer: int,
        shapes: Sequence[LayerShape],
        dtype: torch.dtype,
        capacity: int = FIRST_CAPACITY,
        device: torch.device | str = "cpu",
    ) -> None:
        self.first_layer = first_layer
        self.dtype = dtype
        self.device = torch.device(device)  # the buffers'; the tree bookkeeping stays on the CPU
        self.committed = 0
        self.capacity = capacity
        self.keys = [torch.zeros(1, s.kv_heads, capacity, s.head_dim, dtype=dtype, device=self.device) for s in shapes]
        self.values = [torch.zeros_like(k) for k in self.keys]
        # Live tree rows, in buffer order after the committed prefix.
        self.node_ids: list[int] = []
        self.node_positions: list[int] = []
        self.row_of: dict[int, int] = {}
        # ancestors[i, j]: tree row j is row i or one of its ancestors.
        self.ancestors = torch.zeros(0, 0, dtype=torch.bool)
        # The tree segment (node ids, parents) that tree_rows_for() prepared, until add_tree_rows().
        self._prepared: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())

    @property
    def tree_size(self) -> int:
        return len(self.node_ids)

    @property
    def length(self) -> int:
        return self.committed + self.tree_size

    # -- called by the HF attention modules during a forward pass ------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.tree_size and key.shape[2] != len(self._prepared[0]):
            # Only a prepared tree segment may follow live tree rows; committed rows written after
            # them would break the prefix (attention fails on the mask's shape, deep in torch).
            raise RuntimeError(self._commit_refusal(key.shape[2]))
        local = layer_idx - self.first_layer
        start = self.length
        end = start + key.shape[2]
        self.keys[local][:, :, start:end] = key
        self.values[local][:, :, start:end] = value
        return self.keys[local][:, :, :end], self.values[local][:, :, :end]

    # -- bookkeeping around a forward pass ---------------------------------------------------------
    @property
    def bytes_per_row(self) -> int:
        return sum(k.shape[1] * k.shape[3] * k.element_size() for k in self.keys) * 2

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_row

    def growth_bytes(self, rows: int) -> int:
        """Memory `reserve(rows)` would add."""
        return (grown_capacity(self.length + rows, self.capacity) - self.capacity) * self.bytes_per_row

    def reserve(self, rows: int) -> None:
        """Make room for `rows` more rows before a forward pass writes them."""
        needed = self.length + rows
        if needed <= self.capacity:
            return
        capacity = grown_capacity(needed, self.capacity)
        # Growth happens inside a forward (inference mode); buffers made there would be inference
        # tensors, which prune() may not update in place outside it. Keep them normal tensors.
        with torch.inference_mode(False):
            for cache in (self.keys, self.values):
                for i, old in enumerate(cache):
                    grown = torch.zeros(*old.shape[:2], capacity, old.shape[3], dtype=self.dtype, device=self.device)
                    grown[:, :, : self.length] = old[:, :, : self.length]
                    cache[i] = grown
        self.capacity = capacity

    def append_committed(self, rows: int) -> None:
        self.check_commit(rows)
        self.committed += rows

    def _commit_refusal(self, rows: int) -> str:
        return (f"a commit segment ({rows} rows) arrived while {self.tree_size} tree rows are live: "
                f"committed rows can only be appended once a prune has settled the tree")

    def check_commit(self, rows: int) -> None:
        if self.tree_size:
            raise RuntimeError(self._commit_refusal(rows))

    def tree_rows_for(self, node_ids: Sequence[int], parents: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Ancestor-or-self rows (over current tree rows + the new ones) for new nodes, once their
        ids and parents check out; a node under ROOT_PARENT attends to the committed prefix only."""
        self._check_tree_segment(node_ids, parents, positions)
        self._prepared = (tuple(node_ids), tuple(parents))
        old = self.tree_size
        rows = torch.zeros(len(node_ids), old + len(node_ids), dtype=torch.bool)
        new_row: dict[int, int] = {}
        for i, (node, parent) in enumerate(zip(node_ids, parents)):
            if parent in new_row:
                rows[i] = rows[new_row[parent]]
            elif parent in self.row_of:
                rows[i, :old] = self.ancestors[self.row_of[parent]]
            rows[i, old + i] = True
            new_row[node] = i
        return rows

    def add_tree_rows(self, node_ids: Sequence[int], positions: Sequence[int], rows: torch.Tensor) -> None:
        """Keep the rows of the segment tree_rows_for() prepared."""
        prepared, _ = self._prepared
        self._prepared = ((), ())
        if tuple(node_ids) != prepared:
            raise RuntimeError(f"add_tree_rows() got nodes {list(node_ids)}; tree_rows_for() prepared {list(prepared)}")
        old = self.tree_size
        total = old + len(node_ids)
        grown = torch.zeros(total, total, dtype=torch.bool)
        grown[:old, :old] = self.ancestors
        grown[old:] = rows
        self.ancestors = grown
        for i, (node, pos) in enumerate(zip(node_ids, positions)):
            self.row_of[node] = old + i
            self.node_ids.append(node)
            self.node_positions.append(pos)

    def _check_tree_segment(self, node_ids: Sequence[int], parents: Sequence[int], positions: Sequence[int]) -> None:
        """Ids are never reused, and every parent is a live tree row, an earlier row of the segment,
        or ROOT_PARENT for the tree's root, which sits right after the committed prefix: anything
        else would silently attend to the wrong rows. Runs before the forward."""
        earlier: set[int] = set()
        for node, parent, position in zip(node_ids, parents, positions):
            if node in earlier:
                raise ValueError(f"node id {node} (position {position}) appears twice in one segment")
            if node in self.row_of:
                raise ValueError(f"node id {node} (position {position}) already has a live tree row here")
            if parent == ROOT_PARENT:
                if position != self.committed:
                    raise ValueError(
                        f"node {node} at position {position} hangs off the committed prefix (parent "
                        f"{ROOT_PARENT}), so it must sit right after it, at position {self.committed}"
                    )
            elif parent not in self.row_of and parent not in earlier:
                raise LookupError(
                    f"node {node} at position {position} names parent {parent}, which is neither a live "
                    f"tree row here nor earlier in its segment"
                )
            earlier.add(node)

    def prune(self, accepted: Sequence[int], survivors: Sequence[int]) -> None:
        """Move accepted rows onto the committed prefix, keep survivors, drop every other tree row."""
        missing = [n for n in accepted if n not in self.row_of]
        if missing:
            raise KeyError(f"accepted nodes {missing} have no KV rows here")
        kept = [n for n in survivors if n in self.row_of]  # survivors may still be upstream
        order = [self.row_of[n] for n in accepted] + [self.row_of[n] for n in kept]
        if order != list(range(len(order))):  # nothing moves when the rows are already in place
            index = torch.tensor(order, dtype=torch.long, device=self.device) + self.committed
            for cache in (self.keys, self.values):
                for buffer in cache:
                    moved = buffer.index_select(2, index)
                    buffer[:, :, self.committed : self.committed + len(order)] = moved
        kept_rows = torch.tensor([self.row_of[n] for n in kept], dtype=torch.long)
        self.ancestors = self.ancestors[kept_rows][:, kept_rows]
        positions = {n: self.node_positions[self.row_of[n]] for n in kept}
        self.committed += len(accepted)
        self.node_ids = kept
        self.node_positions = [positions[n] for n in kept]
        self.row_of = {n: i for i, n in enumerate(kept)}

    def truncate(self, committed: int) -> None:
        """Forget tree rows and every committed row from `committed` on."""
        self.prune((), ())
        self.committed = min(self.committed, committed)
