#!/usr/bin/env bash
# CI: the project as a user installs it. `pip install .` (a real wheel, not editable) into a fresh
# venv; then, from a directory outside the checkout: the packaged default topology, device profile
# and prompts load, `flowspec prepare` readies the test model (instant when ~/.cache has it),
# `flowspec prepare PATH --name NAME` converts that model's directory into a fresh cache, and
# `flowspec demo` answers one chat message on a two-stage ring of NAME.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
started=$SECONDS

# Built from a copy of the files git would commit: a build inside the checkout would leave build/
# there, whose stale modules a later wheel could pick up.
# Files deleted but not committed yet are skipped (--ignore-failed-read).
mkdir "$work/src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
    tar --null --files-from=- --ignore-failed-read -cf -) | tar -xf - -C "$work/src"
python3 -m venv "$work/venv"
# torch==2.13.0 (CPU) installs from the machine's local wheel; see pyproject.toml.
# pip's output only when it fails (this machine's index configuration warns on every lookup).
"$work/venv/bin/python" -m pip install "$work/src" >"$work/pip.log" 2>&1 || { tail -n 40 "$work/pip.log" >&2; exit 1; }
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
Path("topology.toml").write_text(local_topology_toml("smollm2-local", 2))
EOF

"$work/venv/bin/flowspec" prepare smollm2-135m
smollm2="$("$work/venv/bin/python" -c 'from flowspec_zmq.models import model_dir; print(model_dir("smollm2-135m"))')"
export FLOWSPEC_CACHE="$work/cache"
"$work/venv/bin/flowspec" prepare "$smollm2" --name smollm2-local
"$work/venv/bin/flowspec" demo --topology topology.toml --max-new-tokens 8 | tee demo.out
grep -Eq '^model> .*[[:alnum:]]' demo.out || { echo "check_wheel: the demo produced no answer" >&2; exit 1; }
echo "check_wheel: passed in $((SECONDS - started)) s"
