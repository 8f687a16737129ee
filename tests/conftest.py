"""Shared fixtures: real node processes on 127.0.0.1 running the real SmolLM2 weights."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest
import torch
from transformers import AutoTokenizer

from flowspec_zmq.launch import LocalCluster
from flowspec_zmq.model_slices import load_head_model
from flowspec_zmq.models import resolve_model_dir
from flowspec_zmq.reference import reference_greedy
from flowspec_zmq.topology import local_topology_toml

TEST_MODEL = "smollm2-135m"
API_KEY = "test-key"  # what the `gateway` fixture asks for
# In-process rings run every node's compute on its own thread, like real nodes that each get one
# torch thread on a shared machine; more threads per node only fight over the two cores.
torch.set_num_threads(1)
PROMPTS = {
    # The draft agrees often here (boilerplate code) ...
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    # ... and rarely here (free text).
    "story": "The old lighthouse keeper opened the door and saw",
}


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return resolve_model_dir(TEST_MODEL)


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def reference(model_dir: Path, tokenizer) -> Callable[[str, int], list[int]]:
    """The target's own greedy continuation of a prompt (memoised)."""
    memo: dict[tuple[str, int], list[int]] = {}

    def greedy(prompt: str, max_new_tokens: int) -> list[int]:
        if (prompt, max_new_tokens) not in memo:
            ids = tokenizer(prompt)["input_ids"]
            memo[prompt, max_new_tokens] = reference_greedy(model_dir, ids, max_new_tokens)
        return memo[prompt, max_new_tokens]

    return greedy


@pytest.fixture(scope="module")
def head(model_dir):
    """The head's embedding, norm and lm_head, for in-process rings (tests/inprocess.py)."""
    return load_head_model(model_dir, torch.float32)


@pytest.fixture(scope="module")
def drafts() -> dict:
    return {}  # draft sources by (kind, vocabulary), loaded on first use and shared by a module's rings


@pytest.fixture(scope="module")
def three_stages(model_dir) -> list:
    from .inprocess import stage_windows

    return stage_windows(model_dir, 3)


@pytest.fixture
async def served(head, three_stages, drafts, model_dir, tokenizer):
    """A head serving real clients on a three-stage in-process ring; yields (HeadNode, address)."""
    from .inprocess import in_process_head, in_process_ring

    async with in_process_ring(head, three_stages) as ring, in_process_head(ring, model_dir, tokenizer, drafts) as both:
        yield both


@pytest.fixture
async def gateway(served) -> AsyncIterator[str]:
    """The OpenAI-compatible HTTP gateway (API key API_KEY) in front of `served`'s head; yields its
    base URL, e.g. "http://127.0.0.1:PORT"."""
    from flowspec_zmq.http_gateway import create_app

    from .inprocess import in_process_gateway

    async with in_process_gateway(create_app(served[1], api_keys=(API_KEY,))) as url:
        yield url


@pytest.fixture(scope="session")
def ring2(tmp_path_factory) -> Iterator[LocalCluster]:
    """One real two-stage ring for the end-to-end tests that leave it healthy (starting node
    processes is the slow part of a test)."""
    folder = tmp_path_factory.mktemp("ring2")
    path = folder / "topology.toml"
    # Every node names its device explicitly (`device = "cpu"`): the device plumbing runs end to end.
    text = local_topology_toml(TEST_MODEL, 2)
    path.write_text(text.replace('role = "head"\n', 'role = "head"\ndevice = "cpu"\n')
                    .replace('role = "stage"\n', 'role = "stage"\ndevice = "cpu"\n'))
    with LocalCluster(path, log_dir=folder / "logs") as cluster:
        assert {node.device for node in cluster.topology.nodes} == {"cpu"}
        yield cluster


def client_address(cluster: LocalCluster) -> str:
    head = cluster.topology.head
    return f"tcp://{head.host}:{head.client_port}"
