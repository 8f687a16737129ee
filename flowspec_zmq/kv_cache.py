"""KV cache of one request on one layer window: a committed prefix plus live draft-tree rows.

Per layer the keys and values live in one buffer: rows [0, committed) are the accepted sequence,
rows [committed, committed + tree) are draft-tree nodes still being verified, in arrival order.
The HF attention modules call `update()`, which writes the new rows after the existing ones and
returns views over everything, so attention reads the cache without copying it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


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
        capacity: int = 256,
    ) -> None:
        self.first_layer = first_layer
        self.dtype = dtype
        self.committed = 0
        self.capacity = capacity
        self.keys = [torch.zeros(1, s.kv_heads, capacity, s.head_dim, dtype=dtype) for s in shapes]
        self.values = [torch.zeros_like(k) for k in self.keys]
        # Live tree rows, in buffer order after the committed prefix.
        self.node_ids: list[int] = []
        self.node_positions: list[int] = []
        self.row_of: dict[int, int] = {}
        # ancestors[i, j]: tree row j is row i or one of its ancestors.
        self.ancestors = torch.zeros(0, 0, dtype=torch.bool)
        self._pending = 0

    @property
    def tree_size(self) -> int:
        return len(self.node_ids)

    @property
    def length(self) -> int:
        return self.committed + self.tree_size

    # -- called by the HF attention modules during a forward pass ------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        local = layer_idx - self.first_layer
        start = self.length
        end = start + key.shape[2]
        self.keys[local][:, :, start:end] = key
        self.values[local][:, :, start:end] = value
        return self.keys[local][:, :, :end], self.values[local][:, :, :end]

    # -- bookkeeping around a forward pass ---------------------------------------------------------
    def reserve(self, rows: int) -> None:
        """Make room for `rows` more rows before a forward pass writes them."""
        needed = self.length + rows
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        # Growth happens inside a forward (inference mode); buffers made there would be inference
        # tensors, which prune() may not update in place outside it. Keep them normal tensors.
        with torch.inference_mode(False):
            for cache in (self.keys, self.values):
                for i, old in enumerate(cache):
                    grown = torch.zeros(*old.shape[:2], capacity, old.shape[3], dtype=self.dtype)
                    grown[:, :, : self.length] = old[:, :, : self.length]
                    cache[i] = grown
        self.capacity = capacity

    def append_committed(self, rows: int) -> None:
        if self.tree_size:
            raise RuntimeError("committed rows can only be appended while no tree rows are live")
        self.committed += rows

    def tree_rows_for(self, node_ids: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        """Ancestor-or-self rows (over current tree rows + the new ones) for new nodes; a parent that
        is not a live tree row (nor earlier in this segment) hangs the node off the committed prefix."""
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

    def prune(self, accepted: Sequence[int], survivors: Sequence[int]) -> None:
        """Move accepted rows onto the committed prefix, keep survivors, drop every other tree row."""
        missing = [n for n in accepted if n not in self.row_of]
        if missing:
            raise KeyError(f"accepted nodes {missing} have no KV rows here")
        kept = [n for n in survivors if n in self.row_of]  # survivors may still be upstream
        order = [self.row_of[n] for n in accepted] + [self.row_of[n] for n in kept]
        if order != list(range(len(order))):  # nothing moves when the rows are already in place
            index = torch.tensor(order, dtype=torch.long) + self.committed
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
