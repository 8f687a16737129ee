#!/usr/bin/env bash
# Fresh machine to first tokens: install, prepare the models, run one generation on topology.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
.venv/bin/flowspec demo "$@"
