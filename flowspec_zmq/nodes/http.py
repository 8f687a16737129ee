"""The HTTP gateway as a node of `flowspec launch` (the pseudo-node `http`, there when the topology
has an [http] table): the OpenAI-compatible API in front of the head."""

from __future__ import annotations

import logging
from pathlib import Path

import uvloop
import zmq

from flowspec_zmq.http_gateway import serve
from flowspec_zmq.liveness import announce_ready
from flowspec_zmq.topology import load_topology


def main(topology_path: Path, name: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    # Ready once it listens: it is a client of the head, and /health tells when the head serves.
    uvloop.run(serve(load_topology(topology_path), on_listening=lambda: announce_ready(zmq.Context.instance(), name)))
