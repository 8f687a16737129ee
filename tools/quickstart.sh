#!/usr/bin/env bash
# Fresh machine to first tokens: install, prepare the test and benchmark models, then `flowspec demo`
# prepares topology.toml's chat model (the first time) and answers one chat message on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
.venv/bin/flowspec demo "$@"
