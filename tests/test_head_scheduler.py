"""The head's scheduler, draft worker and verify worker in one process with real stage logic and
real SmolLM2 weights (tests/inprocess.py; every mode's losslessness is in test_lossless.py): that
speculation really happens, that drafts made stale by a prune are dropped, and that the draft's re-rooted KV cache
proposes what a fresh draft would."""

from __future__ import annotations

import time
from typing import Collection, Sequence

import pytest
import torch

from flowspec_zmq.draft import DraftLM, DraftSource, DraftStep, Frontier, NgramDraft, Proposals, TreeShape
from flowspec_zmq.emulation import DeviceProfile
from flowspec_zmq.model_slices import load_layer_window
from flowspec_zmq.tree import ROOT_PARENT

from .conftest import PROMPTS
from .inprocess import InProcessRing, in_process_ring

NEW_TOKENS = 24
PACED = DeviceProfile(fixed_ms=8.0, per_token_ms=0.2)  # segments overlap in the pipeline


@pytest.fixture(scope="module")
def int8_draft(model_dir, head):
    return DraftLM.load(model_dir, "int8", head, 32768)


def prompt_ids(tokenizer, name: str) -> list[int]:
    return tokenizer(PROMPTS[name])["input_ids"]


REPEATING = "red, green, blue, red, green, blue, red, green, blue,"  # every draft predicts this well


@pytest.mark.parametrize("mode, draft, at_least", [("tree", "int8", 3.0), ("flowspec", "ngram", 2.0)])
async def test_speculation_really_happens(head, three_stages, int8_draft, tokenizer, reference, mode, draft, at_least):
    """A silent fall-back to one token per verification would still be lossless; it must not pass."""
    ids = tokenizer(REPEATING)["input_ids"]
    shape = TreeShape(depth=6, top_k=2, total_tokens=24, width=2)  # deep and narrow: the draft is right
    async with in_process_ring(head, three_stages, PACED) as ring:
        stats = await ring.generate(ids, int8_draft if draft == "int8" else NgramDraft(), mode, NEW_TOKENS,
                                    shape, segment_size=12)
    assert stats.tokens == reference(REPEATING, NEW_TOKENS)
    assert stats.accepted_per_verification >= at_least
    if mode == "flowspec":
        # Incremental expansion: committing k tokens opens k new tree levels, about k draft steps;
        # redrawing the tree after every verification would cost `depth` steps each time.
        assert stats.draft_steps <= shape.depth + 1.5 * len(stats.tokens)
        assert stats.draft_steps < shape.depth * stats.verifications


class WaitsForPrune:
    """A draft whose every step returns only after the head has sent one more prune: each step's
    proposals arrive after a verification changed the tree, so some of their parents are gone."""

    def __init__(self, draft: DraftSource, ring: InProcessRing) -> None:
        self.draft, self.ring = draft, ring

    def begin(self, request: int, prefix: Sequence[int]) -> None:
        self.draft.begin(request, prefix)

    def expand(self, steps: Sequence[DraftStep]) -> list[Proposals]:
        seen, deadline = self.ring.prunes, time.monotonic() + 2.0
        while self.ring.prunes == seen and time.monotonic() < deadline:
            time.sleep(0.002)
        return self.draft.expand(steps)

    def advance(self, request: int, accepted: Sequence[int], keep: Collection[int], committed: Sequence[int]) -> None:
        self.draft.advance(request, accepted, keep, committed)

    def end(self, request: int) -> None:
        self.draft.end(request)


@pytest.mark.parametrize("make_draft", ["int8", "ngram"])
async def test_drafts_made_stale_by_a_prune_are_dropped(head, three_stages, int8_draft, tokenizer, reference, make_draft):
    draft = int8_draft if make_draft == "int8" else NgramDraft()
    async with in_process_ring(head, three_stages, PACED) as ring:
        stats = await ring.generate(prompt_ids(tokenizer, "code"), WaitsForPrune(draft, ring), "flowspec", NEW_TOKENS)
    assert stats.stale_proposals > 0
    assert stats.tokens == reference(PROMPTS["code"], NEW_TOKENS)


# -- the draft's own KV cache follows the tree --------------------------------------------------------

