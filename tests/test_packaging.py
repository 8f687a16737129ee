"""What the wheel ships beside the code (tools/check_wheel.sh installs and runs the real wheel)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from flowspec_zmq.topology import default_topology_path

ROOT = Path(__file__).resolve().parents[1]


def test_the_packaged_default_topology_is_the_repos_topology_toml():
    # The package holds a link to the repo's file; a copy in its place could drift from it.
    assert (files("flowspec_zmq") / "topology.toml").read_bytes() == (ROOT / "topology.toml").read_bytes()
    assert default_topology_path() == ROOT / "topology.toml"
