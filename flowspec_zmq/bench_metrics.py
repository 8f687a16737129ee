"""What `flowspec bench` computes from its requests and the nodes' trace: pure functions, no I/O
beyond reading the trace folder.

A request's decode window is [start + prefill_s, start + prefill_s + decode_s] on the wall clock
(client and nodes share this machine's clock); every per-node figure is taken inside these windows,
so prefill and the gaps between requests do not count.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .emulation import DeviceProfile

HEAD_KINDS = ("draft", "logits")  # the draft and verify workers (embedding is inline in "send")


@dataclass
class RunRecord:
    """One measured request."""

    prompt: int  # index into the prompt set
    category: str
    mode: str
    prompt_tokens: int
    start: float  # time.time() when the request was sent
    end: float  # time.time() when its last event arrived
    ids: list[int] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    first_token: float = 0.0  # time.time() when its first token arrived (0: not recorded)

    @property
    def decode_tokens(self) -> int:
        return max(len(self.ids) - 1, 0)  # the first token comes out of the prefill

    @property
    def decode_window(self) -> tuple[float, float]:
        begin = self.start + self.stats.get("prefill_s", 0.0)
        return begin, begin + self.stats.get("decode_s", 0.0)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def mismatches(runs: Iterable[RunRecord], reference_mode: str = "ar") -> list[dict[str, Any]]:
    """Every (prompt, mode) whose tokens differ from the reference mode's (or the first mode's)."""
    by_prompt: dict[int, list[RunRecord]] = defaultdict(list)
    for run in runs:
        by_prompt[run.prompt].append(run)
    found = []
    for prompt, group in sorted(by_prompt.items()):
        reference = next((r for r in group if r.mode == reference_mode), group[0])
        for run in group:
            if run.ids != reference.ids:
                first = next((i for i, (a, b) in enumerate(zip(run.ids, reference.ids)) if a != b),
                             min(len(run.ids), len(reference.ids)))
                found.append({"prompt": prompt, "category": run.category, "mode": run.mode,
                              "reference": reference.mode, "first_difference": first,
                              "tokens": len(run.ids), "reference_tokens": len(reference.ids)})
    return found


def summarise(runs: list[RunRecord]) -> dict[str, float]:
    """Speed and efficiency of one mode over its requests (decode phase only)."""
    tokens = sum(r.decode_tokens for r in runs)
    decode_s = sum(r.stats["decode_s"] for r in runs)
    gaps = [b - a for r in runs for a, b in zip(r.stats["token_times"], r.stats["token_times"][1:])]
    verifications = sum(r.stats["verifications"] for r in runs)
    decode_rows = decode_bytes = 0.0
    for r in runs:
        rows = r.stats["rows_sent"]
        decode_rows += rows - r.prompt_tokens
        decode_bytes += r.stats["bytes_sent"] * (rows - r.prompt_tokens) / rows if rows else 0.0
    # Serving figures: every token of every request over the wall time while any of them was being
    # served (one at a time or concurrently), and the clients' waits.
    span = _covered([(r.start, r.end) for r in runs])
    ttft = [r.first_token - r.start for r in runs if r.first_token]
    return {
        "requests": len(runs),
        "decode_tokens": tokens,
        "decode_s": decode_s,
        "tokens_per_s": tokens / decode_s if decode_s > 0 else 0.0,
        "aggregate_tokens_per_s": sum(len(r.ids) for r in runs) / span if span > 0 else 0.0,
        "tbt_mean_ms": 1000 * decode_s / tokens if tokens else 0.0,
        "tbt_p50_ms": 1000 * percentile(gaps, 50),
        "tbt_p90_ms": 1000 * percentile(gaps, 90),
        "ttft_p50_ms": 1000 * percentile(ttft, 50),
        "ttft_p90_ms": 1000 * percentile(ttft, 90),
        "accepted_per_verification": tokens / verifications if verifications else 0.0,
        "rows_per_token": decode_rows / tokens if tokens else 0.0,
        "bytes_per_token": decode_bytes / tokens if tokens else 0.0,
        "prefill_ms": 1000 * sum(r.stats["prefill_s"] for r in runs) / len(runs) if runs else 0.0,
    }


def load_spans(folder: Path) -> list[dict[str, Any]]:
    spans = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                spans.append(json.loads(line))
    return spans


def _overlap(span: dict[str, Any], window: tuple[float, float]) -> float:
    return max(0.0, min(span["end"], window[1]) - max(span["start"], window[0]))


def _inside(span: dict[str, Any], windows: list[tuple[float, float]]) -> bool:
    return any(w[0] <= span["start"] < w[1] for w in windows)


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals as disjoint intervals, in order."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals."""
    return sum(b - a for a, b in _merged(intervals))


