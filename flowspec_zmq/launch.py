"""Start the topology's nodes on this machine as processes, watch them, stop them all together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .models import cache_root
from .topology import Topology, load_topology

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
READY_MARK = "ready:"


class NodeDied(RuntimeError):
    def __init__(self, name: str, code: int | None, log_tail: str) -> None:
        super().__init__(f"node {name} exited with code {code}; last lines of its log:\n{log_tail}")
        self.name = name


@dataclass
class NodeProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str]
    restarts: int = 0

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def ready(self) -> bool:
        """The current incarnation said it is ready (the log keeps every incarnation's lines)."""
        try:
            return self.log_path.read_text(errors="replace").count(READY_MARK) > self.restarts
        except OSError:
            return False


def node_command(topology_path: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "nodes", str(topology_path), name]


class LocalCluster:
    """The nodes of a topology that live on this machine, one process each."""

    def __init__(
        self,
        topology_path: Path,
        names: list[str] | None = None,
        log_dir: Path | None = None,
        wrap: Callable[[str], list[str]] = lambda name: [],
        restart_limit: int = 0,
    ) -> None:
        self.topology_path = Path(topology_path).resolve()
        self.topology: Topology = load_topology(self.topology_path)
        local = [n.name for n in self.topology.nodes if n.host in LOCAL_HOSTS]
        self.names = names if names is not None else local
        self.log_dir = log_dir or cache_root() / "logs" / time.strftime("%Y%m%d-%H%M%S")
        self.nodes: dict[str, NodeProcess] = {}
        self.wrap = wrap  # command prefix per node, e.g. `ip netns exec HOST` for emulated hosts
        self.restart_limit = restart_limit  # restarts allowed per node before a death is final
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Nodes on one machine share its cores: give each an equal number of compute threads.
        env = dict(os.environ, FLOWSPEC_THREADS=str(max(1, (os.cpu_count() or 1) // len(self.names))))
        for name in self.names:
            self.start_node(name, env)

    def start_node(self, name: str, env: dict[str, str]) -> None:
        log_path = self.log_dir / f"{name}.log"
        self.nodes[name] = NodeProcess(name, self._spawn(name, env, log_path, "w"), log_path, env)

    def _spawn(self, name: str, env: dict[str, str], log_path: Path, mode: str) -> subprocess.Popen:
        with open(log_path, mode) as log:
            return subprocess.Popen(
                self.wrap(name) + node_command(self.topology_path, name), stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )

    def check(self) -> list[str]:
        """Restart dead nodes within their budget; returns the restarted names, raises NodeDied past it."""
        restarted = []
        for node in self.nodes.values():
            code = node.process.poll()
            if code is None:
                continue
            if node.restarts >= self.restart_limit:
                raise NodeDied(node.name, code, node.log_tail())
            node.restarts += 1
            with open(node.log_path, "a") as log:
                log.write(f"\n--- exited with code {code}; restart {node.restarts} of {self.restart_limit} ---\n")
            node.process = self._spawn(node.name, node.env, node.log_path, "a")
            restarted.append(node.name)
        return restarted

    def supervise_in_background(self, period_s: float = 0.2) -> None:
        """Keep restarting dead nodes from a thread (tests; `flowspec launch` polls itself)."""

        def loop() -> None:
            while not self._stopping.wait(period_s):
                try:
                    self.check()
                except NodeDied:
                    return

        self._supervisor = threading.Thread(target=loop, name="supervisor", daemon=True)
        self._supervisor.start()

    def wait_ready(self, timeout_s: float = 600.0, on_ready: Callable[[str], None] | None = None) -> None:
        pending = set(self.nodes)
        deadline = time.monotonic() + timeout_s
        while pending:
            self.check()
            for name in sorted(pending):
                if self.nodes[name].ready():
                    pending.discard(name)
                    if on_ready:
                        on_ready(name)
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes {sorted(pending)} not ready after {timeout_s:.0f} s (logs in {self.log_dir})")
            time.sleep(0.1)

    def stop(self, grace_s: float = 5.0) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        for node in self.nodes.values():
            if node.process.poll() is None:
                os.killpg(node.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for node in self.nodes.values():
            try:
                node.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(node.process.pid, signal.SIGKILL)
                node.process.wait()

    def __enter__(self) -> LocalCluster:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
