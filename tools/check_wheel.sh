#!/usr/bin/env bash
# CI: the project as a user installs it. `pip install .` (a real wheel, not editable) into a fresh
# venv; then, from a directory outside the checkout: the packaged default topology, device profile
# and prompts load, `flowspec prepare` readies the test model (instant when ~/.cache has it) and
# `flowspec demo` answers one chat message on a two-stage SmolLM2 ring.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
started=$SECONDS

python3 -m venv "$work/venv"
# torch==2.13.0 (CPU) installs from the machine's local wheel; see pyproject.toml.
# pip's output only when it fails (this machine's index configuration warns on every lookup).
"$work/venv/bin/python" -m pip install "$repo" >"$work/pip.log" 2>&1 || { tail -n 40 "$work/pip.log" >&2; exit 1; }
echo "check_wheel: installed in $((SECONDS - started)) s"

cd "$work"
"$work/venv/bin/python" - <<'EOF'
import importlib.util
import sys
from pathlib import Path

import flowspec_zmq
from flowspec_zmq.bench import PROMPTS, load_prompts
from flowspec_zmq.edge_profiles import DEFAULT_PROFILE, load_edge_profile
from flowspec_zmq.topology import default_topology_path, load_topology, local_topology_toml

site = Path(sys.prefix)
for path in (Path(flowspec_zmq.__file__), default_topology_path(), DEFAULT_PROFILE, PROMPTS):
    assert path.is_relative_to(site), f"{path} is not inside the fresh venv {site}"
# Only flowspec_zmq is installed: no top-level `tools` or `nodes` package lands in site-packages.
assert importlib.util.find_spec("tools") is None and importlib.util.find_spec("nodes") is None
load_topology(default_topology_path())
load_edge_profile(DEFAULT_PROFILE)
load_prompts(PROMPTS)
Path("topology.toml").write_text(local_topology_toml("smollm2-135m", 2))
EOF

"$work/venv/bin/flowspec" prepare smollm2-135m
"$work/venv/bin/flowspec" demo --topology topology.toml --max-new-tokens 8 | tee demo.out
grep -Eq '^model> .*[[:alnum:]]' demo.out || { echo "check_wheel: the demo produced no answer" >&2; exit 1; }
echo "check_wheel: passed in $((SECONDS - started)) s"
