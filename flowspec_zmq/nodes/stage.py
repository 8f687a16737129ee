"""Stage node program: load this node's layer window and serve it in the ring."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import uvloop

from flowspec_zmq.devices import available_device
from flowspec_zmq.liveness import announce_ready, send_heartbeats
from flowspec_zmq.layer_sizes import model_windows
from flowspec_zmq.model_slices import load_layer_window
from flowspec_zmq.protocol import DTYPES
from flowspec_zmq.stage_node import StageNode
from flowspec_zmq.trace import tracer_from_env
from flowspec_zmq.transport import RingLink, tcp

from .common import contexts, run_until_stopped, secure, setup

log = logging.getLogger("flowspec.stage")


async def serve(topology_path: Path, name: str) -> None:
    topology, node, model_dir = setup(topology_path, name)
    first, last = model_windows(topology, model_dir)[name]
    device = available_device(name, node.device)
    started = time.perf_counter()
    log.info("loading layers [%d, %d) of %s onto %s", first, last, model_dir.name, device)
    window = load_layer_window(model_dir, first, last, DTYPES[topology.dtype_of(node)], device=device)
    log.info("loaded %d layers in %.1f s", last - first, time.perf_counter() - started)
    context, plain = contexts()
    keys = secure(plain, topology, name)
    next_hop = topology.next_hop(name)
    link = RingLink(
        context, tcp(node.host, node.port), tcp(next_hop.host, next_hop.port), name, topology.link, keys, next_hop.name
    )
    stage = StageNode(name, window, link, is_last=next_hop.role == "head", max_context=topology.model.max_context,
                      tracer=tracer_from_env(name), profile=node.profile,
                      max_open_caches=topology.service.max_open_caches,
                      max_kv_bytes=topology.service.max_kv_mb << 20)
    log.info("ready: listening on %s, sending to %s", tcp(node.host, node.port), next_hop.name)
    announce_ready(plain, name)
    head = topology.head
    heartbeats = send_heartbeats(plain, tcp(head.host, head.control_port), name, stage.busy_for, keys, head.name)
    await run_until_stopped(asyncio.gather(stage.run(), heartbeats), context, log)


def main(topology_path: Path, name: str) -> None:
    uvloop.run(serve(topology_path, name))
