"""The head's endpoint in one process: real clients over real ZeroMQ sockets talk to a HeadNode whose
ring is made of real stage logic and real SmolLM2 weights (tests/inprocess.py). Serving order,
cancellation, stopping, bad requests, a full queue, failures that must end one request
and leave the head serving, clients that notice a silent head, and recovery from a lost message."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import zmq
from transformers import AutoTokenizer

from flowspec_zmq.client import Client, GenerationFailed
from flowspec_zmq.client_protocol import ClientRequestError, Generate, Info, pack
from flowspec_zmq.head_node import prompt_ids
from flowspec_zmq.protocol import Segment
from flowspec_zmq.reference import reference_greedy
from flowspec_zmq.scheduler import GenerationError
from flowspec_zmq.strategies import MODES
from flowspec_zmq.topology import DecodingConfig, ServiceConfig, free_ports

from .conftest import PROMPTS
from .inprocess import in_process_head, in_process_ring

VANISHING_CLIENT = """
import asyncio, os, signal, sys
from flowspec_zmq.client import Client
async def main():
    async for event in Client(sys.argv[1]).events(sys.argv[2], max_new_tokens=400, mode="ar"):
        if event["event"] == "tokens":
            print("streaming", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # vanish without a word to the head
asyncio.run(main())
"""


async def test_cancelled_stream_frees_the_head(served, reference, caplog):
    _, address = served
    caplog.set_level(logging.INFO)
    count = 0
    async for _ in Client(address).stream(PROMPTS["story"], max_new_tokens=400, mode="ar"):
        count += 1
        if count == 2:
            break  # leaving the loop sends a cancel
    after = await Client(address).complete(PROMPTS["code"], max_new_tokens=8)
    assert after.ids == reference(PROMPTS["code"], 20)[:8]
    # Its cancel or its closed connection, whichever the head notices first, ends the request.
    assert re.search(r"stopped after \d+ tokens: (cancelled by its client|its client went away)", caplog.text)


async def test_vanished_client_frees_its_request(served, reference, caplog):
    _, address = served
    caplog.set_level(logging.INFO)
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", VANISHING_CLIENT, address, PROMPTS["story"],
                                                 stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(child.communicate(), 120)
    assert b"streaming" in out
    after = await Client(address).complete(PROMPTS["code"], max_new_tokens=8)
    assert after.ids == reference(PROMPTS["code"], 20)[:8]
    stopped = re.findall(r"stopped after (\d+) tokens: its client went away", caplog.text)
    assert stopped and int(stopped[-1]) < 400


STOPPING = [{"role": "user", "content": "Reply with the single word: yes"}]


@pytest.fixture(scope="module")
def stopping_reference(model_dir, tokenizer) -> list[int]:
    ids = prompt_ids(tokenizer, Generate(0, messages=STOPPING))  # the head's own chat-template path
    want = reference_greedy(model_dir, ids, 40, eos_ids=[tokenizer.eos_token_id])
    assert want[-1] == tokenizer.eos_token_id and len(want) < 40, "the prompt should make the model stop by itself"
    return want


@pytest.mark.parametrize("mode", MODES)
async def test_eos_inside_a_segment_stops_exactly_there(served, stopping_reference, mode):
    messages = STOPPING
    want = stopping_reference
    got = await Client(served[1]).complete(messages=messages, mode=mode, max_new_tokens=40, segment_size=16)
    assert got.ids == want
    assert got.stats["stop_reason"] == "eos"


@pytest.mark.parametrize("mode", MODES)
async def test_max_new_tokens_inside_a_segment(served, reference, mode):
    got = await Client(served[1]).complete(PROMPTS["code"], mode=mode, max_new_tokens=7, segment_size=16,
                                           tree_total_tokens=40)
    assert got.ids == reference(PROMPTS["code"], 20)[:7]
    assert got.stats["stop_reason"] == "length"


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
        (dict(prompt_ids=[10**9]), "prompt_ids must be a list of valid token ids"),
    ],
)
async def test_bad_requests_get_clear_errors(served, reference, request_kwargs, message):
    client = Client(served[1])
    prompt = request_kwargs.pop("prompt", None)
    with pytest.raises(GenerationFailed, match=message) as failure:
        await client.complete(prompt, **request_kwargs)
    assert failure.value.reason == "invalid"
    assert (await client.complete(PROMPTS["code"], max_new_tokens=4)).ids == reference(PROMPTS["code"], 20)[:4]


async def test_garbage_client_frames_get_an_error_and_the_head_serves_on(served, reference):
    socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(served[1])
    try:
        for frame in [b"\xff\xfe garbage", b"\x93\x01\x02\x03", b"\x81\xa1v\x07"]:
            await socket.send(frame)
            assert b"error" in await asyncio.wait_for(socket.recv(), 10)
    finally:
        socket.close()
    assert (await Client(served[1]).complete(PROMPTS["code"], max_new_tokens=4)).ids == reference(PROMPTS["code"], 20)[:4]


# The alternation check that many models' templates (Mistral, Llama 2, Gemma 2) carry.
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
)


def test_a_chat_template_that_raises_is_a_clear_request_error(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = ALTERNATING_TEMPLATE
    messages = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    with pytest.raises(ClientRequestError, match="chat template rejects these messages: Conversation roles must"):
        prompt_ids(tokenizer, Generate(3, messages=messages))
    assert prompt_ids(tokenizer, Generate(4, messages=messages[:1]))  # alternating roles pass


async def test_a_full_queue_refuses_at_once(head, three_stages, drafts, model_dir, tokenizer, reference):
    async with in_process_ring(head, three_stages) as ring, \
            in_process_head(ring, model_dir, tokenizer, drafts,
                            ServiceConfig(max_requests=1, max_queued_requests=1)) as (_, address):
        running = Client(address).stream(PROMPTS["story"], max_new_tokens=60, mode="ar")
        await anext(running)  # the first request runs now, in the only slot
        queued = asyncio.create_task(Client(address).complete(PROMPTS["code"], max_new_tokens=4))
        await asyncio.sleep(0.3)
        with pytest.raises(GenerationFailed, match="busy: 1 requests are waiting") as failure:
            await Client(address).complete(PROMPTS["code"], max_new_tokens=4)
        assert failure.value.reason == "busy"
        await running.aclose()
        assert (await queued).ids == reference(PROMPTS["code"], 20)[:4]


async def test_wrong_width_from_the_ring_fails_that_request_only(head, three_stages, drafts, model_dir, tokenizer, reference):
    async with in_process_ring(head, three_stages) as ring, in_process_head(ring, model_dir, tokenizer, drafts) as (_, address):
        last_stage = ring.stages[-1].link

        async def narrow_next_segment(message) -> None:  # a broken stage: one segment comes back 7 wide
            if isinstance(message, Segment) and not message.commit:
                last_stage.send = send
                message = message.with_hidden(message.hidden[:, :7].contiguous())
            await send(message)

        send, last_stage.send = last_stage.send, narrow_next_segment
        with pytest.raises(GenerationFailed, match="hidden states 7 wide") as failure:
            await Client(address).complete(PROMPTS["code"], max_new_tokens=12, mode="ar")
        assert failure.value.ids == reference(PROMPTS["code"], 20)[:1]  # the prefill's token was committed
        assert (await Client(address).complete(PROMPTS["code"], max_new_tokens=4)).ids == reference(PROMPTS["code"], 20)[:4]


async def test_a_client_that_stops_reading_is_let_go_and_others_are_served(
        head, three_stages, drafts, model_dir, tokenizer, reference, caplog):
    """Its full send queue gives the head a ZMQ error other than host-unreachable (EAGAIN)."""
    async with in_process_ring(head, three_stages) as ring, \
            in_process_head(ring, model_dir, tokenizer, drafts) as (node, address):
        node.clients.setsockopt(zmq.SNDHWM, 1)  # a listener copies the options when it binds:
        node.clients.setsockopt(zmq.SNDBUF, 1024)
        tight = f"tcp://127.0.0.1:{free_ports(1)[0]}"  # a second endpoint of the same socket
        node.clients.bind(tight)
        silent = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        silent.setsockopt(zmq.RCVHWM, 1)
        silent.setsockopt(zmq.RCVBUF, 1024)
        silent.connect(tight)
        try:
            for i in range(400):  # asks and never reads the answers
                await silent.send(pack(Info(i)))
            for _ in range(100):
                await asyncio.sleep(0.1)
                if "cannot answer a client: Resource temporarily unavailable" in caplog.text:
                    break
            assert "cannot answer a client: Resource temporarily unavailable" in caplog.text
            assert (await Client(address).complete(PROMPTS["code"], max_new_tokens=4)).ids == reference(PROMPTS["code"], 20)[:4]
        finally:
            silent.close(linger=0)


async def test_nothing_listening_fails_within_seconds():
    address = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    started = asyncio.get_running_loop().time()
    with pytest.raises(GenerationFailed, match="nothing answers at .*flowspec launch") as failure:
        await Client(address, answer_timeout_s=1.0).complete("hi")
    assert failure.value.reason == "unavailable"
    assert asyncio.get_running_loop().time() - started < 10


async def test_a_head_that_dies_mid_stream_is_noticed_and_tokens_are_kept(head, three_stages, drafts, model_dir, tokenizer):
    async with in_process_ring(head, three_stages) as ring:
        async with in_process_head(ring, model_dir, tokenizer, drafts) as (node, address):
            events = Client(address, answer_timeout_s=2.0).events(PROMPTS["story"], max_new_tokens=400, mode="ar")
            await anext(events)
            node_task = next(t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "HeadNode.run")
            node_task.cancel()  # the head dies: no goodbye, its socket closes
            with pytest.raises(GenerationFailed, match="stopped answering") as failure:
                async for _ in events:
                    pass
            assert len(failure.value.ids) >= 1


async def test_a_lost_message_is_recovered_and_the_statistics_cover_every_attempt(
        head, three_stages, drafts, model_dir, tokenizer, reference):
    async with in_process_ring(head, three_stages) as ring:
        sent = {"segments": 0}
        send = ring.send

        async def lose_the_fifth_segment(message) -> None:
            if isinstance(message, Segment):
                sent["segments"] += 1
                if sent["segments"] == 5:
                    return  # dropped on the way, as a frame that fails validation would be
            await send(message)

        ring.send = lose_the_fifth_segment
        engine = ring.engine(model_dir, tokenizer, ServiceConfig(progress_timeout_s=2.0), drafts)
        seen: list[int] = []

        async def collect(ids: list[int]) -> None:
            seen.extend(ids)

        options = DecodingConfig(mode="ar", max_new_tokens=20)  # every segment matters: the loss stalls
        stats = await engine.generate(tokenizer(PROMPTS["code"])["input_ids"], options, collect)
    assert stats.recoveries == 1
    assert stats.tokens == seen == reference(PROMPTS["code"], 20)
    assert len(stats.token_times) == len(stats.tokens) and stats.token_times == sorted(stats.token_times)
    assert stats.decode_s >= 2.0  # the deadline it waited out is part of the decode time
    assert stats.prefill_s > 0 and stats.verifications >= 1


async def test_a_lost_message_with_no_recoveries_left_fails_with_the_tokens(
        head, three_stages, drafts, model_dir, tokenizer, reference):
    async with in_process_ring(head, three_stages) as ring:
        send = ring.send

        async def lose_every_decode_segment(message) -> None:
            if not (isinstance(message, Segment) and not message.commit):
                await send(message)

        ring.send = lose_every_decode_segment
        engine = ring.engine(model_dir, tokenizer, ServiceConfig(progress_timeout_s=0.5, max_recoveries=1), drafts)

        async def ignore(_: list[int]) -> None:
            pass

        options = replace(DecodingConfig(), mode="ar", max_new_tokens=8)
        with pytest.raises(GenerationError, match="nothing came back from the ring for 0.5 s; gave up after 1 recoveries") as failure:
            await engine.generate(tokenizer(PROMPTS["code"])["input_ids"], options, ignore)
    assert failure.value.tokens == reference(PROMPTS["code"], 20)[:2]  # one first token per attempt's prefill


async def test_stop_strings_end_the_output_before_them(served, tokenizer, reference):
    want = tokenizer.decode(reference(PROMPTS["code"], 20), skip_special_tokens=True)
    stop = want[len(want) // 2 : len(want) // 2 + 3]  # three characters from the middle, maybe across tokens
    got = await Client(served[1]).complete(PROMPTS["code"], max_new_tokens=20, stop=["never appears", stop])
    assert got.text == want[: want.find(stop)]
    assert got.stats["stop_reason"] == "stop" and len(got.ids) < 20


async def test_a_request_without_a_seed_gets_its_own_and_reports_it(served):
    client = Client(served[1])
    options = dict(temperature=1.0, max_new_tokens=8, mode="ar")
    first, second = [await client.complete(PROMPTS["story"], **options) for _ in range(2)]
    assert first.stats["seed"] != second.stats["seed"]
    again = await client.complete(PROMPTS["story"], seed=first.stats["seed"], **options)
    assert again.ids == first.ids


async def test_info_reports_health_and_counters(served, reference):
    client = Client(served[1])
    await client.complete(PROMPTS["code"], max_new_tokens=4)
    info = await client.info()
    # In process there are no heartbeats: the head cannot vouch for its stages.
    assert info["health"] == {"ok": False, "problem": "stage stage1 has not sent a heartbeat yet",
                              "last_heartbeat_s": {"stage1": None, "stage2": None, "stage3": None}}
    assert info["metrics"]["requests"] == 1 and info["metrics"]["tokens"] == 4 and info["metrics"]["queued"] == 0
