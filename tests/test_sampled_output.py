"""Sampled output through the head's endpoint in one process (tests/inprocess.py): seeded sampling
is reproducible and identical in every mode, and what the ring draws follows the target's own
distribution."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import torch

from flowspec_zmq.client import Client
from flowspec_zmq.model_slices import load_full_model
from flowspec_zmq.sampling import SamplingParams, filtered_probs
from flowspec_zmq.strategies import MODES
from flowspec_zmq.topology import DecodingConfig

from .conftest import PROMPTS
from .inprocess import in_process_ring, stage_windows


async def test_sampling_is_reproducible_and_identical_across_modes(served):
    client = Client(served[1])
    options = dict(temperature=0.9, top_k=20, top_p=0.95, max_new_tokens=16)
    runs = {mode: (await client.complete(PROMPTS["story"], mode=mode, seed=7, **options)).ids for mode in MODES}
    again = (await client.complete(PROMPTS["story"], mode="flowspec", seed=7, **options)).ids
    other_seed = (await client.complete(PROMPTS["story"], mode="flowspec", seed=8, **options)).ids
    assert again == runs["flowspec"]
    assert all(ids == runs["ar"] for ids in runs.values()), runs
    assert other_seed != runs["flowspec"]


def chi_square_critical_001(dof: int) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty approximation; within 1% for dof >= 3)."""
    z = 3.090232
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


async def test_sampled_pairs_follow_the_target_distribution(head, drafts, model_dir, tokenizer):
    """Two-token continuations drawn through the ring match p(t1) p(t2 | t1) of the target. One
    mode is enough: the test above shows every mode draws the same tokens for the same seed. The
    draws go to the head's engine on a one-stage ring (the endpoint adds nothing to sampling)."""
    params = SamplingParams(temperature=1.0, top_k=3)
    prompt = "My favourite colour is"
    ids = tokenizer(prompt)["input_ids"]
    model = load_full_model(model_dir, torch.float32)
    with torch.inference_mode():
        first = filtered_probs(model(torch.tensor([ids])).logits[0, -1:], params)[0]
        expected: dict[tuple[int, int], float] = {}
        for t1 in torch.nonzero(first).flatten().tolist():
            second = filtered_probs(model(torch.tensor([ids + [t1]])).logits[0, -1:], params)[0]
            for t2 in torch.nonzero(second).flatten().tolist():
                expected[t1, t2] = float(first[t1] * second[t2])
    draws = 150
    counts = Counter()
    options = DecodingConfig(mode="flowspec", max_new_tokens=2, temperature=1.0, top_k=3, tree_top_k=2,
                             tree_depth=2, segment_size=2)

    async def ignore(_: list[int]) -> None:
        pass

    async with in_process_ring(head, stage_windows(model_dir, 1)) as ring:
        engine = ring.engine(model_dir, tokenizer, drafts=drafts)
        for seed in range(draws):
            stats = await engine.generate(ids, replace(options, seed=seed), ignore)
            counts[tuple(stats.tokens)] += 1
    assert set(counts) <= set(expected), f"drew pairs the target cannot produce: {set(counts) - set(expected)}"
    # Pool rare cells so every expected count is at least 5, as the test requires.
    pooled_expected, pooled_observed, rest_e, rest_o = [], [], 0.0, 0
    for cell in sorted(expected, key=expected.get, reverse=True):
        e = expected[cell] * draws
        if e >= 5:
            pooled_expected.append(e)
            pooled_observed.append(counts[cell])
        else:
            rest_e += e
            rest_o += counts[cell]
    if rest_e > 0:
        pooled_expected.append(rest_e)
        pooled_observed.append(rest_o)
    statistic = sum((o - e) ** 2 / e for o, e in zip(pooled_observed, pooled_expected))
    dof = len(pooled_expected) - 1
    assert dof >= 2
    assert statistic < chi_square_critical_001(dof), (statistic, pooled_observed, pooled_expected)
