"""Supervision like a service manager: the restart policy on a fake clock, restarts and readiness with
cheap stand-in processes, typed heartbeats, and a real ring whose stage is killed more often than
the old fixed budget of three restarts allowed."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Callable

import msgpack
import pytest
import zmq

from flowspec_zmq.client import Client
from flowspec_zmq.launch import MAX_BACKOFF_S, NEVER_RESTART, LocalCluster, NodeDied, RestartPolicy
from flowspec_zmq.liveness import READY_ENV, Watchdog, announce_ready
from flowspec_zmq.protocol import Heartbeat, NodeReady, encode_control
from flowspec_zmq.topology import ServiceConfig, local_topology_toml

from .conftest import PROMPTS, TEST_MODEL, client_address

# -- the policy, on a fake clock -----------------------------------------------------------------


def delays(policy: RestartPolicy, death_times: list[float]) -> list[float | None]:
    """The policy's answer after each death, as a supervisor would ask it."""
    answers = []
    for i, now in enumerate(death_times):
        answers.append(policy.delay(death_times[: i + 1], now))
    return answers


def test_backoff_doubles_with_each_death_in_the_window() -> None:
    policy = RestartPolicy(limit=5, window_s=300.0, backoff_s=0.5)
    assert delays(policy, [0.0, 10.0, 20.0, 30.0, 40.0]) == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_backoff_is_capped() -> None:
    policy = RestartPolicy(limit=100, window_s=1e6, backoff_s=4.0)
    assert delays(policy, [float(t) for t in range(6)]) == [4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    huge = RestartPolicy(limit=1 << 20, window_s=1e9, backoff_s=0.5)
    assert huge.delay([0.0] * 5000, 0.0) == MAX_BACKOFF_S


def test_gives_up_only_past_the_limit_inside_the_window() -> None:
    policy = RestartPolicy(limit=3, window_s=60.0, backoff_s=1.0)
    assert delays(policy, [0.0, 1.0, 2.0, 3.0]) == [1.0, 2.0, 4.0, None]
    # The same four deaths spread wider than the window: each finds at most three recent ones.
    assert delays(policy, [0.0, 30.0, 61.0, 91.0]) == [1.0, 2.0, 2.0, 2.0]
    assert policy.recent([0.0, 30.0, 61.0, 91.0], 91.0) == [61.0, 91.0]


def test_never_restart_and_the_topology_policy() -> None:
    assert NEVER_RESTART.delay([5.0], 5.0) is None
    service = ServiceConfig(restart_limit=7, restart_window_s=10.0, restart_backoff_s=0.25)
    assert RestartPolicy.from_service(service) == RestartPolicy(7, 10.0, 0.25)


# -- the launcher with stand-in processes (no model loads) ---------------------------------------


def stand_in_cluster(tmp_path: Path, shell: str, restart: bool, **service) -> LocalCluster:
    """A one-stage topology whose stage process is `sh -c SHELL` instead of a real node."""
    path = tmp_path / "topology.toml"
    path.write_text(local_topology_toml(TEST_MODEL, 1, service=service or None))
    return LocalCluster(path, names=["stage1"], log_dir=tmp_path / "logs", wrap=lambda name: ["sh", "-c", shell],
                        restart=restart)


def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def given_up(cluster: LocalCluster, timeout_s: float = 10.0) -> NodeDied:
    """Supervise until the launcher gives up; returns why."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            cluster.check()
        except NodeDied as exc:
            return exc
        time.sleep(0.02)
    pytest.fail("the launcher never gave up")


def test_a_node_that_keeps_dying_is_restarted_with_backoff_then_given_up(tmp_path) -> None:
    cluster = stand_in_cluster(tmp_path, "exit 3", True, restart_limit=2, restart_window_s=60.0, restart_backoff_s=0.1)
    started = time.monotonic()
    cluster.start()
    try:
        reason = str(given_up(cluster))
        assert "stage1 exited with code 3, its death 3 within 60 s ([service] restart_limit = 2)" in reason
        assert time.monotonic() - started >= 0.1 + 0.2  # both backoffs were waited out
        assert cluster.nodes["stage1"].restarts == 2
        log = cluster.nodes["stage1"].log_path.read_text()
        assert "restarting in 0.1 s" in log and "restarting in 0.2 s" in log
    finally:
        cluster.stop()


def test_without_restart_the_first_death_is_final(tmp_path) -> None:
    cluster = stand_in_cluster(tmp_path, "echo cannot start; exit 1", False)
    cluster.start()
    try:
        assert "stage1 exited with code 1; last log line: cannot start (log: " in str(given_up(cluster))
        assert cluster.nodes["stage1"].restarts == 0
    finally:
        cluster.stop()


def send_ready(address: str, message: NodeReady) -> None:
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(address)
        push.send(encode_control(message))


def test_readiness_counts_only_the_current_process(tmp_path, monkeypatch) -> None:
    cluster = stand_in_cluster(tmp_path, "sleep 60", True, restart_backoff_s=0.05)
    cluster.start()
    try:
        node = cluster.nodes["stage1"]
        address = node.env[READY_ENV]
        # This test process is not the node: its announcement (real API, wrong pid) must not count,
        # nor one naming another node.
        monkeypatch.setenv(READY_ENV, address)
        with zmq.Context() as context:
            announce_ready(context, "stage1")
        send_ready(address, NodeReady("stage2", node.process.pid))
        time.sleep(0.3)
        cluster.check()
        assert not node.ready
        send_ready(address, NodeReady("stage1", node.process.pid))
        cluster.wait_ready(timeout_s=5.0)
        # A restarted node is a new process: not ready until it says so itself.
        old_pid = node.process.pid
        os.kill(old_pid, signal.SIGKILL)
        until(lambda: bool(cluster.check()), 5.0, "the restart")
        assert not node.ready and node.process.pid != old_pid
        send_ready(address, NodeReady("stage1", old_pid))
        time.sleep(0.3)
        cluster.check()
        assert not node.ready
    finally:
        cluster.stop()


def test_nodes_started_by_hand_announce_nothing(monkeypatch) -> None:
    monkeypatch.delenv(READY_ENV, raising=False)
    with zmq.Context() as context:
        announce_ready(context, "stage1")  # no launcher to tell: returns quietly


# -- heartbeats ----------------------------------------------------------------------------------


def test_watchdog_follows_typed_heartbeats() -> None:
    watchdog = Watchdog(("stage1",), dead_after_s=3.0, hung_after_s=60.0)
    watchdog.beat(encode_control(Heartbeat("stage1", 0.0, "first")))
    watchdog.beat(encode_control(Heartbeat("stage1", 0.0, "second")))
    assert (watchdog.restarts, watchdog.last_restarted, watchdog.problem()) == (1, "stage1", None)
    old_untyped = msgpack.packb({"node": "stage1", "busy_s": 0.0, "incarnation": "third"})
    for ignored in (b"garbage", old_untyped, encode_control(NodeReady("stage1", 1)),
                    encode_control(Heartbeat("stranger", 0.0, "x"))):
        watchdog.beat(ignored)
    assert watchdog.restarts == 1 and watchdog.incarnations == {"stage1": "second"}
    watchdog.beat(encode_control(Heartbeat("stage1", 61.0, "second")))
    assert "hung" in watchdog.problem()


# -- a real ring ---------------------------------------------------------------------------------

KILLS = 4  # one more than the old launcher's lifetime budget of three restarts
NEW_TOKENS = 12


def test_stage_killed_again_and_again_keeps_being_restarted(tmp_path, reference) -> None:
    path = tmp_path / "topology.toml"
    path.write_text(local_topology_toml(TEST_MODEL, 1, service={"restart_limit": 5, "restart_backoff_s": 0.1}))
    with LocalCluster(path, log_dir=tmp_path / "logs", restart=True) as cluster:
        cluster.supervise_in_background(period_s=0.05)
        stage = cluster.nodes["stage1"]
        for kill in range(1, KILLS + 1):
            pid = stage.process.pid
            os.kill(pid, signal.SIGKILL)
            until(lambda: stage.restarts == kill and stage.ready, 120.0, f"stage1 back after kill {kill}")
        assert all(node.process.poll() is None for node in cluster.nodes.values())
        completion = asyncio.run(Client(client_address(cluster)).complete(
            PROMPTS["code"], max_new_tokens=NEW_TOKENS, mode="flowspec"))
        assert completion.ids == reference(PROMPTS["code"], 20)[:NEW_TOKENS]
