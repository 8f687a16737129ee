"""Shared fixtures: real node processes on 127.0.0.1 running the real SmolLM2 weights."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable, Iterator

import pytest
from transformers import AutoTokenizer

from flowspec_zmq.launch import LocalCluster
from flowspec_zmq.models import resolve_model_dir
from flowspec_zmq.reference import reference_greedy

TEST_MODEL = "smollm2-135m"
PROMPTS = {
    # The draft agrees often here (boilerplate code) ...
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    # ... and rarely here (free text).
    "story": "The old lighthouse keeper opened the door and saw",
}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def topology_toml(model: str, num_stages: int, host: str = "127.0.0.1", hosts: list[str] | None = None,
                  max_context: int = 1024, **decoding: object) -> str:
    """A ring of `num_stages` auto-split stages; `hosts` places node i (head first) on hosts[i]."""
    ports = free_ports(num_stages + 3)
    hosts = hosts or [host] * (num_stages + 1)
    lines = [f'[model]\nsource = "{model}"\ndtype = "float32"\nmax_context = {max_context}\n', "[decoding]"]
    for key, value in decoding.items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    lines.append(
        f'\n[[nodes]]\nname = "head"\nrole = "head"\nhost = "{hosts[0]}"\nport = {ports[0]}\n'
        f"client_port = {ports[1]}\ncontrol_port = {ports[2]}\n"
    )
    for i in range(num_stages):
        lines.append(
            f'[[nodes]]\nname = "stage{i + 1}"\nrole = "stage"\nhost = "{hosts[i + 1]}"\n'
            f'port = {ports[3 + i]}\nlayers = "auto"\n'
        )
    return "\n".join(lines)


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
def start_cluster(tmp_path_factory) -> Iterator[Callable[..., LocalCluster]]:
    """Start a local ring (stopped at the end of the module); returns the running cluster."""
    clusters: list[LocalCluster] = []

    def start(num_stages: int, **kwargs) -> LocalCluster:
        folder = tmp_path_factory.mktemp(f"ring{num_stages}")
        path = folder / "topology.toml"
        path.write_text(topology_toml(TEST_MODEL, num_stages, **kwargs))
        cluster = LocalCluster(path, log_dir=folder / "logs")
        clusters.append(cluster)
        cluster.__enter__()
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()


def client_address(cluster: LocalCluster) -> str:
    head = cluster.topology.head
    return f"tcp://{head.host}:{head.client_port}"