@pytest.fixture(scope="module")
def float32_drafts(model_dir, head):
    """Two float32 drafts (deterministic enough to compare log-probs): one re-rooted, one fresh."""

    def make() -> DraftLM:
        window = load_layer_window(model_dir, 0, head.num_layers, torch.float32)
        return DraftLM(window, head, head.lm_head, None)

    return make(), make()


def top(proposals: Proposals) -> list[list[int]]:
    return [[token for token, _ in children] for children in proposals]


def assert_same(a: Proposals, b: Proposals) -> None:
    assert top(a) == top(b)
    for x, y in zip(a, b):
        assert [p for _, p in x] == pytest.approx([p for _, p in y], abs=1e-3)


def expand(draft: DraftLM, frontier: list[Frontier], top_k: int, request: int = 1) -> Proposals:
    return draft.expand([DraftStep(request, frontier, top_k)])[0]


def test_rerooted_draft_proposes_what_a_fresh_draft_does(float32_drafts, tokenizer) -> None:
    kept, fresh = float32_drafts
    prompt = prompt_ids(tokenizer, "story")
    p = len(prompt) - 1  # the root's position
    kept.begin(1, prompt[:-1])
    (children,) = expand(kept, [Frontier(0, ROOT_PARENT, p, (prompt[-1],))], 3)
    grand = expand(kept, [Frontier(1 + i, 0, p + 1, (prompt[-1], t)) for i, (t, _) in enumerate(children)], 2)
    first, bonus = children[0][0], grand[0][0][0]
    # The target accepts root -> first and picks `bonus`, which no node holds: a fresh root (id 10)
    # whose parent (node 1) is a leaf row in the draft's cache; nothing else survives.
    kept.advance(1, [0, 1], {10}, prompt + [first, bonus])
    (after_leaf,) = expand(kept, [Frontier(10, ROOT_PARENT, p + 2, (bonus,))], 3)
    fresh.begin(1, prompt + [first])
    (expected,) = expand(fresh, [Frontier(0, ROOT_PARENT, p + 2, (bonus,))], 3)
    fresh.end(1)
    assert_same([after_leaf], [expected])
    # Expand the root's best child (node 11), then accept root -> 11: node 11 stays as the new root
    # with its KV row, and its child (node 12) is drafted on top of the re-rooted cache.
    c = after_leaf[0][0]
    (below_c,) = expand(kept, [Frontier(11, 10, p + 3, (bonus, c))], 2)
    kept.advance(1, [10], {11}, prompt + [first, bonus, c])
    g = below_c[0][0]
    kept_grand = expand(kept, [Frontier(12, 11, p + 4, (c, g))], 2)
    kept.end(1)
    fresh.begin(1, prompt + [first, bonus])
    fresh_root = expand(fresh, [Frontier(0, ROOT_PARENT, p + 3, (c,))], 2)
    fresh_grand = expand(fresh, [Frontier(1, 0, p + 4, (c, g))], 2)
    fresh.end(1)
    assert_same([below_c], fresh_root)
    assert_same(kept_grand, fresh_grand)


def test_one_draft_step_for_several_requests_proposes_what_separate_steps_do(float32_drafts, tokenizer) -> None:
    """Packed rows of several requests, each attending to its own cache only (block-diagonal masks)."""
    batched, alone = float32_drafts
    prompts = [prompt_ids(tokenizer, name) for name in ("story", "code")] + [prompt_ids(tokenizer, "code")[:9]]
    for request, prompt in enumerate(prompts):
        batched.begin(request, prompt[:-1])
    roots = [[Frontier(0, ROOT_PARENT, len(p) - 1, (p[-1],))] for p in prompts]
    together = batched.expand([DraftStep(r, frontier, 3) for r, frontier in enumerate(roots)])
    # A second step builds on the tree rows the first one left in each request's cache.
    children = [[Frontier(1, 0, len(p), (p[-1], kids[0][0]))] for p, (kids,) in zip(prompts, together)]
    together_deeper = batched.expand([DraftStep(r, frontier, 2) for r, frontier in enumerate(children)])
    for request, prompt in enumerate(prompts):
        batched.end(request)
        alone.begin(request, prompt[:-1])
        assert_same(together[request], expand(alone, roots[request], 3, request))
        assert_same(together_deeper[request], expand(alone, children[request], 2, request))
        alone.end(request)
