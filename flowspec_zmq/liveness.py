"""Liveness: a node tells its launcher when it serves; stages send heartbeats to the head's control
socket, and the head notices silence.

A heartbeat says which node is alive and how long its current computation has run, so the head
can tell a dead node (no heartbeats) from a hung one (heartbeats, but one computation for too long).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import zmq
import zmq.asyncio

from .memory import resident_mb
from .protocol import Heartbeat, NodeReady, ProtocolError, decode_control, encode_control
from .security import Keys

HEARTBEAT_S = 0.5
READY_ENV = "FLOWSPEC_READY"  # where the launcher that started this process listens for NodeReady
# A stage as the head sees it: "starting" has sent nothing yet but may still be loading its weights
# (Watchdog.startup_grace_s); "silent" sent nothing for dead_after_s; "hung" is in one computation
# for longer than hung_after_s.
Health = Literal["ok", "starting", "never seen", "silent", "hung"]


def announce_ready(context: zmq.Context, node: str) -> None:
    """Tell the launcher that this process serves now; nodes started by hand have none to tell."""
    address = os.environ.get(READY_ENV)
    if not address:
        return
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 5000)  # closing at once must not drop the message
    socket.connect(address)
    socket.send(encode_control(NodeReady(node, os.getpid())))
    socket.close()


async def send_heartbeats(
    context: zmq.Context, address: str, node: str, busy_for: Callable[[], float], keys: Keys | None, head: str
) -> None:
    # `context` is plain (not asyncio): a NOBLOCK send must fail at once when the head is away,
    # not queue behind an asyncio send that waits for it.
    socket = context.socket(zmq.PUSH)
    if keys:
        keys.connect_to(socket, head)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 4)  # stale heartbeats are worthless: never queue many
    socket.connect(address)
    # Tells the head when a node came back as a new process (its KV caches are gone).
    pid = os.getpid()
    incarnation = f"{pid}-{time.time_ns()}"
    try:
        while True:
            try:
                beat = Heartbeat(node, busy_for(), incarnation, resident_mb(pid))  # /proc read: microseconds
                socket.send(encode_control(beat), zmq.NOBLOCK)
            except zmq.Again:  # the head is away; the next beat will try again
                pass
            await asyncio.sleep(HEARTBEAT_S)
    finally:
        socket.close()


@dataclass
class Watchdog:
    """The head's view of which stages are alive."""

    stages: tuple[str, ...]
    dead_after_s: float = 3.0
    hung_after_s: float = 120.0
    startup_grace_s: float = 600.0  # a stage still loading its weights sends nothing yet
    started: float = field(default_factory=time.monotonic)
    last_seen: dict[str, float] = field(default_factory=dict)
    busy_s: dict[str, float] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    incarnations: dict[str, str] = field(default_factory=dict)
    restarts: int = 0  # how many times any stage came back as a new process
    last_restarted: str = ""

    def beat(self, frame: bytes) -> None:
        try:
            beat = decode_control(frame)
        except ProtocolError:  # a malformed heartbeat proves nothing; ignore it
            return
        if not isinstance(beat, Heartbeat) or beat.node not in self.stages:
            return
        if self.incarnations.get(beat.node, beat.incarnation) != beat.incarnation:
            self.restarts += 1
            self.last_restarted = beat.node
        self.incarnations[beat.node] = beat.incarnation
        self.last_seen[beat.node] = time.monotonic()
        self.busy_s[beat.node] = beat.busy_s
        self.rss_mb[beat.node] = beat.rss_mb

    def health(self, node: str) -> Health:
        now = time.monotonic()
        seen = self.last_seen.get(node)
        if seen is None:
            return "never seen" if now - self.started > self.startup_grace_s else "starting"
        if now - seen > self.dead_after_s:
            return "silent"
        return "hung" if self.busy_s.get(node, 0.0) > self.hung_after_s else "ok"

    def problem(self) -> str | None:
        """A sentence naming the first stage that is dead or hung, or None."""
        for node in self.stages:
            match self.health(node):
                case "never seen":
                    return f"stage {node} has never sent a heartbeat"
                case "silent":
                    silent_s = time.monotonic() - self.last_seen[node]
                    return f"stage {node} is not responding (no heartbeat for {silent_s:.1f} s)"
                case "hung":
                    return f"stage {node} is hung (one computation running for {self.busy_s[node]:.0f} s)"
        return None
