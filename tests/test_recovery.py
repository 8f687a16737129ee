"""A stage killed with SIGKILL mid-generation: the launcher restarts it, the head notices, rebuilds
every stage's cache by re-prefilling its committed tokens, and the output is what an uninterrupted
run produces."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from flowspec_zmq.client import Client, GenerationFailed
from flowspec_zmq.launch import LocalCluster

from flowspec_zmq.topology import local_topology_toml

from .conftest import PROMPTS, TEST_MODEL, client_address

NEW_TOKENS = 40


@pytest.fixture(scope="module")
def supervised_ring(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recovery")
    path = folder / "topology.toml"
    path.write_text(local_topology_toml(TEST_MODEL, 3))
    cluster = LocalCluster(path, log_dir=folder / "logs", restart=True)
    with cluster:
        cluster.supervise_in_background()
        yield cluster


async def generate_killing(cluster: LocalCluster, victim: str, after_tokens: int, **options) -> tuple[list[int], dict]:
    ids: list[int] = []
    stats: dict = {}
    killed = False
    async for event in Client(client_address(cluster)).events(PROMPTS["code"], max_new_tokens=NEW_TOKENS, **options):
        if event["event"] == "tokens":
            ids.extend(event["ids"])
            if not killed and len(ids) >= after_tokens:
                os.kill(cluster.nodes[victim].process.pid, signal.SIGKILL)
                killed = True
        elif event["event"] == "done":
            stats = event["stats"]
    assert killed, "the generation ended before the stage could be killed"
    return ids, stats


@pytest.mark.parametrize("mode, victim", [("ar", "stage2"), ("flowspec", "stage3")])
def test_killed_stage_is_replaced_and_output_is_unchanged(supervised_ring, reference, mode, victim):
    restarts_before = supervised_ring.nodes[victim].restarts
    ids, stats = asyncio.run(generate_killing(supervised_ring, victim, 4, mode=mode))
    assert ids == reference(PROMPTS["code"], NEW_TOKENS)
    assert stats["recoveries"] >= 1
    assert supervised_ring.nodes[victim].restarts == restarts_before + 1


def test_unrecoverable_failure_reports_the_node_and_keeps_tokens(tmp_path, reference):
    """Without a launcher to restart it, a dead stage fails the request with a clear error that
    names the stage, and the tokens committed before it are handed back."""
    path = tmp_path / "topology.toml"
    path.write_text(local_topology_toml(TEST_MODEL, 2, service={"recovery_timeout_s": 4.0}))
    with LocalCluster(path, log_dir=tmp_path / "logs") as cluster:
        client = Client(client_address(cluster))
        ids: list[int] = []

        async def run() -> None:
            async for event in client.events(PROMPTS["code"], max_new_tokens=NEW_TOKENS, mode="flowspec"):
                if event["event"] == "tokens":
                    ids.extend(event["ids"])
                    if cluster.nodes["stage2"].process.poll() is None:
                        os.kill(cluster.nodes["stage2"].process.pid, signal.SIGKILL)

        with pytest.raises(GenerationFailed, match="stage2") as failure:
            asyncio.run(run())
        assert failure.value.ids == ids and ids
        assert ids == reference(PROMPTS["code"], NEW_TOKENS)[: len(ids)]
        cluster.nodes.pop("stage2")  # it is gone for good; stop() handles the others


async def eight_clients_one_kill(cluster: LocalCluster, victim: str) -> list[tuple[list[int], dict]]:
    killed = asyncio.Event()

    async def one(i: int) -> tuple[list[int], dict]:
        ids: list[int] = []
        stats: dict = {}
        prompt = PROMPTS[sorted(PROMPTS)[i % 2]]
        async for event in Client(client_address(cluster)).events(prompt, max_new_tokens=NEW_TOKENS - i,
                                                                  mode=("ar", "flowspec")[i % 2]):
            if event["event"] == "tokens":
                ids.extend(event["ids"])
                if i == 0 and len(ids) >= 4 and not killed.is_set():
                    os.kill(cluster.nodes[victim].process.pid, signal.SIGKILL)
                    killed.set()
            elif event["event"] == "done":
                stats = event["stats"]
        return ids, stats

    results = await asyncio.gather(*(one(i) for i in range(8)))
    assert killed.is_set(), "the generations ended before the stage could be killed"
    return results


def test_killed_stage_while_eight_requests_run_recovers_all_eight(supervised_ring, reference):
    results = asyncio.run(eight_clients_one_kill(supervised_ring, "stage2"))
    for i, (ids, stats) in enumerate(results):
        assert ids == reference(PROMPTS[sorted(PROMPTS)[i % 2]], NEW_TOKENS)[: NEW_TOKENS - i]
    assert results[0][1]["recoveries"] >= 1  # at least the request running when the stage died
