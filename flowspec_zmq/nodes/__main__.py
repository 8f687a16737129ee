"""`python -m flowspec_zmq.nodes TOPOLOGY NAME`: run one node of a topology (what `flowspec launch` spawns)."""

from __future__ import annotations

import sys
from pathlib import Path

from flowspec_zmq.topology import HTTP_NODE, load_topology


def run_node(topology_path: Path, name: str) -> None:
    topology = load_topology(topology_path)
    if name == HTTP_NODE and topology.http is not None:
        from . import http as program
    elif topology.node(name).role == "head":
        from . import head as program
    else:
        from . import stage as program
    program.main(topology_path, name)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m flowspec_zmq.nodes TOPOLOGY NAME")
    try:
        run_node(Path(sys.argv[1]), sys.argv[2])
    except KeyboardInterrupt:
        pass
