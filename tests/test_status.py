"""`flowspec status`: the head's per-node report (place, health, memory, heartbeat age) and its table.
The command against a real cluster is in test_cli.py."""

from __future__ import annotations

import time

from rich.console import Console

from flowspec_zmq.liveness import Watchdog
from flowspec_zmq.protocol import Heartbeat, encode_control
from flowspec_zmq.status import node_status, status_view
from flowspec_zmq.topology import make_local_topology


def test_the_head_reports_each_nodes_place_health_memory_and_heartbeat() -> None:
    topology = make_local_topology("smollm2-135m", 4, hosts=[f"10.0.0.{i}" for i in range(1, 6)],
                                   ports=[5600, 5599, 5601, 5610, 5620, 5630, 5640])
    watchdog = Watchdog(("stage1", "stage2", "stage3", "stage4"), dead_after_s=3.0, hung_after_s=60.0)
    watchdog.beat(encode_control(Heartbeat("stage1", 0.0, "a", 512.5)))
    watchdog.beat(encode_control(Heartbeat("stage3", 0.0, "c", 498.0)))
    watchdog.last_seen["stage3"] = time.monotonic() - 10  # silent since
    watchdog.beat(encode_control(Heartbeat("stage4", 61.0, "d", 0.0)))
    head, stage1, stage2, stage3, stage4 = node_status("head", watchdog, topology, topology.layer_windows(30))
    assert head["rss_mb"] > 50  # this very process: Python, torch, the test's imports
    assert {k: v for k, v in head.items() if k != "rss_mb"} == {
        "name": "head", "role": "head", "host": "10.0.0.1", "layers": None, "health": "ok", "last_heartbeat_s": None}
    assert (stage1["host"], stage1["layers"], stage1["health"], stage1["rss_mb"]) == ("10.0.0.2", (0, 8), "ok", 512.5)
    assert 0 <= stage1["last_heartbeat_s"] < 5
    assert (stage2["layers"], stage2["health"], stage2["rss_mb"], stage2["last_heartbeat_s"]) == (
        (8, 16), "starting", None, None)
    assert stage3["health"] == "silent" and stage3["last_heartbeat_s"] >= 10
    assert (stage4["layers"], stage4["health"]) == ((23, 30), "hung")
    watchdog.started -= watchdog.startup_grace_s
    assert node_status("head", watchdog, topology, topology.layer_windows(30))[2]["health"] == "never seen"


def test_without_a_topology_hosts_and_layers_are_unknown() -> None:
    _, stage = node_status("head", Watchdog(("stage1",)), None, {})
    assert (stage["host"], stage["layers"], stage["health"]) == (None, None, "starting")


INFO = {
    "model": "/root/.cache/flowspec_zmq/models/smollm2-135m", "stages": 2, "max_context": 1024, "defaults": {},
    "health": {"ok": False, "problem": "stage stage2 is not responding (no heartbeat for 4.2 s)",
               "last_heartbeat_s": {"stage1": 0.31, "stage2": 4.2}},
    "nodes": [
        {"name": "head", "role": "head", "host": "127.0.0.1", "layers": None, "health": "ok", "rss_mb": 1865.4,
         "last_heartbeat_s": None},
        {"name": "stage1", "role": "stage", "host": "127.0.0.1", "layers": [0, 15], "health": "ok", "rss_mb": 520.2,
         "last_heartbeat_s": 0.31},
        {"name": "stage2", "role": "stage", "host": "10.0.0.3", "layers": [15, 30], "health": "silent", "rss_mb": 0.0,
         "last_heartbeat_s": 4.2},
    ],
    "metrics": {"requests": 3, "tokens": 96, "queued": 1, "running": 2},
}


def rendered(info: dict, width: int = 80) -> str:
    console = Console(record=True, width=width)
    console.print(status_view(info))
    return console.export_text()


def test_the_table_shows_one_readable_row_per_node_in_80_columns() -> None:
    lines = rendered(INFO).splitlines()
    assert max(map(len, lines)) <= 80
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["node"])
    assert " ".join(" ".join(lines[:header]).split()) == (
        "smollm2-135m on 2 stages · unhealthy: stage stage2 is not responding (no heartbeat for 4.2 s) · 2 running, "
        "1 queued · served 3 requests, 96 tokens")
    rows = {line.split()[0]: line.split() for line in lines[header:] if line.strip() and "─" not in line}
    assert rows["node"] == ["node", "role", "host", "layers", "health", "memory", "heartbeat"]
    assert rows["head"] == ["head", "head", "127.0.0.1", "embed,", "lm_head", "ok", "1,865", "MB", "-"]
    assert rows["stage1"] == ["stage1", "stage", "127.0.0.1", "0–14", "(15)", "ok", "520", "MB", "0.3", "s", "ago"]
    # Memory that the stage could not read is "?".
    assert rows["stage2"] == ["stage2", "stage", "10.0.0.3", "15–29", "(15)", "silent", "?", "4.2", "s", "ago"]


def test_a_healthy_cluster_and_a_stage_still_loading() -> None:
    loading = {**INFO["nodes"][2], "health": "starting", "rss_mb": None, "last_heartbeat_s": None}
    info = {**INFO, "health": {"ok": True, "problem": None, "last_heartbeat_s": {}},
            "nodes": [*INFO["nodes"][:2], loading], "metrics": {"requests": 1, "tokens": 1, "queued": 0, "running": 0}}
    text = rendered(info)
    summary = "smollm2-135m on 2 stages · healthy · 0 running, 0 queued · served 1 request, 1 token"
    assert summary in " ".join(text.split())
    rows = [line.split() for line in text.splitlines()]
    assert ["stage2", "stage", "10.0.0.3", "15–29", "(15)", "starting", "?", "never"] in rows
