"""Draft sources: propose children for nodes of the token tree, one tree layer at a time.

The head grows its tree incrementally (dynamic draft expansion): each draft step expands the best
frontier nodes (by cumulative score) and returns their best children; after a verification the
draft re-roots its own state like the stages do (accepted rows join the committed prefix, the
surviving subtree keeps its KV, the rest is dropped), so a step that commits tokens costs one or two
draft forwards instead of a full redraw. Every source implements `begin`, `expand` and `advance`
(DraftSource); they run on the head's draft worker, in the order the scheduler submits them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Collection, Literal, Protocol, Sequence

import torch
from torch import nn
from transformers import AutoTokenizer

from .draft_vocab import load_ranking
from .models import resolve_model_dir
from .kv_cache import TreeKVCache
from .model_slices import HeadModel, LayerWindow, WindowPart, load_head_model, load_layer_window
from .tree import ROOT_PARENT, DraftTree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TreeShape:
    depth: int = 5  # longest path below the root
    top_k: int = 8  # children proposed per expanded node
    total_tokens: int = 64  # draft nodes waiting for verification, at most
    width: int = 4  # frontier nodes expanded per draft step


@dataclass(frozen=True)
class DraftContext:
    tokens: Sequence[int]  # the committed sequence; the last token is the tree's root
    shape: TreeShape


@dataclass(frozen=True)
class Frontier:
    """A tree node whose children the draft should propose."""

    node_id: int
    parent: int  # ROOT_PARENT for the tree's root
    position: int
    path: tuple[int, ...]  # tokens from the root (inclusive) down to this node (inclusive)

    @property
    def token(self) -> int:
        return self.path[-1]


Proposals = list[list[tuple[int, float]]]  # per frontier node: (token, log-prob), best first


@dataclass(frozen=True)
class DraftStep:
    """One request's part of a draft step: expand these frontier nodes, `top_k` children each."""

    request: int
    frontier: Sequence[Frontier]
    top_k: int


