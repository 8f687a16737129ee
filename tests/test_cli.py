"""`flowspec generate`, `chat` and `status` as a user runs them: every option flag reaches a real
cluster and the streamed text is the target's, each answer ends with one line of statistics, status
shows every node; with no cluster they say so within seconds instead of waiting."""

from __future__ import annotations

import re
import subprocess
import sys

from flowspec_zmq.cli import stats_line
from flowspec_zmq.topology import free_ports

from .conftest import PROMPTS, client_address


STATS_LINE = r"\[N tokens · [\d.]+ tokens/s · [\d.]+ accepted per verification · first token after [\d.]+ s\]"


def flowspec(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowspec_zmq.cli", *args], capture_output=True, text=True,
                          timeout=120, input=input)


def test_generate_passes_every_option_and_streams_the_targets_text(ring2, reference, tokenizer):
    run = flowspec("generate", PROMPTS["code"], "--address", client_address(ring2), "--mode", "flowspec",
                   "--max-new-tokens", "12", "--draft", "int8", "--segment-size", "6", "--tree-depth", "4",
                   "--tree-top-k", "2", "--tree-width", "2", "--tree-total-tokens", "16", "--draft-vocab", "0",
                   "--temperature", "0", "--stats")
    assert run.returncode == 0, run.stderr
    assert tokenizer.decode(reference(PROMPTS["code"], 20)[:12], skip_special_tokens=True) in run.stdout
    assert re.fullmatch(STATS_LINE.replace("N", "12"), run.stderr.strip()), run.stderr


def test_chat_answers_each_turn_with_a_line_of_statistics(ring2):
    run = flowspec("chat", "--address", client_address(ring2), "--max-new-tokens", "6", input="Hi!\nAnd again?\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("model> ") == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2 and all(re.fullmatch(STATS_LINE.replace("N", r"\d+"), line) for line in lines), lines


def test_stats_line_reads_like_a_sentence():
    stats = {"tokens": 8, "tokens_per_s": 8.956, "accepted_per_verification": 2.6667, "prefill_s": 0.456,
             "decode_s": 0.78, "verifications": 3}
    assert stats_line(stats) == "8 tokens · 9.0 tokens/s · 2.67 accepted per verification · first token after 0.46 s"


def test_generate_with_nothing_listening_says_how_to_start_the_cluster():
    run = flowspec("generate", "hi", "--address", f"tcp://127.0.0.1:{free_ports(1)[0]}")
    assert run.returncode == 1
    assert run.stderr.startswith("flowspec: error: nothing answers at") and "flowspec launch" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_status_shows_every_nodes_place_health_memory_and_heartbeat(ring2):
    run = flowspec("status", "--topology", str(ring2.topology_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "smollm2-135m on 2 stages · healthy" in run.stdout
    rows = {cells[0]: cells for line in run.stdout.splitlines() if (cells := line.split())}
    head, stage1, stage2 = rows["head"], rows["stage1"], rows["stage2"]
    assert head[:6] == ["head", "head", "127.0.0.1", "embed,", "lm_head", "ok"] and head[7] == "MB"
    # SmolLM2's 30 layers split in two; each stage's memory came with its heartbeats.
    for cells, layers in ((stage1, ["0–14", "(15)"]), (stage2, ["15–29", "(15)"])):
        assert cells[2:6] == ["127.0.0.1", *layers, "ok"] and cells[7] == "MB" and cells[-2:] == ["s", "ago"], cells
        assert float(cells[6].replace(",", "")) > 100 and float(cells[8]) < 3


def test_status_with_no_head_says_so_in_one_line():
    run = flowspec("status", "--address", f"tcp://127.0.0.1:{free_ports(1)[0]}")
    assert run.returncode == 1
    assert run.stderr.startswith("flowspec: error: nothing answers at") and "flowspec launch" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not run.stdout
