"""CurveZMQ: with keys set, the ring works as before, and peers without an allowed key can neither
inject messages into a node nor use the head."""

from __future__ import annotations

import asyncio

import pytest
import torch
import zmq
import zmq.auth

from flowspec_zmq.client import Client, GenerationFailed
from flowspec_zmq.launch import LocalCluster
from flowspec_zmq.protocol import Segment, encode
from flowspec_zmq.security import CLIENT, Keys, create_keys

from flowspec_zmq.topology import local_topology_toml

from .conftest import PROMPTS, TEST_MODEL, client_address


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secured")
    keys = folder / "keys"
    create_keys(keys, ["head", "stage1", "stage2"])
    path = folder / "topology.toml"
    path.write_text(local_topology_toml(TEST_MODEL, 2) + '\n[security]\nkeys = "keys"\n')
    with LocalCluster(path, log_dir=folder / "logs") as cluster:
        yield cluster, keys


def keyed_client(cluster, keys) -> Client:
    return Client(client_address(cluster), keys=Keys(keys, CLIENT))


def test_keyed_ring_decodes_exactly(secured, reference):
    cluster, keys = secured
    completion = asyncio.run(keyed_client(cluster, keys).complete(PROMPTS["code"], max_new_tokens=12, mode="flowspec"))
    assert completion.ids == reference(PROMPTS["code"], 20)[:12]


def test_peers_without_an_allowed_key_cannot_inject(secured, tmp_path, reference):
    cluster, keys = secured
    stage = cluster.topology.stages[0]
    payloads = [encode(Segment(1, 0, True, (0,), (-1,), (0,), torch.zeros(1, 576))), [b"garbage"]]
    context = zmq.Context.instance()
    # A stranger with its own valid CURVE key pair that is not on the allow-list, and a plain peer.
    zmq.auth.create_certificates(tmp_path, "stranger")
    stranger_public, stranger_secret = zmq.auth.load_certificate(tmp_path / "stranger.key_secret")
    for curve in (True, False):
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 500)
        if curve:
            push.curve_publickey, push.curve_secretkey = stranger_public, stranger_secret
            push.curve_serverkey = zmq.auth.load_certificate(keys / f"{stage.name}.key")[0]
        push.connect(f"tcp://{stage.host}:{stage.port}")
        for frames in payloads * 5:
            try:
                push.send_multipart([bytes(memoryview(f)) for f in frames], zmq.NOBLOCK)
            except zmq.Again:  # no handshake, no pipe: exactly what we want
                pass
        push.close()
    cluster.check()
    log = cluster.nodes[stage.name].log_path.read_text()
    assert "rejected a message" not in log and "request 1 " not in log  # nothing reached the node
    with pytest.raises(GenerationFailed, match="nothing answers at .* the client needs its key"):
        asyncio.run(Client(client_address(cluster), answer_timeout_s=3).complete(PROMPTS["code"], max_new_tokens=4))
    completion = asyncio.run(keyed_client(cluster, keys).complete(PROMPTS["code"], max_new_tokens=12, mode="flowspec"))
    assert completion.ids == reference(PROMPTS["code"], 20)[:12]
