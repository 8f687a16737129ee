"""What every node program does before its role-specific part: logging, threads, the topology."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from flowspec_zmq.models import resolve_model_dir
from flowspec_zmq.topology import NodeConfig, Topology, load_topology


def setup(topology_path: Path, name: str) -> tuple[Topology, NodeConfig, Path]:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    # Nodes sharing one machine split its cores; `flowspec launch` sets this for each of them.
    threads = os.environ.get("FLOWSPEC_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    topology = load_topology(topology_path)
    return topology, topology.node(name), resolve_model_dir(topology.model.source)
