"""`flowspec generate` as a user runs it: every option flag reaches a real cluster and the streamed
text is the target's; with no cluster it says so within seconds instead of waiting."""

from __future__ import annotations

import subprocess
import sys

from flowspec_zmq.topology import free_ports

from .conftest import PROMPTS, client_address


def flowspec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowspec_zmq.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_generate_passes_every_option_and_streams_the_targets_text(ring2, reference, tokenizer):
    run = flowspec("generate", PROMPTS["code"], "--address", client_address(ring2), "--mode", "flowspec",
                   "--max-new-tokens", "12", "--draft", "int8", "--segment-size", "6", "--tree-depth", "4",
                   "--tree-top-k", "2", "--tree-width", "2", "--tree-total-tokens", "16", "--draft-vocab", "0",
                   "--temperature", "0", "--stats")
    assert run.returncode == 0, run.stderr
    assert tokenizer.decode(reference(PROMPTS["code"], 20)[:12], skip_special_tokens=True) in run.stdout


def test_generate_with_nothing_listening_says_how_to_start_the_cluster():
    run = flowspec("generate", "hi", "--address", f"tcp://127.0.0.1:{free_ports(1)[0]}")
    assert run.returncode == 1
    assert run.stderr.startswith("flowspec: error: nothing answers at") and "flowspec launch" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
