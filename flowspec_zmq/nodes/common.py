"""What every node program does before its role-specific part: logging, threads, the topology."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Awaitable

import torch
import zmq.asyncio

from flowspec_zmq.models import resolve_model_dir
from flowspec_zmq.security import Keys, start_authenticator
from flowspec_zmq.topology import NodeConfig, Topology, load_topology


def setup(topology_path: Path, name: str) -> tuple[Topology, NodeConfig, Path]:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    # Nodes sharing one machine split its cores; `flowspec launch` sets this for each of them.
    threads = os.environ.get("FLOWSPEC_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    topology = load_topology(topology_path)
    return topology, topology.node(name), resolve_model_dir(topology.model.source)


def contexts() -> tuple[zmq.asyncio.Context, zmq.Context]:
    """The node's asyncio context and a plain twin over the same underlying context (for the
    threads and non-blocking sockets that must not depend on the event loop); keep both alive."""
    context = zmq.asyncio.Context()
    return context, zmq.Context.shadow(context.underlying)


def secure(plain: zmq.Context, topology: Topology, name: str) -> Keys | None:
    """With `[security] keys` set, start the key allow-list and return this node's key pair."""
    if topology.keys is None:
        return None
    start_authenticator(plain, topology.keys)
    return Keys(topology.keys, name)


async def run_until_stopped(work: Awaitable[object], context: zmq.asyncio.Context, log: logging.Logger) -> None:
    """Serve until stopped; an unexpected error is logged before the node goes down."""
    try:
        await work
    except Exception:
        log.exception("stopping after an unexpected error")
        raise
    finally:
        # destroy, not term: after a failure some sockets may still be open, and term would wait.
        context.destroy(linger=0)