class DraftSource(Protocol):
    """Keeps a state per request; one `expand` call serves several requests at once."""

    def begin(self, request: int, prefix: Sequence[int]) -> None:
        """A new request: `prefix` is every committed token before the tree's root."""

    def expand(self, steps: Sequence[DraftStep]) -> list[Proposals]:
        """The best `top_k` children of each frontier node, per step."""

    def advance(self, request: int, accepted: Sequence[int], keep: Collection[int], committed: Sequence[int]) -> None:
        """A verification moved `accepted` (root first) into the committed sequence (which now ends
        with the new root); nodes outside `keep` are gone."""

    def end(self, request: int) -> None:
        """The request is over: its state may go."""


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
    """A small LM sharing the target's tokenizer. Its KV cache mirrors the scheduler's tree: every
    expanded node is a tree row under the same node id, so expansions build on earlier ones."""

    def __init__(self, window: LayerWindow, head: HeadModel, lm_head: nn.Module, vocab: torch.Tensor | None,
                 prefill_chunk: int = 64) -> None:
        self.window = window
        self.head = head  # shared with the head node: embedding and final norm are not copied
        self.lm_head = lm_head  # over the draft vocabulary only (`vocab` maps its rows to token ids)
        self.vocab = vocab
        self.states: dict[int, DraftState] = {}  # request -> its KV cache
        # The last finished request's cache: the next request usually shares its prefix (a chat's
        # earlier turns), so that much of its prefill is already done.
        self.spare: DraftState | None = None
        self.prefill_chunk = prefill_chunk

    @classmethod
    def load(cls, model_dir: Path, kind: Literal["int8", "bf16"], head: HeadModel, vocab_size: int) -> DraftLM:
        """The target's decoder layers as a draft, read layer by layer (int8: each quantized as it
        is read, so no full float32 copy ever exists), sharing the head's embedding and norm, with
        an int8 lm_head over the `vocab_size` most frequent tokens (0: all)."""
        if kind == "bf16":
            window = load_layer_window(model_dir, 0, head.num_layers, torch.bfloat16, device=head.device)
        elif head.device.type == "cpu":
            window = load_layer_window(model_dir, 0, head.num_layers, torch.float32, quantize_layer)
        else:
            raise ValueError(f"the int8 draft runs on the CPU only (dynamic quantization); on {head.device} use "
                             "draft = \"bf16\" or a draft model")
        return cls(window, head, *draft_lm_head(head, model_dir, vocab_size))

    @classmethod
    def load_model(cls, draft_dir: Path, model_dir: Path, head: HeadModel, vocab_size: int) -> DraftLM:
        """Another, smaller model as the draft (what llama.cpp's -md and HF assisted generation
        use): its own embedding, int8 layers and lm_head over the target's most frequent tokens;
        refused unless it shares the target's tokenizer."""
        check_same_tokenizer(draft_dir, model_dir)
        draft_head = load_head_model(draft_dir, head.dtype, head.device)
        if draft_head.lm_head.weight.shape[0] != head.lm_head.weight.shape[0]:
            raise ValueError(f"the draft {draft_dir} scores {draft_head.lm_head.weight.shape[0]} tokens, the target "
                             f"{head.lm_head.weight.shape[0]}: a draft must share the target's vocabulary")
        quantize = quantize_layer if head.device.type == "cpu" else None  # int8 kernels are CPU-only
        window = load_layer_window(draft_dir, 0, draft_head.num_layers, torch.float32 if quantize else head.dtype,
                                   quantize, draft_head.device)
        return cls(window, draft_head, *draft_lm_head(draft_head, model_dir, vocab_size))

    def _sync(self, state: DraftState, tokens: Sequence[int]) -> None:
        """Bring the committed KV up to `tokens`, reusing the common prefix."""
        common = 0
        for a, b in zip(state.tokens, tokens):
            if a != b:
                break
            common += 1
        if common < state.cache.committed:
            state.cache.truncate(common)
            state.tokens = state.tokens[:common]
        for start in range(common, len(tokens), self.prefill_chunk):
            chunk = list(tokens[start : min(start + self.prefill_chunk, len(tokens))])
            positions = list(range(start, start + len(chunk)))
            self.window(self.head.embed(chunk), state.cache, True, positions, [ROOT_PARENT] * len(chunk), positions)
            state.tokens.extend(chunk)

    @torch.inference_mode()
    def begin(self, request: int, prefix: Sequence[int]) -> None:
        state, self.spare = self.spare or DraftState(self.window.new_cache(), []), None
        state.cache.prune((), ())  # the last request's tree rows
        self.states[request] = state
        self._sync(state, prefix)

    def end(self, request: int) -> None:
        self.spare = self.states.pop(request, None) or self.spare

    @torch.inference_mode()
    def expand(self, steps: Sequence[DraftStep]) -> list[Proposals]:
        """One forward over every request's frontier (packed rows, each request's own cache)."""
        plans = [self.window.plan(WindowPart(self.states[step.request].cache, False, [f.node_id for f in step.frontier],
                                             [f.parent for f in step.frontier], [f.position for f in step.frontier]))
                 for step in steps]
        hidden = self.window.run(self.head.embed([f.token for step in steps for f in step.frontier]), plans)
        logits = self.lm_head(self.head.norm(hidden.to(self.head.dtype)).float())
        if self.head.softcap is not None:
            logits = torch.tanh(logits / self.head.softcap) * self.head.softcap
        top_k = max(step.top_k for step in steps)
        top = torch.topk(torch.log_softmax(logits, dim=-1), min(top_k, logits.shape[-1]), dim=-1)
        tokens = (top.indices if self.vocab is None else self.vocab[top.indices]).tolist()
        scores = top.values.tolist()
        proposals, row = [], 0
        for step in steps:
            rows = range(row, row + len(step.frontier))
            proposals.append([list(zip(tokens[i][: step.top_k], scores[i][: step.top_k])) for i in rows])
            row += len(step.frontier)
        return proposals

    @torch.inference_mode()
    def advance(self, request: int, accepted: Sequence[int], keep: Collection[int], committed: Sequence[int]) -> None:
        state = self.states[request]
        # Expansion goes parents first, so the accepted nodes with KV here are a prefix of the path.
        cached = list(takewhile(lambda n: n in state.cache.row_of, accepted))
        survivors = [n for n in keep if n in state.cache.row_of] if len(cached) == len(accepted) else []
        state.cache.prune(cached, survivors)
        state.tokens = list(committed[: state.cache.committed])
        self._sync(state, committed[:-1])  # accepted tokens the draft never expanded (leaves) join here


