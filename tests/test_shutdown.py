"""`flowspec launch` stops every node on SIGTERM or Ctrl-C: no orphan processes, ports released. A
configuration mistake stops it at once with one line of error, no traceback unless --debug."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from flowspec_zmq.topology import load_topology, local_topology_toml

from .conftest import TEST_MODEL


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        # As zmq does: connections lingering in TIME_WAIT do not keep a port from being reused.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_launch_stops_all_nodes(tmp_path, stop_signal):
    path = tmp_path / "topology.toml"
    path.write_text(local_topology_toml(TEST_MODEL, 2))
    topology = load_topology(path)
    launcher = subprocess.Popen([sys.executable, "-m", "flowspec_zmq.cli", "launch", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in launcher.stdout:
        lines.append(line)
        if "all nodes ready" in line:
            break
    assert any("all nodes ready" in line for line in lines), "".join(lines)
    nodes = subprocess.run(["pgrep", "-f", f"nodes {path}"], capture_output=True, text=True).stdout.split()
    assert len(nodes) == 3
    launcher.send_signal(stop_signal)
    assert launcher.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-f", f"nodes {path}"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "node processes outlived the launcher"
        time.sleep(0.1)
    ports = [topology.head.port, topology.head.client_port, topology.head.control_port, *(s.port for s in topology.stages)]
    assert all(port_is_free(port) for port in ports)


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "--debug"])
def test_configuration_mistake_is_one_line(tmp_path, debug):
    path = tmp_path / "topology.toml"
    path.write_text(local_topology_toml(TEST_MODEL, 1, service={"restart_limit": -1}))
    launch = [sys.executable, "-m", "flowspec_zmq.cli", *(["--debug"] if debug else []), "launch", str(path)]
    run = subprocess.run(launch, capture_output=True, text=True, timeout=120)
    if debug:
        assert run.returncode != 0
        assert "Traceback" in run.stderr and run.stderr.rstrip().splitlines()[-1].startswith("flowspec_zmq.topology.TopologyError")
    else:
        assert run.returncode == 2
        assert len(run.stderr.splitlines()) == 1 and "Traceback" not in run.stderr
        assert run.stderr.startswith(f"flowspec: error: {path}: service.restart_limit: must be positive")
