"""Fuzz every socket every node listens on (ring inputs, the head's client and control sockets)
with thousands of malformed, oversized, mistyped, out-of-order and foreign frames; afterwards every
node is alive and the ring still produces the target's exact greedy output."""

from __future__ import annotations

import asyncio
import os

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowspec_zmq.client import Client
from flowspec_zmq.protocol import SCHEMA_VERSION, Prune, Release, Segment, encode

from .conftest import PROMPTS, client_address

HIDDEN = 576  # SmolLM2-135M
BATCH = 12
EXAMPLES = 100
SENT = {"count": 0}

ints = st.integers(-(2**40), 2**40)
small = st.integers(0, 3)
values = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True), st.text(max_size=8),
                   st.binary(max_size=8), st.lists(ints, max_size=4))


def raw(frames: list) -> list[bytes]:
    return [bytes(memoryview(f)) for f in frames]


@st.composite
def ring_frames(draw) -> list[bytes]:
    kind = draw(st.sampled_from(["bytes", "mutated", "segment", "prune", "release"]))
    if kind == "bytes":
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
    request = draw(st.sampled_from([1, 2, draw(st.integers(0, 2**40))]))
    rows = draw(st.integers(1, 4))
    width = draw(st.sampled_from([HIDDEN, HIDDEN, 7, 0]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    commit = draw(st.booleans())
    start = draw(st.sampled_from([0, 0, 3, 5000]))
    segment = Segment(request, draw(small), commit, tuple(range(rows)), tuple([-1] * rows),
                      tuple(range(start, start + rows)), torch.randn(rows, width).to(dtype))
    if kind == "segment":
        return raw(encode(segment))
    if kind == "prune":
        return raw(encode(Prune(request, draw(st.integers(0, 5)), tuple(draw(st.lists(small, max_size=3))),
                                tuple(draw(st.lists(small, max_size=3))))))
    if kind == "release":
        return raw(encode(Release(request)))
    frames = raw(encode(segment))
    header = msgpack.unpackb(frames[0])
    header[draw(st.sampled_from(sorted(header) + ["extra"]))] = draw(values)
    if draw(st.booleans()):
        header["v"] = draw(st.sampled_from([SCHEMA_VERSION + 1, 0, "1"]))
    tensor = frames[1][: draw(st.integers(0, len(frames[1])))] if draw(st.booleans()) else frames[1]
    return [msgpack.packb(header), tensor][: draw(st.integers(1, 3))]


client_payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda d: msgpack.packb(d), st.dictionaries(st.text(max_size=6), values, max_size=4)),
    # Well-formed requests with one bad field each: they must be answered with an error, not run.
    st.builds(lambda i, key, value: msgpack.packb({"v": SCHEMA_VERSION, "kind": "generate", "id": i, "prompt": "x",
                                                   "options": {key: value}}),
              ints, st.sampled_from(["mode", "max_new_tokens", "wobble", "top_p"]), st.sampled_from(["warp", -1, 0, 9.5])),
    st.builds(lambda i, kind, v: msgpack.packb({"v": v, "kind": kind, "id": i}), st.one_of(ints, st.text(max_size=3)),
              st.one_of(st.text(max_size=5), st.sampled_from(["cancel", "generate", "info"])),
              st.sampled_from([SCHEMA_VERSION, SCHEMA_VERSION + 1, "1"])),
)
heartbeats = st.one_of(
    st.binary(max_size=32),
    st.builds(lambda d: msgpack.packb(d), st.dictionaries(st.sampled_from(["node", "busy_s", "incarnation"]), values)),
)


@pytest.fixture(scope="module")
def ring(ring2):
    return ring2


@pytest.fixture(scope="module")
def sockets(ring):
    context = zmq.Context.instance()
    head, stages = ring.topology.head, ring.topology.stages
    made = {}
    for name, port, kind in [("stage1", stages[0].port, zmq.PUSH), ("stage2", stages[1].port, zmq.PUSH),
                             ("head-ring", head.port, zmq.PUSH), ("head-control", head.control_port, zmq.PUSH),
                             ("head-clients", head.client_port, zmq.DEALER)]:
        socket = context.socket(kind)
        socket.setsockopt(zmq.LINGER, 2000)
        socket.connect(f"tcp://{head.host if name.startswith('head') else stages[int(name[-1]) - 1].host}:{port}")
        made[name] = socket
    yield made
    for socket in made.values():
        socket.close()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(ring_batch=st.lists(ring_frames(), min_size=BATCH, max_size=BATCH),
       client_batch=st.lists(client_payloads, min_size=BATCH, max_size=BATCH),
       beat_batch=st.lists(heartbeats, min_size=BATCH, max_size=BATCH))
def test_fuzz_every_receive_path(sockets, ring_batch, client_batch, beat_batch):
    for frames in ring_batch:
        for target in ("stage1", "stage2", "head-ring"):
            sockets[target].send_multipart(frames)
            SENT["count"] += 1
    for payload in client_batch:
        sockets["head-clients"].send(payload)
    for payload in beat_batch:
        sockets["head-control"].send(payload)
    SENT["count"] += 2 * BATCH


def test_every_node_survived_and_still_decodes_exactly(ring, sockets, reference):
    assert SENT["count"] >= EXAMPLES * BATCH * 5
    ring.check()
    completion = asyncio.run(Client(client_address(ring)).complete(PROMPTS["code"], max_new_tokens=20, mode="flowspec"))
    assert completion.ids == reference(PROMPTS["code"], 20)
    ring.check()
    for name in ("stage1", "stage2"):
        assert "rejected a message" in ring.nodes[name].log_path.read_text()


def test_garbage_frames_do_not_kill_a_stage(ring, reference):
    stage = ring.topology.stages[1]
    log = ring.nodes[stage.name].log_path
    rejected_before = log.read_text().count("rejected a message")
    context = zmq.Context.instance()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"tcp://{stage.host}:{stage.port}")
    good = encode(Segment(1, 0, True, (0,), (-1,), (0,), torch.zeros(1, 576)))
    bad_messages = [
        [b"not msgpack at all \xff\xfe"],
        [msgpack.packb({"v": SCHEMA_VERSION + 1, "kind": "segment", "req": 1})],
        [msgpack.packb({"v": SCHEMA_VERSION, "kind": "launch_missiles", "req": 1})],
        [good[0], b"\x00" * 7],  # tensor frame of the wrong size
        [good[0]],  # tensor frame missing
        [msgpack.packb([1, 2, 3])],
        [os.urandom(64), os.urandom(64), os.urandom(64)],
        # Valid frames but nonsense for the model: wrong hidden width, then positions past the context.
        encode(Segment(99, 0, True, (0,), (-1,), (0,), torch.zeros(1, 7))),
        encode(Segment(98, 0, False, (5,), (3,), (10**6,), torch.zeros(1, 576))),
    ]
    for frames in bad_messages:
        push.send_multipart([bytes(memoryview(f)) for f in frames])
    push.close()
    ring.check()  # every node still alive
    completion = asyncio.run(Client(client_address(ring)).complete(PROMPTS["code"], mode="flowspec", max_new_tokens=20))
    assert completion.ids == reference(PROMPTS["code"], 20)
    assert log.read_text().count("rejected a message") >= rejected_before + 7
