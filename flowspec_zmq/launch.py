"""Start the topology's nodes on this machine as processes, supervise them like a service manager
(a dead node restarts after a backoff; one that keeps dying stops the cluster), stop them together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import zmq

from .devices import available_device
from .liveness import READY_ENV
from .models import cache_root, resolve_model_dir
from .protocol import NodeReady, ProtocolError, decode_control
from .topology import HTTP_NODE, ServiceConfig, Topology, TopologyError, load_topology

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
MAX_BACKOFF_S = 30.0


class NodeDied(RuntimeError):
    """The launcher gave up on a node: the message names it, its exit code, last log line and log."""

    def __init__(self, name: str, reason: str, last_log_line: str, log_path: Path) -> None:
        super().__init__(f"node {name} {reason}; last log line: {last_log_line or '(none)'} (log: {log_path})")
        self.name = name


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead node restarts: after a backoff that doubles with each of its deaths inside the
    window, unless it died more than `limit` times inside the window (then there is no point)."""

    limit: int  # 0: never restart
    window_s: float = 0.0
    backoff_s: float = 0.0

    @classmethod
    def from_service(cls, service: ServiceConfig) -> RestartPolicy:
        return cls(service.restart_limit, service.restart_window_s, service.restart_backoff_s)

    def recent(self, deaths: Sequence[float], now: float) -> list[float]:
        return [t for t in deaths if now - t <= self.window_s]

    def delay(self, deaths: Sequence[float], now: float) -> float | None:
        """Seconds to wait before restarting a node that died at the times `deaths` (the latest
        one now), or None: give up."""
        count = len(self.recent(deaths, now))
        if count > self.limit:
            return None
        # The exponent stops growing long after the cap is reached: no float overflow for big limits.
        return min(self.backoff_s * 2.0 ** min(count - 1, 64), MAX_BACKOFF_S)


NEVER_RESTART = RestartPolicy(limit=0)


@dataclass
class NodeProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str]
    restarts: int = 0
    deaths: list[float] = field(default_factory=list)  # monotonic times of its recent deaths
    restart_at: float | None = None  # dead, restarting at this monotonic time
    ready: bool = False  # the current process announced NodeReady

    def last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").split("\n")
        except OSError:
            return ""
        return next((line.strip() for line in reversed(lines) if line.strip()), "")


class ReadyInbox:
    """Where the nodes this launcher started announce NodeReady. A Unix socket in a private folder,
    not loopback TCP: nodes in other network namespaces reach it too, other users cannot."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="flowspec-")
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PULL)
        self.address = f"ipc://{self._folder.name}/ready"
        self._socket.bind(self.address)

    def receive(self) -> list[NodeReady]:
        """The announcements that arrived since the last call."""
        announced = []
        while True:
            try:
                frame = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:  # nothing more waiting
                return announced
            try:
                message = decode_control(frame)
            except ProtocolError:  # proves nothing about any node
                continue
            if isinstance(message, NodeReady):
                announced.append(message)

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()
        self._folder.cleanup()


def node_command(topology_path: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "flowspec_zmq.nodes", str(topology_path), name]


class LocalCluster:
    """The nodes of a topology that live on this machine, one process each.

    With `restart`, dead nodes come back by the topology's [service] restart policy; without it
    (tests that kill nodes on purpose, benchmarks) the first death is final.
    """

    def __init__(
        self,
        topology_path: Path,
        names: list[str] | None = None,
        log_dir: Path | None = None,
        wrap: Callable[[str], list[str]] = lambda name: [],
        restart: bool = False,
    ) -> None:
        self.topology_path = Path(topology_path).resolve()
        self.topology: Topology = load_topology(self.topology_path)
        local = [n.name for n in self.topology.nodes if n.host in LOCAL_HOSTS]
        if self.topology.http is not None:  # the HTTP gateway runs where it is launched
            local.append(HTTP_NODE)
        self.names = names if names is not None else local
        self.log_dir = log_dir or cache_root() / "logs" / time.strftime("%Y%m%d-%H%M%S")
        self.nodes: dict[str, NodeProcess] = {}
        self.wrap = wrap  # command prefix per node, e.g. `ip netns exec HOST` for emulated hosts
        self.policy = RestartPolicy.from_service(self.topology.service) if restart else NEVER_RESTART
        self._inbox: ReadyInbox | None = None
        self._lock = threading.Lock()  # check() runs from the caller or the supervisor thread
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        # Nodes on one machine share its cores: give each an equal number of compute threads.
        env = dict(os.environ, FLOWSPEC_THREADS=str(max(1, (os.cpu_count() or 1) // len(self.names))))
        for name in self.names:
            self.start_node(name, env)

    def start_node(self, name: str, env: dict[str, str]) -> None:
        if self._inbox is None:
            self._prepare()
        env = {**env, READY_ENV: self._inbox.address}
        log_path = self.log_dir / f"{name}.log"
        self.nodes[name] = NodeProcess(name, self._spawn(name, env, log_path, "w"), log_path, env)

    def _prepare(self) -> None:
        """Before the first node: fail in one line if no node could load the model, or if one of
        this machine's nodes names a device it lacks, not in every log (and not restart after restart)."""
        try:
            resolve_model_dir(self.topology.model.source)
        except ValueError as exc:
            raise TopologyError(f"{self.topology.path}: model.source: {exc}") from None
        for node in self.topology.nodes:
            if node.name in self.names:
                available_device(node.name, node.device)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._inbox = ReadyInbox()

    def _spawn(self, name: str, env: dict[str, str], log_path: Path, mode: str) -> subprocess.Popen:
        with open(log_path, mode) as log:
            return subprocess.Popen(
                self.wrap(name) + node_command(self.topology_path, name), stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )

    def check(self) -> list[str]:
        """Note which nodes announced readiness and restart the dead whose backoff has passed;
        returns the names restarted now. Raises NodeDied when the policy gives up on a node."""
        with self._lock:
            for message in self._inbox.receive():
                node = self.nodes.get(message.node)
                if node is not None and node.process.pid == message.pid:  # the current incarnation only
                    node.ready = True
            now = time.monotonic()
            restarted = []
            for node in self.nodes.values():
                if node.restart_at is None:
                    code = node.process.poll()
                    if code is None:
                        continue
                    self._died(node, code, now)
                if node.restart_at <= now:
                    node.restart_at = None
                    node.restarts += 1
                    node.process = self._spawn(node.name, node.env, node.log_path, "a")
                    restarted.append(node.name)
            return restarted

    def _died(self, node: NodeProcess, code: int, now: float) -> None:
        node.ready = False
        node.deaths = self.policy.recent([*node.deaths, now], now)
        delay = self.policy.delay(node.deaths, now)
        if delay is None:
            reason = f"exited with code {code}"
            if self.policy.limit:
                reason += (f", its death {len(node.deaths)} within {self.policy.window_s:g} s "
                           f"([service] restart_limit = {self.policy.limit})")
            raise NodeDied(node.name, reason, node.last_log_line(), node.log_path)
        node.restart_at = now + delay
        with open(node.log_path, "a") as log:
            log.write(f"\n--- exited with code {code}; restarting in {delay:g} s "
                      f"(death {len(node.deaths)} of at most {self.policy.limit} within {self.policy.window_s:g} s) ---\n")

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
                if self.nodes[name].ready:
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
        if self._inbox is not None:
            self._inbox.close()
            self._inbox = None

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
