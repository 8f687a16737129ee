"""Figures of `flowspec bench`: a speedup chart and a pipeline timeline (matplotlib, PNG)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

MODE_COLORS = {"ar": "#9e9e9e", "tree": "#4c72b0", "specpipe": "#dd8452", "flowspec": "#55a868"}
KIND_COLORS = {"segment": "#4c72b0", "draft": "#8172b3", "logits": "#dd8452",
               "prune": "#c44e52", "release": "#da8bc3"}
# The head's draft worker runs beside its verify worker: draw them as two half-height bands.
HEAD_BANDS = {"draft": (-0.35, 0.34), "logits": (0.01, 0.34)}


def speedup_chart(configs: list[dict[str, Any]], modes: list[str], path: Path, title: str) -> Path:
    """Bars of tokens/s relative to `ar` (plain tokens/s when `ar` did not run), one group per
    configuration, one bar per mode."""
    key = "speedup" if "ar" in modes else "tokens_per_s"
    width = 0.8 / len(modes)
    fig_width = max(6.5, 1.6 * len(configs) + 3)
    fig, ax = plt.subplots(figsize=(fig_width, 4.4))
    for i, mode in enumerate(modes):
        xs = [c + (i - (len(modes) - 1) / 2) * width for c in range(len(configs))]
        ys = [config["modes"][mode][key] for config in configs]
        bars = ax.bar(xs, ys, width * 0.92, color=MODE_COLORS.get(mode), label=mode)
        for bar, config in zip(bars, configs):
            rate = config["modes"][mode]["tokens_per_s"]
            label = f"{bar.get_height():.2f}x\n{rate:.1f}/s" if key == "speedup" else f"{rate:.1f}/s"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    if key == "speedup":
        ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(configs)), [c["name"].replace(" / ", "\n") for c in configs])
    ax.set_ylabel("tokens/s relative to ar" if key == "speedup" else "tokens/s")
    ax.set_ylim(0, max(c["modes"][m][key] for c in configs for m in modes) * 1.25)
    ax.set_title(textwrap.fill(title, int(fig_width * 13)), fontsize=7.5)
    ax.legend(ncol=len(modes), fontsize=8, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def gantt(lanes: dict[str, list[dict[str, Any]]], nodes: list[str], seconds: float, path: Path, title: str) -> Path:
    """One panel per mode: a row per node, compute spans colored by kind, sends as thin ticks.

    `lanes` maps a mode to its spans, with times relative to the request's decode start."""
    fig, axes = plt.subplots(len(lanes), 1, figsize=(12, 0.42 * len(nodes) * len(lanes) + 1.4), sharex=True, squeeze=False)
    for ax, (mode, spans) in zip(axes[:, 0], lanes.items()):
        for row, node in enumerate(nodes):
            for kind, color in KIND_COLORS.items():
                bars = [(s["start"], s["end"] - s["start"]) for s in spans if s["node"] == node and s["what"] == kind]
                if bars:
                    offset, height = HEAD_BANDS.get(kind, (-0.35, 0.7)) if node == "head" else (-0.35, 0.7)
                    ax.broken_barh(bars, (row + offset, height), facecolors=color, edgecolors="white", linewidth=0.4)
            sends = [s["start"] for s in spans if s["node"] == node and s["what"] == "send"]
            ax.vlines(sends, row + 0.38, row + 0.5, colors="black", linewidth=0.7)
        ax.set_yticks(range(len(nodes)), nodes, fontsize=8)
        ax.set_ylim(len(nodes) - 0.5, -0.5)
        ax.set_ylabel(mode, rotation=0, ha="right", va="center", fontsize=10, fontweight="bold")
        ax.grid(axis="x", linewidth=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    axes[-1, 0].set_xlim(0, seconds)
    axes[-1, 0].set_xlabel("seconds since decoding started")
    handles = [Patch(color=c, label=k) for k, c in KIND_COLORS.items()]
    handles.append(Line2D([], [], color="black", linewidth=0.7, label="send"))
    fig.legend(handles=handles, ncol=len(handles), loc="upper center", fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.995))
    fig.suptitle(title, fontsize=10, y=0.955)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def clients_chart(configs: list[dict[str, Any]], modes: list[str], path: Path, title: str) -> Path:
    """Serving several clients at once: aggregate tokens/s (left) and time between tokens p90
    (right) against the number of concurrent clients, one line per mode and stage count."""
    fig, (rate, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[tuple[int, Any], list[dict[str, Any]]] = {}
    for config in configs:
        groups.setdefault((config["stages"], config["prompt_length"]), []).append(config)
    for (stages, length), group in groups.items():
        group.sort(key=lambda c: c.get("clients", 1))
        clients = [c.get("clients", 1) for c in group]
        suffix = f" ({stages} stages{f', {length} tok' if length else ''})" if len(groups) > 1 else ""
        for mode in modes:
            color = MODE_COLORS.get(mode)
            rate.plot(clients, [c["modes"][mode]["aggregate_tokens_per_s"] for c in group], "o-", color=color,
                      label=mode + suffix)
            latency.plot(clients, [c["modes"][mode]["tbt_p90_ms"] for c in group], "o-", color=color, label=mode + suffix)
    for ax, label in ((rate, "aggregate tokens/s"), (latency, "time between tokens p90 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c.get("clients", 1) for c in configs}), [str(n) for n in sorted({c.get("clients", 1) for c in configs})])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.spines[["top", "right"]].set_visible(False)
    rate.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 150), fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
