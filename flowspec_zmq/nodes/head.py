"""Head node program: tokenizer, embedding + lm_head, drafts, scheduler and the client endpoint."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import uvloop
from transformers import AutoTokenizer

from flowspec_zmq.devices import available_device
from flowspec_zmq.draft import make_draft_source
from flowspec_zmq.head_node import HeadNode
from flowspec_zmq.liveness import announce_ready
from flowspec_zmq.memory import return_free_memory
from flowspec_zmq.kv_budget import KVBudget
from flowspec_zmq.layer_sizes import model_windows
from flowspec_zmq.model_slices import load_config, load_head_model
from flowspec_zmq.protocol import DTYPES
from flowspec_zmq.transport import RingLink, tcp

from .common import contexts, run_until_stopped, secure, setup

log = logging.getLogger("flowspec.head")


async def serve(topology_path: Path, name: str) -> None:
    topology, node, model_dir = setup(topology_path, name)
    started = time.perf_counter()
    log.info("loading tokenizer and head weights of %s", model_dir.name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    head = load_head_model(model_dir, DTYPES[topology.dtype_of(node)], available_device(name, node.device))
    config = load_config(model_dir)
    defaults = topology.decoding
    # Load the default draft before any socket exists: the event loop must never stall while
    # peers are connecting (their handshakes and first messages would wait on it).
    drafts = {}
    if defaults.mode != "ar":
        drafts[defaults.draft, defaults.draft_vocab] = make_draft_source(defaults.draft, model_dir, head, defaults.draft_vocab)
    return_free_memory()  # what loading the draft layer by layer freed
    log.info("loaded in %.1f s", time.perf_counter() - started)
    context, plain = contexts()
    keys = secure(plain, topology, name)
    first = topology.next_hop(name)
    link = RingLink(context, tcp(node.host, node.port), tcp(first.host, first.port), name, topology.link, keys, first.name)
    head_node = HeadNode(
        name, model_dir, head, tokenizer, link, tcp(node.host, node.client_port),
        tcp(node.host, node.control_port), context, tuple(s.name for s in topology.stages), keys, defaults,
        topology.model.max_context, topology.decoding.prefill_chunk, drafts, topology.service,
        KVBudget.for_stages(config, model_windows(topology, model_dir), head.dtype.itemsize,
                            topology.service.max_kv_mb),
        topology=topology,
    )
    log.info("ready: clients on %s, ring to %s", tcp(node.host, node.client_port), first.name)
    announce_ready(plain, name)
    await run_until_stopped(head_node.run(), context, log)


def main(topology_path: Path, name: str) -> None:
    uvloop.run(serve(topology_path, name))
