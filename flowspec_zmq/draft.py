"""Draft sources: propose a token tree below the newest committed token.

Every source implements `DraftSource.draft(context) -> DraftTree`. The scheduler merges the proposal
into the live tree by token path, so a source needs no knowledge of what is in flight. A learned
head (EAGLE-style) would add its features to DraftContext and implement the same method.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence

import torch
from torch import nn

from .model_slices import HeadModel, LayerWindow, load_full_model, whole_model_window
from .tree import ROOT_PARENT, DraftTree

DraftKind = Literal["int8", "bf16", "ngram"]


@dataclass(frozen=True)
class TreeShape:
    depth: int = 5
    top_k: int = 8
    total_tokens: int = 64


@dataclass(frozen=True)
class DraftContext:
    tokens: Sequence[int]  # the committed sequence; the last token is the tree's root
    shape: TreeShape


class DraftSource(Protocol):
    def draft(self, context: DraftContext) -> DraftTree: ...


class NoDraft:
    """Plain autoregressive decoding: the tree is just its root."""

    def draft(self, context: DraftContext) -> DraftTree:
        return DraftTree.empty()


def select_connected(tokens: list[int], parents: list[int], scores: list[float], budget: int) -> DraftTree:
    """The `budget` best candidates that form a tree with the root, re-indexed, parents first."""
    order = sorted(range(len(tokens)), key=lambda i: -scores[i])
    chosen: dict[int, int] = {}  # candidate index -> new index
    for i in order:
        if len(chosen) == budget:
            break
        # Scores never increase along a path, so a parent is seen first unless tied with its child.
        if parents[i] == ROOT_PARENT or parents[i] in chosen:
            chosen[i] = len(chosen)
    picked = sorted(chosen, key=lambda i: chosen[i])
    return DraftTree(
        tuple(tokens[i] for i in picked),
        tuple(ROOT_PARENT if parents[i] == ROOT_PARENT else chosen[parents[i]] for i in picked),
        tuple(scores[i] for i in picked),
    )


class DraftLM:
    """A small LM sharing the target's tokenizer, expanded EAGLE-2 style: each depth runs the
    global top-k frontier (by cumulative log-prob) and records all their top-k children; the best
    `total_tokens` candidates form the tree."""

    def __init__(self, model: nn.Module, prefill_chunk: int = 64) -> None:
        self.window: LayerWindow = whole_model_window(model)
        self.head = HeadModel(model)
        self.cache = self.window.new_cache()
        self.cached_tokens: list[int] = []
        self.prefill_chunk = prefill_chunk

    @classmethod
    def load(cls, model_dir: Path, kind: Literal["int8", "bf16"]) -> DraftLM:
        if kind == "bf16":
            return cls(load_full_model(model_dir, torch.bfloat16))
        model = load_full_model(model_dir, torch.float32)
        # In place: never hold an fp32 and an int8 copy of every layer at once.
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
        return cls(model)

    def _sync(self, tokens: Sequence[int]) -> None:
        """Bring the committed KV up to everything but the root, reusing the common prefix."""
        common = 0
        for a, b in zip(self.cached_tokens, tokens[:-1]):
            if a != b:
                break
            common += 1
        if common < self.cache.committed:
            self.cache.truncate(common)
            self.cached_tokens = self.cached_tokens[:common]
        for start in range(common, len(tokens) - 1, self.prefill_chunk):
            chunk = list(tokens[start : min(start + self.prefill_chunk, len(tokens) - 1)])
            positions = list(range(start, start + len(chunk)))
            self.window(self.head.embed(chunk), self.cache, True, positions, [ROOT_PARENT] * len(chunk), positions)
            self.cached_tokens.extend(chunk)

    def _log_probs(self, tokens: list[int], ids: list[int], parents: list[int], positions: list[int]) -> torch.Tensor:
        hidden = self.window(self.head.embed(tokens), self.cache, False, ids, parents, positions)
        return torch.log_softmax(self.head.logits(hidden), dim=-1)

    @torch.inference_mode()
    def draft(self, context: DraftContext) -> DraftTree:
        shape = context.shape
        if shape.depth == 0 or shape.total_tokens == 0:
            return DraftTree.empty()
        self._sync(context.tokens)
        root_position = len(context.tokens) - 1
        # Candidate i has cache node id i + 1; the root is cache node 0.
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        frontier = [(ROOT_PARENT, 0.0)]  # (candidate index, cumulative score)
        log_probs = self._log_probs([context.tokens[-1]], [0], [ROOT_PARENT], [root_position])
        for depth in range(1, shape.depth + 1):
            top = torch.topk(log_probs, shape.top_k, dim=-1)
            layer = []
            for (parent, parent_score), values, indices in zip(frontier, top.values.tolist(), top.indices.tolist()):
                for value, token in zip(values, indices):
                    layer.append(len(tokens))
                    tokens.append(token)
                    parents.append(parent)
                    scores.append(parent_score + value)
            if depth == shape.depth:
                break
            best = heapq.nlargest(shape.top_k, layer, key=lambda i: scores[i])
            frontier = [(i, scores[i]) for i in best]
            log_probs = self._log_probs(
                [tokens[i] for i in best],
                [i + 1 for i in best],
                [parents[i] + 1 for i in best],  # ROOT_PARENT + 1 == 0, the root's cache id
                [root_position + depth] * len(best),
            )
        self.cache.prune((), ())
        return select_connected(tokens, parents, scores, shape.total_tokens)


class NgramDraft:
    """Prompt lookup: continue the longest recent n-gram match found earlier in the context."""

    def __init__(self, max_ngram: int = 3) -> None:
        self.max_ngram = max_ngram

    def draft(self, context: DraftContext) -> DraftTree:
        tokens = list(context.tokens)
        shape = context.shape
        candidates: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        branch_of: dict[tuple[int, ...], int] = {}
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            suffix = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] != suffix:
                    continue
                continuation = tokens[start + n : start + n + shape.depth]
                parent = ROOT_PARENT
                for depth, token in enumerate(continuation, 1):
                    path = tuple(continuation[:depth])
                    if path not in branch_of:
                        branch_of[path] = len(candidates)
                        candidates.append(token)
                        parents.append(parent)
                        # Longer matches and earlier depths rank first.
                        scores.append(-depth / n - 0.01 * len(branch_of))
                    parent = branch_of[path]
                if len(candidates) >= shape.total_tokens:
                    return select_connected(candidates, parents, scores, shape.total_tokens)
        return select_connected(candidates, parents, scores, shape.total_tokens)


def make_draft_source(kind: DraftKind, model_dir: Path) -> DraftSource:
    if kind in ("int8", "bf16"):
        return DraftLM.load(model_dir, kind)
    if kind == "ngram":
        return NgramDraft()
    raise ValueError(f"unknown draft kind {kind!r}")
