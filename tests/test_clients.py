"""Many clients on one head: all served in arrival order with the right text; a client that
cancels or vanishes mid-stream frees the head for the others."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import pytest

from flowspec_zmq.client import Client

from .conftest import PROMPTS, client_address

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


@pytest.fixture(scope="module")
def ring(start_cluster):
    return start_cluster(2)


def test_eight_concurrent_clients_are_all_served_in_order(ring, reference):
    jobs = [(PROMPTS[sorted(PROMPTS)[i % 2]], 6 + i, ["ar", "flowspec", "tree", "specpipe"][i % 4]) for i in range(8)]
    finished: list[int] = []

    async def one(i: int, prompt: str, tokens: int, mode: str) -> list[int]:
        await asyncio.sleep(0.05 * i)  # fixes the arrival order
        completion = await Client(client_address(ring)).complete(prompt, max_new_tokens=tokens, mode=mode)
        finished.append(i)
        return completion.ids

    async def all_jobs() -> list[list[int]]:
        return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))

    results = asyncio.run(all_jobs())
    for (prompt, tokens, _), ids in zip(jobs, results):
        assert ids == reference(prompt, 20)[:tokens]
    assert finished == list(range(8))


def test_cancelled_stream_frees_the_head(ring, reference):
    async def cancel_early() -> int:
        count = 0
        async for _ in Client(client_address(ring)).stream(PROMPTS["story"], max_new_tokens=400, mode="ar"):
            count += 1
            if count == 2:
                break  # leaving the loop sends a cancel
        return count

    assert asyncio.run(cancel_early()) == 2
    after = asyncio.run(Client(client_address(ring)).complete(PROMPTS["code"], max_new_tokens=8))
    assert after.ids == reference(PROMPTS["code"], 20)[:8]
    assert re.search(r"stopped after \d+ tokens: cancelled by its client", ring.nodes["head"].log_path.read_text())


def test_vanished_client_frees_its_request(ring, reference):
    child = subprocess.run([sys.executable, "-c", VANISHING_CLIENT, client_address(ring), PROMPTS["story"]],
                           capture_output=True, text=True, timeout=120)
    assert "streaming" in child.stdout
    after = asyncio.run(Client(client_address(ring)).complete(PROMPTS["code"], max_new_tokens=8))
    assert after.ids == reference(PROMPTS["code"], 20)[:8]
    stopped = re.findall(r"stopped after (\d+) tokens: its client went away", ring.nodes["head"].log_path.read_text())
    assert stopped and int(stopped[-1]) < 400
