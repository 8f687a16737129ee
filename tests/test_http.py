"""The OpenAI-compatible HTTP API through the official openai client: a gateway served by uvicorn on
the test's event loop in front of the in-process head (tests/inprocess.py). Greedy text equals the
target's, usage and seeds, stop strings, each error status, health, metrics, models, concurrent
requests, a closed stream cancelling its request, and `flowspec launch`'s gateway process."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, AsyncIterator

import openai
import pytest

from flowspec_zmq.cli import main as flowspec
from flowspec_zmq.client import Client
from flowspec_zmq.client_protocol import Generate
from flowspec_zmq.head_node import prompt_ids
from flowspec_zmq.http_gateway import create_app
from flowspec_zmq.launch import LocalCluster
from flowspec_zmq.protocol import Segment
from flowspec_zmq.reference import reference_greedy
from flowspec_zmq.topology import HTTP_NODE, ServiceConfig, free_ports, local_topology_toml

from .conftest import API_KEY, PROMPTS, TEST_MODEL
from .inprocess import in_process_gateway, in_process_head, in_process_ring

CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]
TOKENS = 8


def openai_client(base_url: str, api_key: str = API_KEY) -> openai.AsyncOpenAI:
    # No retries: a 429 or 503 must reach the test at once.
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(gateway) as client:
        yield client


async def http_get(url: str) -> tuple[int, str]:
    """Status and body of a plain GET (no API key), off the event loop that serves it."""

    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    return await asyncio.to_thread(get)


@dataclass
class Answer:
    text: str
    finish_reason: str
    usage: tuple[int, int, int]  # prompt, completion and total tokens
    seed: int
    stats: dict[str, Any]  # the head's statistics (the extra field `flowspec`)


def _usage(usage: Any) -> tuple[int, int, int]:
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


async def ask(client: openai.AsyncOpenAI, chat: bool, stream: bool, **request: Any) -> Answer:
    """One completion, whole or streamed, from either endpoint."""
    create = client.chat.completions.create if chat else client.completions.create
    reply = await create(model=TEST_MODEL, stream=stream, **request)
    if not stream:
        choice = reply.choices[0]
        return Answer(choice.message.content if chat else choice.text, choice.finish_reason, _usage(reply.usage),
                      reply.model_extra["seed"], reply.model_extra["flowspec"])
    chunks = [chunk async for chunk in reply]
    if chat:
        assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join((c.choices[0].delta.content or "") if chat else c.choices[0].text for c in chunks)
    last = chunks[-1]
    return Answer(text, last.choices[0].finish_reason, _usage(last.usage), last.model_extra["seed"],
                  last.model_extra["flowspec"])


@pytest.fixture(scope="module")
def chat_reference(model_dir, tokenizer) -> tuple[int, list[int]]:
    """The chat prompt's length in tokens (the head's chat template) and the target's greedy reply."""
    ids = prompt_ids(tokenizer, Generate(0, messages=CHAT))
    want = reference_greedy(model_dir, ids, TOKENS, eos_ids=[tokenizer.eos_token_id])
    assert len(want) == TOKENS and tokenizer.eos_token_id not in want, "the reply should not end this early"
    return len(ids), want


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
async def test_greedy_text_is_the_targets_with_usage(client, chat, stream, chat_reference, reference, tokenizer):
    if chat:
        prompt_tokens, want = chat_reference
        request = dict(messages=CHAT)
    else:
        prompt_tokens, want = len(tokenizer(PROMPTS["code"])["input_ids"]), reference(PROMPTS["code"], 20)[:TOKENS]
        request = dict(prompt=PROMPTS["code"])
    answer = await ask(client, chat, stream, max_tokens=TOKENS, **request)
    assert answer.text == tokenizer.decode(want, skip_special_tokens=True)
    assert answer.finish_reason == "length"
    assert answer.usage == (prompt_tokens, TOKENS, prompt_tokens + TOKENS)
    assert answer.stats["tokens"] == TOKENS and answer.stats["tokens_per_s"] > 0 and "token_times" not in answer.stats


