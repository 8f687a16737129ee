"""Every mode's greedy output equals the target's own greedy output, token for token, on real
weights, through real node processes and real ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import random

import pytest

from flowspec_zmq.client import Client

from .conftest import PROMPTS, client_address

NEW_TOKENS = 20
CASES = [("ar", "int8"), ("tree", "int8"), ("tree", "ngram"), ("specpipe", "int8"), ("specpipe", "ngram"),
         ("flowspec", "int8"), ("flowspec", "ngram")]


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda n: f"{n}stages")
def ring(request, start_cluster):
    cluster = start_cluster(request.param)
    yield cluster
    cluster.stop()


def complete(cluster, prompt: str, **options) -> list[int]:
    return asyncio.run(Client(client_address(cluster)).complete(prompt, **options)).ids


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("mode,draft", CASES, ids=[f"{m}-{d}" for m, d in CASES])
def test_greedy_equals_target(ring, reference, mode, draft, prompt):
    want = reference(PROMPTS[prompt], NEW_TOKENS)
    assert complete(ring, PROMPTS[prompt], mode=mode, draft=draft, max_new_tokens=NEW_TOKENS) == want


@pytest.mark.parametrize("seed", range(4))
def test_random_tree_shapes_stay_lossless(ring, reference, seed):
    rng = random.Random(seed)
    shape = dict(tree_depth=rng.randint(1, 6), tree_top_k=rng.randint(1, 6), tree_width=rng.randint(1, 4),
                 tree_total_tokens=rng.randint(1, 48), segment_size=rng.randint(1, 20))
    mode = rng.choice(["tree", "specpipe", "flowspec"])
    want = reference(PROMPTS["code"], NEW_TOKENS)
    got = complete(ring, PROMPTS["code"], mode=mode, draft="int8", max_new_tokens=NEW_TOKENS, **shape)
    assert got == want, f"{mode} with {shape}"


@pytest.fixture(scope="module")
def six_stages(start_cluster):
    cluster = start_cluster(6)
    yield cluster
    cluster.stop()


@pytest.mark.parametrize(
    "mode,draft,segment_size",
    [("flowspec", "int8", 1), ("flowspec", "int8", 2), ("flowspec", "ngram", 3), ("specpipe", "int8", 16)],
)
def test_six_stages_with_prunes_racing_tiny_segments(six_stages, reference, mode, draft, segment_size):
    """Many stages and tiny segments: prunes overtake queued segments on every stage."""
    for prompt in sorted(PROMPTS):
        got = complete(six_stages, PROMPTS[prompt], mode=mode, draft=draft, segment_size=segment_size,
                       max_new_tokens=NEW_TOKENS)
        assert got == reference(PROMPTS[prompt], NEW_TOKENS), prompt


def test_bf16_draft_is_lossless(ring, reference):
    """The bf16 copy of the target drafts better than int8, but the output is still the target's."""
    got = complete(ring, PROMPTS["story"], mode="flowspec", draft="bf16", max_new_tokens=NEW_TOKENS)
    assert got == reference(PROMPTS["story"], NEW_TOKENS)
