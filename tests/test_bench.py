"""`flowspec bench`: its pure parts, and a smoke run (2 prompts, 8 tokens, 2 paced stages, every mode)
that checks the modes agree and the report has every field. Speed figures are never asserted."""

from __future__ import annotations

import importlib.util
import json

import pytest

from flowspec_zmq.emulation import DeviceProfile, LinkProfile
from flowspec_zmq.bench import (PROMPTS, BenchError, Prompt, configurations, fit_length, load_prompts, main,
                                parse_args, pick, stage_layers, stage_profiles)
from flowspec_zmq.bench_metrics import RunRecord, mismatches, node_times, pace_overruns, percentile, summarise
from flowspec_zmq.edge_profiles import DEFAULT_PROFILE, ProfileError, load_edge_profile

from .conftest import TEST_MODEL


def record(prompt: int, mode: str, ids: list[int], **stats) -> RunRecord:
    base = {"prefill_s": 1.0, "decode_s": 2.0, "token_times": [0.0, 1.0, 2.0], "verifications": 2,
            "rows_sent": 14, "bytes_sent": 1400}
    return RunRecord(prompt, "code", mode, 10, 100.0, 103.5, ids, base | stats)


def test_shipped_prompts_cover_the_four_categories_twice():
    prompts = load_prompts(PROMPTS)
    counts = {c: sum(p.category == c for p in prompts) for c in ("chat", "code", "math", "summarisation")}
    assert all(n >= 2 for n in counts.values()), counts


def test_bad_prompt_files_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"category": "chat", "prompt": "hi"}\n{"category": "chat"}\n')
    with pytest.raises(BenchError, match=r"p\.jsonl:2"):
        load_prompts(path)


def test_pick_takes_categories_in_turn():
    prompts = [Prompt("a", "1"), Prompt("a", "2"), Prompt("b", "3"), Prompt("c", "4")]
    assert [p.text for p in pick(prompts, 3)] == ["1", "3", "4"]
    assert [p.text for p in pick(prompts, None)] == ["1", "3", "4", "2"]


def test_fit_length_keeps_the_leading_tokens_and_the_prompt_end():
    lead, filler = [2], [7, 8, 9]
    assert fit_length([2, 1, 2, 3], 8, lead, filler) == [2, 9, 7, 8, 9, 1, 2, 3]
    assert fit_length([2, 1, 2, 3, 4, 5], 3, lead, filler) == [2, 4, 5]
    assert fit_length([1, 2, 3], 2, [], filler) == [2, 3]


def test_mismatches_name_the_mode_and_the_first_differing_token():
    runs = [record(0, "ar", [1, 2, 3]), record(0, "tree", [1, 2, 3]), record(0, "flowspec", [1, 5, 3]),
            record(1, "ar", [4]), record(1, "tree", [4, 4])]
    found = mismatches(runs)
    assert [(m["prompt"], m["mode"], m["first_difference"]) for m in found] == [(0, "flowspec", 1), (1, "tree", 1)]


def test_summary_counts_decode_tokens_and_decode_bytes_only():
    figures = summarise([record(0, "flowspec", [1, 2, 3])])
    assert figures["decode_tokens"] == 2 and figures["tokens_per_s"] == 1.0
    assert figures["accepted_per_verification"] == 1.0
    assert figures["rows_per_token"] == 2.0  # 14 rows sent, 10 of them the prompt
    assert figures["bytes_per_token"] == 200.0
    assert figures["tbt_mean_ms"] == 1000.0 and figures["tbt_p90_ms"] == 1000.0
    assert percentile([5, 1, 4, 2, 3], 90) == 5 and percentile([], 90) == 0.0


def test_node_times_and_overruns_come_from_the_decode_window():
    run = record(0, "flowspec", [1, 2, 3])  # decode window: [101, 103]
    spans = [
        {"node": "stage1", "what": "segment", "rows": 4, "start": 101.0, "end": 101.5},
        {"node": "stage1", "what": "segment", "rows": 4, "start": 100.2, "end": 100.8},  # prefill: not counted
        {"node": "head", "what": "draft", "rows": 0, "start": 102.5, "end": 103.5},  # half inside
    ]
    times = node_times(spans, [run], ["stage1"])
    assert times["utilisation"] == {"stage1": 0.25}
    assert times["head_ms_per_verification"]["draft"] == 250.0
    assert times["ring_busy"] == 0.25 and times["head_alone"] == 0.25  # the draft's half inside the window
    over = pace_overruns(spans, [run], {"stage1": DeviceProfile(100.0, 10.0)})
    assert (over["segments"], over["overrun"]) == (1, 1) and over["worst_ms"] == pytest.approx(360.0)


