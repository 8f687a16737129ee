"""The ring across emulated hosts: each node in its own network namespace, real TCP over veth
links shaped to 150 Mbit/s, the client on the head's host."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flowspec_zmq.launch import LocalCluster
from flowspec_zmq.topology import local_topology_toml
from flowspec_zmq import netns

from .conftest import PROMPTS, TEST_MODEL

CLIENT = """
import asyncio, json, sys
from flowspec_zmq.client import Client
completion = asyncio.run(Client(sys.argv[1]).complete(sys.argv[2], mode=sys.argv[3], max_new_tokens=16))
print(json.dumps(completion.ids))
"""


@pytest.fixture
def hosts():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    try:
        addresses = netns.up(3)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"`ip netns` is unavailable here: {exc}")
    yield addresses
    netns.down()


def test_ring_over_tcp_between_namespaces(hosts, tmp_path, reference):
    path = tmp_path / "topology.toml"
    path.write_text(local_topology_toml(TEST_MODEL, 2, hosts=hosts))
    names = ["head", "stage1", "stage2"]
    cluster = LocalCluster(
        path, names=names, log_dir=tmp_path / "logs",
        wrap=lambda name: ["ip", "netns", "exec", netns.host_name(names.index(name))],
    )
    with cluster:
        head = cluster.topology.head
        for mode in ("ar", "flowspec"):
            out = subprocess.run(
                ["ip", "netns", "exec", netns.host_name(0), sys.executable, "-c", CLIENT,
                 f"tcp://{head.host}:{head.client_port}", PROMPTS["code"], mode],
                capture_output=True, text=True, timeout=300, check=True,
            )
            assert json.loads(out.stdout.strip().splitlines()[-1]) == reference(PROMPTS["code"], 20)[:16]