def node_times(spans: list[dict[str, Any]], runs: list[RunRecord], stages: list[str]) -> dict[str, Any]:
    """Per mode of `runs`: stage utilisation (segment compute + pacing / decode wall time), the
    head's busy time per verification split by kind, how much of the time any stage computes, and
    how much the head computes while every stage waits (its serial share)."""
    windows = _merged([r.decode_window for r in runs])  # concurrent requests' windows overlap
    wall = sum(b - a for a, b in windows)
    busy: dict[tuple[str, str], float] = defaultdict(float)
    ring_time = head_alone = head_busy = 0.0
    for window in windows:
        ring, head = [], []
        for span in spans:
            overlap = _overlap(span, window)
            if overlap <= 0:
                continue
            busy[span["node"], span["what"]] += overlap
            clipped = (max(span["start"], window[0]), min(span["end"], window[1]))
            if span["node"] in stages and span["what"] == "segment":
                ring.append(clipped)
            elif span["node"] == "head" and span["what"] in HEAD_KINDS:
                head.append(clipped)
        covered = _covered(ring)
        ring_time += covered
        head_busy += _covered(head)  # the two workers overlap: count the time either one works
        head_alone += _covered(ring + head) - covered
    verifications = sum(r.stats["verifications"] for r in runs) or 1
    head = {kind: 1000 * busy["head", kind] / verifications for kind in HEAD_KINDS}
    return {
        "utilisation": {s: busy[s, "segment"] / wall if wall else 0.0 for s in stages},
        "head_ms_per_verification": head,
        "head_busy": head_busy / wall if wall else 0.0,
        "ring_busy": ring_time / wall if wall else 0.0,  # some stage computing
        "head_alone": head_alone / wall if wall else 0.0,  # the head computing, every stage idle
    }


def pace_overruns(spans: list[dict[str, Any]], runs: list[RunRecord], profiles: dict[str, DeviceProfile],
                  slack_ms: float = 3.0) -> dict[str, Any]:
    """Decode segments that took longer than their profile (real compute did not fit under it)."""
    windows = [r.decode_window for r in runs]
    total = over = 0
    worst = 0.0
    for span in spans:
        profile = profiles.get(span["node"])
        if profile is None or span["what"] != "segment" or not span["rows"] or not _inside(span, windows):
            continue
        excess = 1000 * (span["end"] - span["start"] - profile.compute_s(span["rows"]))
        total += 1
        if excess > slack_ms:
            over += 1
            worst = max(worst, excess)
    return {"segments": total, "overrun": over, "fraction": over / total if total else 0.0, "worst_ms": worst}


def timeline(spans: list[dict[str, Any]], run: RunRecord, seconds: float) -> list[dict[str, Any]]:
    """Spans of the first `seconds` of one request's decode, times relative to its decode start."""
    begin, end = run.decode_window
    window = (begin, min(end, begin + seconds))
    return [{**s, "start": max(s["start"], window[0]) - begin, "end": min(s["end"], window[1]) - begin}
            for s in spans if s["end"] > window[0] and s["start"] < window[1]]