async def test_a_stop_string_ends_the_text_before_it(client, reference, tokenizer):
    want = tokenizer.decode(reference(PROMPTS["code"], 20)[:12], skip_special_tokens=True)
    stop = want[len(want) // 2 : len(want) // 2 + 3]
    answer = await ask(client, False, True, prompt=PROMPTS["code"], max_tokens=12, stop=stop)
    assert answer.text == want[: want.find(stop)]
    assert answer.finish_reason == "stop"


async def test_a_seed_repeats_a_sample_and_one_is_drawn_without(client):
    request = dict(prompt=PROMPTS["story"], max_tokens=TOKENS, temperature=1.0, extra_body={"mode": "ar"})
    drawn = await ask(client, False, False, **request)
    assert isinstance(drawn.seed, int)
    again = await ask(client, False, True, seed=drawn.seed, **request)
    assert (again.text, again.seed) == (drawn.text, drawn.seed)


async def test_concurrent_requests_with_project_options_are_all_served(client, reference, tokenizer):
    modes = ["ar", "tree", "specpipe", "flowspec"]
    jobs = [(PROMPTS[sorted(PROMPTS)[i % 2]], 3 + i, mode) for i, mode in enumerate(modes)]
    options = dict(draft="ngram", tree_depth=3, tree_top_k=2, tree_width=2, tree_total_tokens=12, segment_size=4)
    answers = await asyncio.gather(*(
        ask(client, False, i % 2 == 1, prompt=prompt, max_tokens=tokens, extra_body={"mode": mode, **options})
        for i, (prompt, tokens, mode) in enumerate(jobs)))
    for (prompt, tokens, _), answer in zip(jobs, answers):
        assert answer.text == tokenizer.decode(reference(prompt, 20)[:tokens], skip_special_tokens=True)


async def test_closing_a_stream_cancels_the_request_on_the_head(client, served, caplog):
    caplog.set_level(logging.INFO)
    stream = await client.chat.completions.create(model=TEST_MODEL, messages=CHAT, max_tokens=400, stream=True,
                                                  extra_body={"mode": "ar"})
    pieces = 0
    async for chunk in stream:
        pieces += bool(chunk.choices[0].delta.content)
        if pieces == 2:
            break
    await stream.close()
    await cancelled_on_the_head(served, caplog)


async def test_a_client_that_gives_up_on_a_whole_reply_cancels_it_on_the_head(client, served, caplog):
    caplog.set_level(logging.INFO)
    with pytest.raises(openai.APITimeoutError):
        await client.with_options(timeout=1.0).chat.completions.create(
            model=TEST_MODEL, messages=CHAT, max_tokens=400, extra_body={"mode": "ar"})
    await cancelled_on_the_head(served, caplog)


async def cancelled_on_the_head(served, caplog) -> None:
    """The head stopped the request long before its 400 tokens: on the gateway's cancel, or on finding
    the gateway's socket gone when it sent the next tokens (whichever its loop saw first)."""
    node = served[0]
    for _ in range(100):
        if node.metrics.requests_cancelled:
            break
        await asyncio.sleep(0.1)
    assert node.metrics.requests_cancelled == 1
    stopped = re.search(r"stopped after (\d+) tokens: (cancelled by its client|its client went away)", caplog.text)
    assert stopped and int(stopped[1]) < 100, caplog.text


BAD_REQUESTS = [  # (extra request fields, the parameter the error names)
    (dict(n=2), "n"),
    (dict(logprobs=True), "logprobs"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(extra_body={"wobble": 1}), "wobble"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content"),
    (dict(extra_body={"mode": "warp"}), None),  # refused by the head itself
]


async def test_unsupported_or_bad_parameters_are_400s(client):
    for fields, param in BAD_REQUESTS:
        with pytest.raises(openai.BadRequestError) as error:
            await client.chat.completions.create(**{"model": TEST_MODEL, "messages": CHAT, **fields})
        assert error.value.param == param, fields
    assert "options.mode: must be one of" in str(error.value)


async def test_a_bad_or_missing_api_key_is_a_401(gateway):
    async with openai_client(gateway, api_key="wrong") as stranger:
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            await stranger.models.list()
    status, body = await http_get(f"{gateway}/v1/models")
    assert status == 401 and json.loads(body)["error"]["code"] == "missing_api_key"


async def test_a_full_queue_is_a_429(head, three_stages, drafts, model_dir, tokenizer):
    async with in_process_ring(head, three_stages) as ring, \
            in_process_head(ring, model_dir, tokenizer, drafts, ServiceConfig(max_requests=1, max_queued_requests=1)
                            ) as (_, address), \
            in_process_gateway(create_app(address)) as url, openai_client(url, "no key needed") as client:
        running = Client(address).stream(PROMPTS["story"], max_new_tokens=60, mode="ar")
        await anext(running)  # the first request runs now, in the only slot
        queued = asyncio.create_task(Client(address).complete(PROMPTS["code"], max_new_tokens=4))
        await asyncio.sleep(0.3)
        with pytest.raises(openai.RateLimitError, match="busy: 1 requests are waiting"):
            await client.completions.create(model=TEST_MODEL, prompt=PROMPTS["code"], max_tokens=4)
        await running.aclose()
        await queued


async def test_a_failed_generation_is_a_500_or_ends_the_stream_with_an_error(head, three_stages, drafts, model_dir,
                                                                           tokenizer):
    async with in_process_ring(head, three_stages) as ring, \
            in_process_head(ring, model_dir, tokenizer, drafts) as (_, address), \
            in_process_gateway(create_app(address)) as url, openai_client(url, "no key needed") as client:
        last_stage = ring.stages[-1].link
        send = last_stage.send

        async def narrow(message) -> None:  # a broken stage: decoding segments come back 7 wide
            if isinstance(message, Segment) and not message.commit:
                message = message.with_hidden(message.hidden[:, :7].contiguous())
            await send(message)

        last_stage.send = narrow
        request = dict(model=TEST_MODEL, prompt=PROMPTS["code"], max_tokens=TOKENS, extra_body={"mode": "ar"})
        with pytest.raises(openai.InternalServerError, match="hidden states 7 wide"):
            await client.completions.create(**request)
        stream = await client.completions.create(stream=True, **request)  # the prefill's token arrives first
        with pytest.raises(openai.APIError, match="hidden states 7 wide"):
            async for _ in stream:
                pass


async def test_nothing_answering_at_the_head_is_a_503():
    nobody = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    async with in_process_gateway(create_app(nobody, answer_timeout_s=0.2)) as url, openai_client(url) as client:
        with pytest.raises(openai.InternalServerError, match="nothing answers at") as error:
            await client.chat.completions.create(model=TEST_MODEL, messages=CHAT, stream=True)
        assert error.value.status_code == 503
        status, body = await http_get(f"{url}/health")
        assert status == 503 and "nothing answers at" in json.loads(body)["problem"]
        assert (await http_get(f"{url}/metrics"))[1].endswith("flowspec_head_up 0\n")


async def test_health_says_why_the_ring_is_not_ready(gateway):
    status, body = await http_get(f"{gateway}/health")  # in process no stage sends heartbeats
    assert status == 503
    assert json.loads(body) == {"ok": False, "problem": "stage stage1 has not sent a heartbeat yet",
                                "last_heartbeat_s": {"stage1": None, "stage2": None, "stage3": None}}


async def test_metrics_are_prometheus_text(client, gateway):
    await client.completions.create(model=TEST_MODEL, prompt=PROMPTS["code"], max_tokens=4)
    status, text = await http_get(f"{gateway}/metrics")
    assert status == 200
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert all(re.fullmatch(r'flowspec_[a-z_]+(\{stage="stage\d"\})?', name) for name in samples), samples
    assert "# TYPE flowspec_requests_total counter" in text and "# TYPE flowspec_queued_requests gauge" in text
    assert samples["flowspec_head_up"] == "1" and samples["flowspec_healthy"] == "0"
    assert samples["flowspec_requests_total"] == "1" and samples["flowspec_tokens_total"] == "4"
    assert float(samples["flowspec_tokens_per_second"]) > 0
    assert float(samples["flowspec_accepted_tokens_per_verification"]) >= 1
    assert samples['flowspec_stage_heartbeat_age_seconds{stage="stage1"}'] == "NaN"


async def test_models_lists_the_served_model(client, model_dir):
    models = (await client.models.list()).data
    assert [m.id for m in models] == [model_dir.name] and models[0].model_extra["max_context"] == 512


async def test_launch_runs_the_gateway_as_a_node(served, tmp_path):
    """The `http` node process of `flowspec launch`, in front of the in-process head."""
    client_port = int(served[1].rsplit(":", 1)[1])
    ring_port, control_port, stage_port, http_port = free_ports(4)
    path = tmp_path / "topology.toml"
    path.write_text(local_topology_toml(TEST_MODEL, 1, ports=[ring_port, client_port, control_port, stage_port])
                    + f"\n[http]\nport = {http_port}\n")
    assert LocalCluster(path).names == ["head", "stage1", HTTP_NODE]
    cluster = LocalCluster(path, names=[HTTP_NODE], log_dir=tmp_path / "logs")
    cluster.start()
    try:
        await asyncio.to_thread(cluster.wait_ready, 60.0)
        status, body = await http_get(f"http://127.0.0.1:{http_port}/health")
    finally:
        cluster.stop()
    assert status == 503 and json.loads(body)["problem"] == "stage stage1 has not sent a heartbeat yet"


def test_serve_refuses_a_public_address_without_api_keys(capsys):
    assert flowspec(["serve", "--host", "0.0.0.0"]) == 2
    assert "http: serving on 0.0.0.0 (not loopback) without api_keys" in capsys.readouterr().err
