"""What the ring does besides greedy decoding: stopping, sampling, bad input, client errors."""

from __future__ import annotations

import asyncio
import math
import os
from collections import Counter

import msgpack
import pytest
import torch
import zmq

from flowspec_zmq.client import Client, GenerationFailed
from flowspec_zmq.head_node import prompt_ids
from flowspec_zmq.model_slices import load_full_model
from flowspec_zmq.protocol import SCHEMA_VERSION, Segment, encode
from flowspec_zmq.reference import reference_greedy
from flowspec_zmq.sampling import SamplingParams, filtered_probs

from .conftest import PROMPTS, client_address

MODES = ["ar", "tree", "specpipe", "flowspec"]


@pytest.fixture(scope="module")
def ring(start_cluster):
    return start_cluster(3)


def run(coroutine):
    return asyncio.run(coroutine)


def complete(cluster, prompt=None, **options):
    return run(Client(client_address(cluster)).complete(prompt, **options))


@pytest.mark.parametrize("mode", MODES)
def test_eos_inside_a_segment_stops_exactly_there(ring, model_dir, tokenizer, mode):
    messages = [{"role": "user", "content": "Reply with the single word: yes"}]
    ids = prompt_ids(tokenizer, {"messages": messages})  # the head's own chat-template path
    eos = tokenizer.eos_token_id
    want = reference_greedy(model_dir, ids, 40, eos_ids=[eos])
    assert want[-1] == eos and len(want) < 40, "the prompt should make the model stop by itself"
    got = complete(ring, messages=messages, mode=mode, max_new_tokens=40, segment_size=16)
    assert got.ids == want
    assert got.stats["stop_reason"] == "eos"


@pytest.mark.parametrize("mode", MODES)
def test_max_new_tokens_inside_a_segment(ring, reference, mode):
    got = complete(ring, PROMPTS["code"], mode=mode, max_new_tokens=7, segment_size=16, tree_total_tokens=40)
    assert got.ids == reference(PROMPTS["code"], 20)[:7]
    assert got.stats["stop_reason"] == "length"


def test_sampling_is_reproducible_and_identical_across_modes(ring):
    options = dict(temperature=0.9, top_k=20, top_p=0.95, max_new_tokens=16)
    runs = {mode: complete(ring, PROMPTS["story"], mode=mode, seed=7, **options).ids for mode in MODES}
    again = complete(ring, PROMPTS["story"], mode="flowspec", seed=7, **options).ids
    other_seed = complete(ring, PROMPTS["story"], mode="flowspec", seed=8, **options).ids
    assert again == runs["flowspec"]
    assert all(ids == runs["ar"] for ids in runs.values()), runs
    assert other_seed != runs["flowspec"]


def chi_square_critical_001(dof: int) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty approximation; within 1% for dof >= 3)."""
    z = 3.090232
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("mode", ["tree", "flowspec"])
def test_sampled_pairs_follow_the_target_distribution(ring, model_dir, tokenizer, mode):
    """Two-token continuations drawn through the ring match p(t1) p(t2 | t1) of the target."""
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
    counts = Counter(
        tuple(complete(ring, prompt, mode=mode, max_new_tokens=2, temperature=1.0, top_k=3, seed=s,
                       tree_top_k=2, tree_depth=2, segment_size=2).ids)
        for s in range(draws)
    )
    assert set(counts) <= set(expected), f"drew pairs the target cannot produce: {set(counts) - set(expected)}"
    # Pool rare cells so every expected count is at least 5, as the test requires.
    cells = sorted(expected, key=expected.get, reverse=True)
    pooled_expected, pooled_observed, rest_e, rest_o = [], [], 0.0, 0
    for cell in cells:
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


def test_garbage_frames_do_not_kill_a_stage(ring, reference):
    stage = ring.topology.stages[1]
    context = zmq.Context.instance()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"tcp://{stage.host}:{stage.port}")
    good = encode(Segment(1, 0, True, (0,), (-1,), (0,), torch.zeros(1, 576)))
    bad_messages = [
        [b"not msgpack at all \xff\xfe"],
        [msgpack.packb({"v": SCHEMA_VERSION + 1, "kind": "segment", "req": 1})],
        [msgpack.packb({"v": SCHEMA_VERSION, "kind": "launch_missiles", "req": 1})],
        [good[0], b"\x00" * 7],  # tensor frame of the wrong size
        [good[0]],  # tensor frame missing
        [msgpack.packb([1, 2, 3])],
        [os.urandom(64), os.urandom(64), os.urandom(64)],
        # Valid frames but nonsense for the model: wrong hidden width, then positions past the context.
        encode(Segment(99, 0, True, (0,), (-1,), (0,), torch.zeros(1, 7))),
        encode(Segment(98, 0, False, (5,), (3,), (10**6,), torch.zeros(1, 576))),
    ]
    for frames in bad_messages:
        push.send_multipart([bytes(memoryview(f)) for f in frames])
    push.close()
    ring.check()  # every node still alive
    assert complete(ring, PROMPTS["code"], mode="flowspec", max_new_tokens=20).ids == reference(PROMPTS["code"], 20)
    log = ring.nodes[stage.name].log_path.read_text()
    assert log.count("rejected a message") >= 7


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        (dict(prompt=""), "empty"),
        (dict(prompt="word " * 2000), "exceeds the context"),
        (dict(prompt="hi", max_new_tokens=10**9), "options.max_new_tokens: must be positive and at most"),
        (dict(prompt="hi", mode="warp"), "options.mode: must be one of"),
        (dict(prompt="hi", wobble=3), "options.wobble: unknown key"),
        (dict(prompt="hi", temperature="hot"), "options.temperature: must be"),
        (dict(prompt_ids=[-5, 3]), "prompt_ids"),
    ],
)
def test_bad_requests_get_clear_errors(ring, request_kwargs, message):
    prompt = request_kwargs.pop("prompt", None)
    with pytest.raises(GenerationFailed, match=message):
        complete(ring, prompt, **request_kwargs)
    ring.check()
