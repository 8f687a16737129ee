"""`flowspec status`: every node's place (host, layers), health, memory and last heartbeat.

The head reports them (`node_status`, under "nodes" in its info reply): it knows the topology it
loaded, hears every stage's heartbeats (which carry the stage's resident memory) and measures
itself. `status_view` draws such a reply as a table.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .liveness import Watchdog
from .memory import resident_mb
from .topology import Topology

HEALTH_STYLES = {"ok": "green", "starting": "yellow"}  # anything else is a problem: red


def node_status(head: str, watchdog: Watchdog, topology: Topology | None,
                windows: Mapping[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """One map per node, the head first: name, role, host and layers (from `windows`; None without),
    health (liveness.Health), rss_mb (None: not heard yet) and last_heartbeat_s (None: none yet;
    the head itself sends none)."""
    hosts = {node.name: node.host for node in topology.nodes} if topology else {}
    now = time.monotonic()
    rows = [{"name": head, "role": "head", "host": hosts.get(head), "layers": None, "health": "ok",
             "rss_mb": resident_mb(os.getpid()), "last_heartbeat_s": None}]
    for stage in watchdog.stages:
        seen = watchdog.last_seen.get(stage)
        rows.append({"name": stage, "role": "stage", "host": hosts.get(stage), "layers": windows.get(stage),
                     "health": watchdog.health(stage), "rss_mb": watchdog.rss_mb.get(stage),
                     "last_heartbeat_s": None if seen is None else now - seen})
    return rows


def _layers(row: dict[str, Any]) -> str:
    if row["role"] == "head":
        return "embed, lm_head"
    if row["layers"] is None:
        return "?"
    first, last = row["layers"]
    return f"{first}–{last - 1} ({last - first})"


def _memory(rss_mb: float | None) -> str:
    return "?" if not rss_mb else f"{rss_mb:,.0f} MB"  # 0: the node could not read its own


def _heartbeat(row: dict[str, Any]) -> str:
    if row["role"] == "head":
        return "-"  # it answered this request
    age = row["last_heartbeat_s"]
    return "never" if age is None else f"{age:.1f} s ago"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def status_view(info: dict[str, Any]) -> Group:
    """A head's info reply as one summary line and a table of its nodes."""
    health, metrics = info["health"], info["metrics"]
    state = Text("healthy", "bold green") if health["ok"] else Text(f"unhealthy: {health['problem']}", "bold red")
    summary = Text.assemble(
        (Path(info["model"]).name, "bold"), f" on {info['stages']} stages · ", state,
        f" · {metrics['running']} running, {metrics['queued']} queued · "
        f"served {_count(metrics['requests'], 'request')}, {_count(metrics['tokens'], 'token')}")
    table = Table("node", "role", "host", "layers", "health", box=box.SIMPLE_HEAD)
    table.add_column("memory", justify="right")
    table.add_column("heartbeat", justify="right")
    for row in info["nodes"]:
        table.add_row(row["name"], row["role"], row["host"] or "?", _layers(row),
                      Text(row["health"], HEALTH_STYLES.get(row["health"], "bold red")), _memory(row["rss_mb"]),
                      _heartbeat(row))
    return Group(summary, table)