@dataclass
class DraftState:
    """A draft LM's view of one request: its KV cache and the committed tokens it holds."""

    cache: TreeKVCache
    tokens: list[int]


def draft_lm_head(head: HeadModel, model_dir: Path, vocab_size: int) -> tuple[nn.Module, torch.Tensor | None]:
    """An lm_head over the target's `vocab_size` most frequent tokens (FR-Spec; 0: all of them),
    int8 on the CPU, and the token id of each of its rows (None: all, in order)."""
    weight = head.lm_head.weight.detach()
    vocab = None
    if 0 < vocab_size < weight.shape[0]:
        ranked = load_ranking(model_dir)
        if ranked is None:
            raise FileNotFoundError(
                f"{model_dir} has no draft vocabulary ranking; run `flowspec prepare` on it, or set draft_vocab = 0"
            )
        vocab = torch.tensor(ranked[:vocab_size], dtype=torch.long, device=head.device)
        weight = weight.index_select(0, vocab)
    if head.device.type != "cpu":
        lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=head.device)
        lm_head.weight = nn.Parameter(weight.float(), requires_grad=False)
        return lm_head, vocab
    lm_head = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    lm_head[0].weight = nn.Parameter(weight.float(), requires_grad=False)  # no copy when already float32
    return quantize_layer(lm_head)[0], vocab


def check_same_tokenizer(draft_dir: Path, model_dir: Path) -> None:
    """Speculation compares token ids: the draft must split text exactly as the target does."""
    draft, target = (AutoTokenizer.from_pretrained(d) for d in (draft_dir, model_dir))
    if draft.get_vocab() != target.get_vocab() or draft.all_special_ids != target.all_special_ids:
        raise ValueError(
            f"the draft {draft_dir} has another tokenizer than the target {model_dir} ({len(draft)} vs "
            f"{len(target)} tokens): a draft model must share the target's tokenizer")


def quantize_layer(module: nn.Module) -> nn.Module:
    """int8 dynamic quantization of every Linear below `module`, in place (the draft's precision
    never affects losslessness; on this class of CPU it is 4-10x faster than float32 or bfloat16)."""
    return torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)


class NgramDraft:
    """Prompt lookup: continue the longest recent n-gram match found earlier in the context."""

    def __init__(self, max_ngram: int = 3) -> None:
        self.max_ngram = max_ngram
        self.prefixes: dict[int, list[int]] = {}  # request -> committed tokens before its tree's root

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

    def begin(self, request: int, prefix: Sequence[int]) -> None:
        self.prefixes[request] = list(prefix)

    def end(self, request: int) -> None:
        self.prefixes.pop(request, None)

    def expand(self, steps: Sequence[DraftStep]) -> list[Proposals]:
        proposals = []
        for step in steps:
            shape = TreeShape(depth=1, top_k=step.top_k, total_tokens=step.top_k)
            prefix = self.prefixes[step.request]
            drafts = [self.draft(DraftContext(prefix + list(node.path), shape)) for node in step.frontier]
            proposals.append([list(zip(d.tokens, d.scores)) for d in drafts])
        return proposals

    def advance(self, request: int, accepted: Sequence[int], keep: Collection[int], committed: Sequence[int]) -> None:
        self.prefixes[request] = list(committed[:-1])


MODEL_DRAFT = "model:"  # draft = "model:NAME_OR_PATH": another model sharing the target's tokenizer


def make_draft_source(kind: str, model_dir: Path, head: HeadModel, vocab_size: int) -> DraftSource:
    if kind in ("int8", "bf16"):
        return DraftLM.load(model_dir, kind, head, vocab_size)
    if kind == "ngram":
        return NgramDraft()
    if kind.startswith(MODEL_DRAFT):
        return DraftLM.load_model(resolve_model_dir(kind.removeprefix(MODEL_DRAFT)), model_dir, head, vocab_size)
    raise ValueError(f"unknown draft {kind!r}: int8, bf16, ngram or model:NAME_OR_PATH")
