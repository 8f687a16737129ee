"""Every mode's greedy output equals the target's own greedy output, token for token, on real
weights: modes, drafts, prompts, stage counts and tree shapes through the head's engine and real
stage logic in one process (tests/inprocess.py; three-stage rings are paced so that segments
overlap and prunes race them), then every mode once more through real node processes and real
ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest

from flowspec_zmq.client import Client
from flowspec_zmq.strategies import MODES
from flowspec_zmq.topology import DecodingConfig

from .conftest import PROMPTS, client_address
from .inprocess import in_process_ring, stage_windows
from .test_head_scheduler import PACED

NEW_TOKENS = 16  # several verifications, prunes and re-rootings per generation in every speculative mode
CASES = [("ar", "int8"), ("tree", "int8"), ("tree", "ngram"), ("specpipe", "int8"), ("specpipe", "ngram"),
         ("flowspec", "int8"), ("flowspec", "ngram")]
GREEDY = DecodingConfig(max_new_tokens=NEW_TOKENS)
# Every mode and draft on every stage count from 1 to 4, every prompt on two of them.
MATRIX = [(mode, draft, prompt, 1 + (i + j + shift) % 4)
          for i, (mode, draft) in enumerate(CASES) for j, prompt in enumerate(sorted(PROMPTS)) for shift in (0, 2)]


@pytest.fixture(scope="module")
def windows(model_dir):
    loaded: dict[int, list] = {}

    def for_stages(count: int) -> list:
        if count not in loaded:
            loaded[count] = stage_windows(model_dir, count)
        return loaded[count]

    return for_stages


async def generate(head, windows, drafts, model_dir, tokenizer, stages: int, prompt: str, options: DecodingConfig):
    async with in_process_ring(head, windows(stages), PACED if stages == 3 else None) as ring:
        engine = ring.engine(model_dir, tokenizer, drafts=drafts)

        async def ignore(_: list[int]) -> None:
            pass

        return (await engine.generate(tokenizer(prompt)["input_ids"], options, ignore)).tokens


@pytest.mark.parametrize("mode,draft,prompt,stages", MATRIX, ids=[f"{m}-{d}-{p}-{n}stages" for m, d, p, n in MATRIX])
async def test_greedy_equals_target(head, windows, drafts, model_dir, tokenizer, reference, stages, mode, draft, prompt):
    options = replace(GREEDY, mode=mode, draft=draft)
    got = await generate(head, windows, drafts, model_dir, tokenizer, stages, PROMPTS[prompt], options)
    assert got == reference(PROMPTS[prompt], 20)[:NEW_TOKENS]


@pytest.mark.parametrize("seed", range(6))
async def test_random_tree_shapes_stay_lossless(head, windows, drafts, model_dir, tokenizer, reference, seed):
    rng = random.Random(seed)
    options = replace(GREEDY, mode=rng.choice(["tree", "specpipe", "flowspec"]), tree_depth=rng.randint(1, 6),
                      tree_top_k=rng.randint(1, 6), tree_width=rng.randint(1, 4),
                      tree_total_tokens=rng.randint(1, 48), segment_size=rng.randint(1, 20))
    got = await generate(head, windows, drafts, model_dir, tokenizer, 1 + seed % 4, PROMPTS["code"], options)
    assert got == reference(PROMPTS["code"], 20)[:NEW_TOKENS], options


@pytest.mark.parametrize(
    "mode,draft,segment_size",
    [("flowspec", "int8", 1), ("flowspec", "int8", 2), ("flowspec", "ngram", 3), ("specpipe", "int8", 16)],
)
async def test_six_stages_with_prunes_racing_tiny_segments(head, windows, drafts, model_dir, tokenizer, reference,
                                                           mode, draft, segment_size):
    """Many stages and tiny segments: prunes overtake queued segments on every stage."""
    options = replace(GREEDY, mode=mode, draft=draft, segment_size=segment_size)
    for prompt in sorted(PROMPTS):
        got = await generate(head, windows, drafts, model_dir, tokenizer, 6, PROMPTS[prompt], options)
        assert got == reference(PROMPTS[prompt], 20)[:NEW_TOKENS], prompt


async def test_bf16_draft_is_lossless(head, windows, drafts, model_dir, tokenizer, reference):
    """The bf16 copy of the target drafts better than int8, but the output is still the target's."""
    options = replace(GREEDY, mode="flowspec", draft="bf16")
    got = await generate(head, windows, drafts, model_dir, tokenizer, 2, PROMPTS["story"], options)
    assert got == reference(PROMPTS["story"], 20)[:NEW_TOKENS]


@pytest.mark.parametrize("mode", MODES)
def test_real_processes_and_sockets(ring2, reference, mode):
    completion = asyncio.run(Client(client_address(ring2)).complete(PROMPTS["code"], mode=mode, max_new_tokens=NEW_TOKENS))
    assert completion.ids == reference(PROMPTS["code"], 20)[:NEW_TOKENS]
