"""Continuous batching: several requests share the ring, each one's output exactly what it gets
alone (greedy: the target's own output; seeded sampling: the same draws), whatever the other
requests' modes, drafts, lengths and options; stages run several requests' rows in one forward
without mixing their caches; cancels free a request's rows and caches at once; KV memory stays
within its cap. Real stage logic and real weights in one process (tests/inprocess.py)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from flowspec_zmq.client import Client
from flowspec_zmq.draft import NgramDraft, TreeShape
from flowspec_zmq.kv_budget import KVBudget
from flowspec_zmq.model_slices import load_config
from flowspec_zmq.protocol import Batch, Segment, StageError
from flowspec_zmq.sampling import SamplingParams
from flowspec_zmq.scheduler import RequestRejected
from flowspec_zmq.topology import DecodingConfig, ServiceConfig

from .conftest import PROMPTS
from .inprocess import in_process_head, in_process_ring
from .test_head_scheduler import PACED

NEW_TOKENS = 16
STORY, CODE = PROMPTS["story"], PROMPTS["code"]


async def test_eight_concurrent_requests_each_equal_the_target(head, three_stages, drafts, model_dir, tokenizer,
                                                               reference):
    """Every mode and draft at once, different prompts and lengths, arriving at different times."""
    cases = [("ar", "int8"), ("tree", "int8"), ("specpipe", "ngram"), ("flowspec", "int8"),
             ("flowspec", "ngram"), ("tree", "ngram"), ("specpipe", "int8"), ("ar", "ngram")]
    async with in_process_ring(head, three_stages, PACED) as ring:
        engine = ring.engine(model_dir, tokenizer, drafts=drafts)

        async def one(i: int, mode: str, draft: str) -> list[int]:
            await asyncio.sleep(0.03 * i)  # some join while others decode
            prompt = (STORY, CODE)[i % 2]
            options = DecodingConfig(mode=mode, draft=draft, max_new_tokens=NEW_TOKENS - i)

            async def ignore(_: list[int]) -> None:
                pass

            return (await engine.generate(tokenizer(prompt)["input_ids"], options, ignore)).tokens

        results = await asyncio.gather(*(one(i, *case) for i, case in enumerate(cases)))
    for i, tokens in enumerate(results):
        assert tokens == reference((STORY, CODE)[i % 2], 20)[: NEW_TOKENS - i], cases[i]
    assert ring.batch_sizes and max(ring.batch_sizes) >= 3, "ring messages did not carry several requests"


async def test_seeded_sampling_draws_the_same_tokens_beside_other_requests(head, three_stages, model_dir, tokenizer):
    sampling = [SamplingParams(temperature=0.9, top_p=0.95, seed=seed) for seed in (3, 11, 29)]
    ids = [tokenizer(p)["input_ids"] for p in (STORY, CODE, STORY)]
    shape = TreeShape(depth=4, top_k=2, total_tokens=12, width=2)
    async with in_process_ring(head, three_stages, PACED) as ring:
        alone = [(await ring.generate(i, NgramDraft(), "flowspec", NEW_TOKENS, shape, request_id=r, sampling=s)).tokens
                 for r, (i, s) in enumerate(zip(ids, sampling), 1)]
        together = await asyncio.gather(*(
            ring.generate(i, NgramDraft(), mode, NEW_TOKENS, shape, request_id=r, sampling=s)
            for r, (i, s, mode) in enumerate(zip(ids, sampling, ("flowspec", "ar", "tree")), 10)))
    assert [stats.tokens for stats in together] == alone
    assert alone[0] != alone[2]  # different seeds on the same prompt really draw differently


async def test_a_stage_runs_a_batch_in_one_forward_and_fails_only_the_bad_part(head, three_stages, tokenizer):
    async with in_process_ring(head, three_stages[:1]) as ring:
        stage = ring.stages[0]
        prompts = [tokenizer(p)["input_ids"] for p in (STORY, CODE)]
        prefill = [Segment(r, 1, True, tuple(range(len(p))), (-1,) * len(p), tuple(range(len(p))), head.embed(p))
                   for r, p in enumerate(prompts, 1)]
        separate = [stage.handle(segment)[0] for segment in prefill]
        for r in (1, 2):
            stage.caches.pop(r)
        bad = Segment(7, 1, False, (0,), (-1,), (5,), head.embed([1]))  # request 7 has no prefix here
        batch, error = stage.handle(Batch((*prefill, bad)))
    assert isinstance(error, StageError) and error.request_id == 7 and "unknown" in error.reason
    assert [part.request_id for part in batch.parts] == [1, 2]
    for got, alone in zip(batch.parts, separate):  # only the last prefill row returns from the last stage
        torch.testing.assert_close(got.hidden, alone.hidden, rtol=1e-4, atol=1e-4)


async def test_concurrent_clients_share_the_ring_and_stop_strings_still_cut(served, reference, tokenizer):
    node, address = served
    jobs = [(PROMPTS[sorted(PROMPTS)[i % 2]], 6 + i, ("ar", "tree", "specpipe", "flowspec")[i % 4]) for i in range(7)]
    story = tokenizer.decode(reference(STORY, 20))
    stop = story[12:16]
    most_running = 0

    async def watch() -> None:
        nonlocal most_running
        while True:
            most_running = max(most_running, len(node.serving))
            await asyncio.sleep(0.005)

    async def one(i: int, prompt: str, tokens: int, mode: str, **options):
        await asyncio.sleep(0.02 * i)
        return await Client(address).complete(prompt, max_new_tokens=tokens, mode=mode, **options)

    watcher = asyncio.create_task(watch())
    *results, stopped = await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)),
                                             one(7, STORY, 20, "flowspec", stop=[stop]))
    watcher.cancel()
    for (prompt, tokens, _), completion in zip(jobs, results):
        assert completion.ids == reference(prompt, 20)[:tokens]
    assert stopped.text == story[: story.index(stop)] and stopped.stats["stop_reason"] == "stop"
    assert most_running >= 4  # they decoded at once, not one after another


async def test_requests_beyond_max_requests_wait_in_arrival_order(head, three_stages, drafts, model_dir, tokenizer,
                                                                  reference):
    started: list[int] = []
    most_running = 0
    async with in_process_ring(head, three_stages) as ring, in_process_head(
            ring, model_dir, tokenizer, drafts, ServiceConfig(max_requests=2)) as (node, address):

        async def watch() -> None:
            nonlocal most_running
            while True:
                most_running = max(most_running, len(node.serving))
                for job in node.serving:
                    if job.options.max_new_tokens not in started:
                        started.append(job.options.max_new_tokens)
                await asyncio.sleep(0.002)

        async def one(i: int):
            await asyncio.sleep(0.03 * i)
            return await Client(address).complete(CODE, max_new_tokens=6 + i, mode="ar")

        watcher = asyncio.create_task(watch())
        results = await asyncio.gather(*(one(i) for i in range(5)))
        watcher.cancel()
    assert most_running == 2
    assert started == [6, 7, 8, 9, 10]
    for i, completion in enumerate(results):
        assert completion.ids == reference(CODE, 20)[: 6 + i]


async def test_a_cancelled_request_leaves_the_ring_at_once(head, three_stages, drafts, model_dir, tokenizer, reference):
    async with in_process_ring(head, three_stages, PACED) as ring, in_process_head(
            ring, model_dir, tokenizer, drafts) as (node, address):
        other = asyncio.create_task(Client(address).complete(STORY, max_new_tokens=NEW_TOKENS, mode="flowspec"))
        client = Client(address)
        events = client.events(CODE, max_new_tokens=200, mode="flowspec")
        async for event in events:
            if event["event"] == "tokens":
                break
        cancelled = next(job for job in node.serving if job.options.max_new_tokens == 200)
        await events.aclose()  # the client cancels when it stops reading
        for _ in range(200):
            if cancelled not in node.serving and all(len(s.caches) <= 1 for s in ring.stages):
                break
            await asyncio.sleep(0.01)
        assert cancelled not in node.serving
        assert all(len(s.caches) <= 1 for s in ring.stages)  # only the other request's cache is left
        assert (await other).ids == reference(STORY, 20)[:NEW_TOKENS]
        assert node.metrics.requests_cancelled == 1


async def test_kv_memory_is_reserved_per_request_and_capped(model_dir):
    config = load_config(model_dir)
    budget = KVBudget.for_stages(config, {"stage1": (0, 10), "stage2": (10, 20)}, 4, cap_mb=8)
    with pytest.raises(RequestRejected, match=r"stage1.*max_kv_mb = 8"):
        async with budget.reserve(4000):
            pass
    order: list[str] = []

    async def hold(name: str, tokens: int, seconds: float) -> None:
        async with budget.reserve(tokens):
            order.append(f"{name} in")
            await asyncio.sleep(seconds)
        order.append(f"{name} out")

    # 512-row caches take 7.5 MB on stage1 here: a second one must wait until the first is gone.
    await asyncio.gather(hold("a", 300, 0.05), hold("b", 300, 0.0))
    assert order == ["a in", "a out", "b in", "b out"]
    assert set(budget.used.values()) == {0}


async def test_a_request_that_cannot_fit_the_kv_memory_gets_a_clear_error(head, three_stages, drafts, model_dir,
                                                                          tokenizer):
    async with in_process_ring(head, three_stages) as ring:
        config = load_config(model_dir)
        windows = {s.name: (s.window.first, s.window.last) for s in ring.stages}
        engine = ring.engine(model_dir, tokenizer, drafts=drafts)
        engine.kv_budget = KVBudget.for_stages(config, windows, 4, cap_mb=4)

        async def ignore(_: list[int]) -> None:
            pass

        with pytest.raises(RequestRejected, match="max_kv_mb"):
            await engine.generate(tokenizer(CODE)["input_ids"], DecodingConfig(max_new_tokens=400), ignore)
        # A stage refuses rows beyond its own cap too, for that request only.
        stage = ring.stages[0]
        stage.max_kv_bytes = 1
        (error,) = stage.handle(Segment(3, 1, True, (0,), (-1,), (0,), head.embed([1])))
    assert isinstance(error, StageError) and "KV memory full" in error.reason
