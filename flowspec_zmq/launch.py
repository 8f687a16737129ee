"""Start the topology's nodes on this machine as processes, watch them, stop them all together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def ready(self) -> bool:
        try:
            return READY_MARK in self.log_path.read_text(errors="replace")
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
    ) -> None:
        self.topology_path = Path(topology_path).resolve()
        self.topology: Topology = load_topology(self.topology_path)
        local = [n.name for n in self.topology.nodes if n.host in LOCAL_HOSTS]
        self.names = names if names is not None else local
        self.log_dir = log_dir or cache_root() / "logs" / time.strftime("%Y%m%d-%H%M%S")
        self.nodes: dict[str, NodeProcess] = {}
        self.wrap = wrap  # command prefix per node, e.g. `ip netns exec HOST` for emulated hosts

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Nodes on one machine share its cores: give each an equal number of compute threads.
        env = dict(os.environ, FLOWSPEC_THREADS=str(max(1, (os.cpu_count() or 1) // len(self.names))))
        for name in self.names:
            self.start_node(name, env)

    def start_node(self, name: str, env: dict[str, str] | None = None) -> None:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                self.wrap(name) + node_command(self.topology_path, name), stdout=log, stderr=subprocess.STDOUT,
                env=env or dict(os.environ), start_new_session=True,
            )
        self.nodes[name] = NodeProcess(name, process, log_path)

    def check(self) -> None:
        for node in self.nodes.values():
            code = node.process.poll()
            if code is not None:
                raise NodeDied(node.name, code, node.log_tail())

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
