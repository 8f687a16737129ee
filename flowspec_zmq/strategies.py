"""Decoding modes as strategies of the one scheduler loop.

A strategy answers: how many segments may be in the ring at once, which nodes form the next
segment and when it is worth sending, when to verify, and whether the draft may grow the tree while
segments are in flight. Everything else (the loop, verification, pruning, streaming) is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

from .tree import Node, TokenTree

Mode = Literal["ar", "tree", "flowspec", "specpipe"]
MODES: tuple[Mode, ...] = ("ar", "tree", "specpipe", "flowspec")

Cut = Callable[[TokenTree, int], list[Node]]  # (tree, segments in flight) -> next segment


@dataclass(frozen=True)
class Strategy:
    mode: Mode
    max_in_flight: int
    cut: Cut
    verify_when_drained: bool  # one tree at a time: verify only after every segment returned
    send_when_settled: bool  # one tree at a time: send only once the draft has finished the tree
    draft_while_in_flight: bool  # grow the tree below nodes that are still being verified
    full_segment: int  # rows that make a segment worth sending while the draft is still adding nodes
    uses_draft: bool


def cut_by_score(size: int) -> Cut:
    """FlowSpec: the best unsent nodes first (score-based step-wise verification)."""
    return lambda tree, _: tree.unsent()[:size]


def cut_into_parts(parts: int) -> Cut:
    """Chunk-PP: the whole tree in `parts` score-ordered segments, all sent at once."""

    def cut(tree: TokenTree, in_flight: int) -> list[Node]:
        waiting = tree.unsent()
        return waiting[: math.ceil(len(waiting) / max(1, parts - in_flight))]

    return cut


def cut_by_layer(width: int) -> Cut:
    """SpecPipe: the shallowest unsent tree layer, its `width` best nodes."""

    def cut(tree: TokenTree, _: int) -> list[Node]:
        waiting = tree.unsent()
        if not waiting:
            return []
        depth = min(n.depth for n in waiting)
        return [n for n in waiting if n.depth == depth][:width]

    return cut


def make_strategy(mode: Mode, num_stages: int, segment_size: int, layer_width: int) -> Strategy:
    if mode == "ar":
        return Strategy(mode, 1, cut_by_score(1), False, False, False, 1, uses_draft=False)
    if mode == "tree":
        return Strategy(mode, num_stages, cut_into_parts(num_stages), True, True, False, 1, uses_draft=True)
    if mode == "specpipe":
        return Strategy(mode, num_stages, cut_by_layer(layer_width), False, False, True, layer_width, uses_draft=True)
    if mode == "flowspec":
        return Strategy(mode, num_stages, cut_by_score(segment_size), False, False, True, segment_size, uses_draft=True)
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
