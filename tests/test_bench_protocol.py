"""The protocol benchmark runs end to end (quick mode) and reports every variant and size."""

from __future__ import annotations

import json
from pathlib import Path

from flowspec_zmq import bench_protocol


def test_quick_run_reports_both_variants_for_every_size(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    assert bench_protocol.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(row["variant"], row["tokens"]): row for row in report["results"]}
    assert set(rows) == {(v, t) for v in bench_protocol.VARIANTS for t in bench_protocol.TOKENS}
    for row in rows.values():
        for key in ("payload_bytes", "wire_bytes", "rtt_median_us", "rtt_p90_us", "hop_median_us", "hop_p90_us",
                    "msgs_per_s", "mb_per_s"):
            assert row[key] > 0, (row["variant"], row["tokens"], key)
        assert row["rtt_p90_us"] >= row["rtt_median_us"]
    assert [r["tokens"] for r in report["overhead"]] == list(bench_protocol.TOKENS)
    for ratio in report["overhead"]:
        assert ratio["hop_latency_ratio"] > 0 and ratio["throughput_ratio"] > 0