def test_edge_profile_scales_with_each_stage_share_of_layers(tmp_path):
    edge = load_edge_profile(DEFAULT_PROFILE)
    assert edge.link == LinkProfile(150.0, 3.0)
    quarter = edge.stage(9, 36)
    assert quarter.fixed_ms == pytest.approx(8 * edge.fixed_ms_per_layer)
    assert quarter.per_token_ms == pytest.approx(8 * edge.per_token_ms_per_layer)
    bad = tmp_path / "bad.toml"
    bad.write_text("[device]\nmodel_layers = 32\nfixed_ms_per_layer = -1\nper_token_ms_per_layer = 0.1\n")
    with pytest.raises(ProfileError, match="device.fixed_ms_per_layer"):
        load_edge_profile(bad)


def test_a_slow_stage_testbed_paces_each_stage_to_its_layers_and_speed():
    edge = load_edge_profile(DEFAULT_PROFILE)
    args = parse_args(["--slow-stages", "2", "--splits", "even,balanced"])
    even, balanced = configurations(args)
    assert (even.name, balanced.name) == ("4 stages / stage2 2x slower / even split",
                                          "4 stages / stage2 2x slower / balanced split")
    for config, layers in ((even, [5, 5, 4, 4]), (balanced, [6, 2, 5, 5])):
        assert (config.slow_stages, stage_layers("gemma3-270m", config, 18)) == ((2,), layers)
        profiles = stage_profiles(edge, config, layers, 18)
        assert profiles[0] == edge.stage(layers[0], 18)
        assert profiles[1].fixed_ms == pytest.approx(edge.stage(2 * layers[1], 18).fixed_ms)  # each layer takes twice as long
        assert profiles[1].per_token_ms == pytest.approx(edge.stage(2 * layers[1], 18).per_token_ms)
    slowest = [max(p.fixed_ms for p in stage_profiles(edge, c, stage_layers("gemma3-270m", c, 18), 18)) for c in (even, balanced)]
    assert slowest[1] < 0.7 * slowest[0]  # 6 layer times against 10
    for bad in (["--slow-stages", "5"], ["--slow-stages", "2", "--profile", "none"], ["--splits", "fair"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_smoke_run_every_mode_agrees_and_reports_every_field(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"category": "code", "prompt": "def add(a, b):\\n"}\n'
                       '{"category": "chat", "prompt": "The capital of France is"}\n')
    profile = tmp_path / "tiny.toml"
    profile.write_text("[device]\nmodel_layers = 30\nfixed_ms_per_layer = 1.0\nper_token_ms_per_layer = 0.02\n"
                       "[link]\nbandwidth_mbps = 150\ndelay_ms = 1\n")
    out = tmp_path / "out"
    code = main(["--model", TEST_MODEL, "--stages", "2", "--prompts", str(prompts), "--max-new-tokens", "8",
                 "--warmup-tokens", "2", "--profile", str(profile), "--gantt-seconds", "0.5", "--clients", "2",
                 "--out", str(out)])
    report = json.loads((out / "bench.json").read_text())
    assert code == 0 and report["agree"] and report["error"] is None
    alone, together = report["configs"]  # one at a time (the baseline), then two clients at once
    assert (alone["clients"], together["clients"]) == (1, 2)
    for config in (alone, together):
        assert config["mismatches"] == [] and len(config["runs"]) == 8
        assert set(config["modes"]) == {"ar", "tree", "specpipe", "flowspec"}
        for figures in config["modes"].values():
            for key in ("tokens_per_s", "speedup", "tbt_mean_ms", "tbt_p90_ms", "accepted_per_verification",
                        "bytes_per_token", "rows_per_token", "vs_tree", "utilisation", "head_ms_per_verification",
                        "head_busy", "ring_busy", "head_alone", "aggregate_tokens_per_s", "tbt_p50_ms", "ttft_p90_ms",
                        "aggregate_vs_ar"):
                assert key in figures, key
            assert set(figures["utilisation"]) == {"stage1", "stage2"}
            assert figures["ttft_p50_ms"] > 0
        assert config["modes"]["ar"]["speedup"] == 1.0
        assert len(config["stage_profiles"]) == 2 and config["pace_overruns"]["segments"] > 0
        assert config["layers"] == [15, 15] and config["split"] == "even"
    assert all(m["vs_one_at_a_time"] == 1.0 for m in alone["modes"].values())
    assert all(m["vs_one_at_a_time"] > 0 for m in together["modes"].values())
    # The two clients really overlapped: some request started before another one ended.
    runs = sorted(together["runs"], key=lambda r: r["start"])
    assert any(b["start"] < a["end"] for a, b in zip(runs, runs[1:]) if a["mode"] == b["mode"])
    assert (out / "summary.md").read_text().count("\n|") >= 2 * 8 + 4
    if importlib.util.find_spec("matplotlib"):
        assert {p.rsplit("/", 1)[-1] for p in report["plots"]} == {
            "speedup.png", "clients.png", "timeline_2stages_1clients.png", "timeline_2stages_2clients.png"}
