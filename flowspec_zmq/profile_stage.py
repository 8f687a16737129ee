"""`flowspec profile`: this machine's real time for one stage's forward pass, fitted per layer.

Loads a window of decoder layers exactly as a stage does (model_slices.load_layer_window), prefills
a short context into a TreeKVCache, then times forwards of 1, 2, 4, ... 32 tree rows on top of it
(the cache is cut back to the prefix after each one). A least-squares line through the medians
gives `fixed_ms + per_token_ms x rows` for the window; divided by its layers it is the per-layer
profile that flowspec_zmq/profiles/*.toml hold, so a profile can be calibrated on the real device:

    flowspec profile gemma3-270m --layers 5              # what one of 4 Gemma stages costs here
    flowspec profile gemma3-270m --layers 5 --head       # plus the head: logits and one int8 draft
    flowspec profile gemma3-270m --layers 5 --batching 1,2,4,8   # several requests in one forward
    flowspec profile gemma3-270m --layers 5 --device cuda:0      # on that device (clocks read after a sync)

`--head` also times the head's share of a step (lm_head over n rows, one draft tree), which is not
paced by the emulation and runs at this machine's speed. `--batching` compares, for R requests of
`--batch-rows` tree rows each: R forwards one after another, one packed forward (the stages' layout:
all rows through the projections and MLP at once, attention over each request's own cache through a
block-diagonal mask), and one forward of the same rows of a single request (no mask waste, no cache
concatenation: the bound on what per-request attention kernels could gain over the packed layout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from .draft import DraftLM, DraftStep, Frontier, TreeShape
from .devices import available_device, is_device_name, synchronize
from .model_slices import WindowPart, load_config, load_head_model, load_layer_window
from .models import resolve_model_dir
from .topology import DecodingConfig
from .tree import ROOT_PARENT

ROWS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Fit:
    fixed_ms: float
    per_token_ms: float

    def per_layer(self, layers: int) -> Fit:
        return Fit(self.fixed_ms / layers, self.per_token_ms / layers)


def fit_line(rows: list[int], times_ms: list[float]) -> Fit:
    """Least squares `times = fixed + per_token x rows`, both clamped at 0."""
    mean_x, mean_y = statistics.fmean(rows), statistics.fmean(times_ms)
    var = sum((x - mean_x) ** 2 for x in rows)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(rows, times_ms)) / var if var else 0.0
    slope = max(slope, 0.0)
    return Fit(max(mean_y - slope * mean_x, 0.0), slope)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2, device: torch.device = torch.device("cpu")) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)  # an accelerator returns before its kernels finish
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def profile_window(model_dir: Path, first: int, last: int, context: int, repeats: int,
                   device: torch.device = torch.device("cpu")) -> dict[int, float]:
    """Median ms of one forward of `rows` tree rows (a chain, like a draft path) after `context` tokens."""
    window = load_layer_window(model_dir, first, last, torch.float32, device=device)
    hidden = window.config.hidden_size
    cache = window.new_cache()
    positions = list(range(context))
    window(torch.randn(context, hidden), cache, True, positions, [ROOT_PARENT] * context, positions)
    result = {}
    for rows in ROWS:
        ids = list(range(rows))
        parents = [ROOT_PARENT, *range(rows - 1)]
        row_positions = list(range(context, context + rows))
        x = torch.randn(rows, hidden)

        def forward() -> None:
            window(x, cache, False, ids, parents, row_positions)
            cache.truncate(context)

        result[rows] = median_ms(forward, repeats, device=device)
    return result


def profile_head(model_dir: Path, context: int, repeats: int, shape: TreeShape, vocab: int,
                 device: torch.device = torch.device("cpu")) -> dict[str, float | int | str]:
    """The head's unpaced work: lm_head over n rows, and one draft step (expanding `width` frontier
    nodes) with a draft vocabulary of `vocab` tokens (0: all); int8 on the CPU, bf16 elsewhere."""
    head = load_head_model(model_dir, torch.float32, device)
    hidden = torch.randn(max(ROWS), head.embed_tokens.weight.shape[1])
    out: dict[str, float | int | str] = {
        f"logits_{rows}_ms": median_ms(lambda: head.logits(hidden[:rows]), repeats, device=device) for rows in (1, 16)
    }
    kind = "int8" if device.type == "cpu" else "bf16"  # dynamic quantization has CPU kernels only
    draft = DraftLM.load(model_dir, kind, head, vocab)
    tokens = list(range(1000, 1000 + context))
    draft.begin(0, tokens[:-1])  # the committed context is cached once, as during a request
    frontier = [Frontier(i, ROOT_PARENT, context - 1, (tokens[-1],)) for i in range(shape.width)]

    def step() -> None:
        draft.expand([DraftStep(0, frontier, shape.top_k)])
        draft.states[0].cache.prune((), ())

    out["draft_step_ms"] = median_ms(step, repeats, device=device)
    out.update({"draft": kind, "draft_width": shape.width, "draft_top_k": shape.top_k, "draft_vocab": vocab})
    return out


def profile_batching(model_dir: Path, first: int, last: int, context: int, requests: list[int], rows: int,
                     repeats: int, device: torch.device = torch.device("cpu")) -> list[dict[str, float]]:
    """Median ms per way of running `rows` tree rows of each of R requests (see the module's doc)."""
    window = load_layer_window(model_dir, first, last, torch.float32, device=device)
    hidden_size = window.config.hidden_size
    positions = list(range(context))

    def prefilled():
        cache = window.new_cache()
        window(torch.randn(context, hidden_size), cache, True, positions, [ROOT_PARENT] * context, positions)
        return cache

    caches = [prefilled() for _ in range(max(requests))]
    one_cache = prefilled()

    def part(cache, n: int) -> WindowPart:  # a chain of n rows, like a draft path
        return WindowPart(cache, False, list(range(n)), [ROOT_PARENT, *range(n - 1)], list(range(context, context + n)))

    out = []
    for r in requests:
        x = torch.randn(r * rows, hidden_size)

        def separate() -> None:
            for cache in caches[:r]:
                window.run(x[:rows], [window.plan(part(cache, rows))])
                cache.truncate(context)

        def packed() -> None:
            window.run(x, [window.plan(part(cache, rows)) for cache in caches[:r]])
            for cache in caches[:r]:
                cache.truncate(context)

        def single() -> None:
            window.run(x, [window.plan(part(one_cache, r * rows))])
            one_cache.truncate(context)

        out.append({"requests": r, "separate_ms": median_ms(separate, repeats, device=device),
                    "packed_ms": median_ms(packed, repeats, device=device),
                    "one_request_ms": median_ms(single, repeats, device=device)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowspec profile", description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="gemma3-270m", help="a prepared model name or directory")
    parser.add_argument("--layers", type=int, default=None, help="layers in the window (default: all)")
    parser.add_argument("--first", type=int, default=0, help="first layer of the window")
    parser.add_argument("--context", type=int, default=64, help="prefilled tokens before the timed rows")
    parser.add_argument("--repeats", type=int, default=15, help="timed forwards per row count")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps: the device a stage there computes on")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: this machine's cores / --share, as for a local ring)")
    parser.add_argument("--share", type=int, default=1, help="processes sharing the cores, as in a local ring of N nodes")
    parser.add_argument("--head", action="store_true",
                        help="also time the head's logits and one draft step (int8 on the CPU, bf16 on an accelerator)")
    parser.add_argument("--draft-step", default="4,4", help="frontier width,top_k of the draft step for --head")
    parser.add_argument("--draft-vocab", type=int, default=32768, help="draft vocabulary for --head (0: all)")
    parser.add_argument("--batching", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="also time R requests per forward for these R, e.g. 1,2,4,8")
    parser.add_argument("--batch-rows", type=int, default=12, help="tree rows per request for --batching")
    parser.add_argument("--out", type=Path, default=None, help="write the measurements as JSON")
    args = parser.parse_args(argv)
    if not is_device_name(args.device):
        parser.error(f"--device must be cpu, cuda, cuda:N or mps, got {args.device!r}")
    device = available_device("profile", args.device)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.share))
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)
    model_dir = resolve_model_dir(args.model)
    num_layers = load_config(model_dir).num_hidden_layers
    layers = args.layers or num_layers - args.first
    if not 0 <= args.first < args.first + layers <= num_layers:
        parser.error(f"layers [{args.first}, {args.first + layers}) are outside the model's {num_layers} layers")
    console.print(f"timing layers [{args.first}, {args.first + layers}) of {model_dir.name} on {args.device} "
                  f"with {torch.get_num_threads()} threads after {args.context} tokens ...")
    times = profile_window(model_dir, args.first, args.first + layers, args.context, args.repeats, device)
    fit = fit_line(list(times), list(times.values()))
    per_layer = fit.per_layer(layers)
    table = Table(title=f"{model_dir.name}: {layers} layers, forward over a tree segment")
    table.add_column("rows", justify="right")
    table.add_column("median ms", justify="right")
    table.add_column("fitted ms", justify="right")
    for rows, ms in times.items():
        table.add_row(str(rows), f"{ms:.2f}", f"{fit.fixed_ms + fit.per_token_ms * rows:.2f}")
    console.print(table)
    console.print(f"window:    fixed_ms = {fit.fixed_ms:.3f}, per_token_ms = {fit.per_token_ms:.4f}")
    console.print(f"per layer: fixed_ms = {per_layer.fixed_ms:.3f}, per_token_ms = {per_layer.per_token_ms:.4f}")
    # Only ratios of speeds matter to the split, so layers per second measured alike on every node serve as `speed`.
    rows = DecodingConfig.segment_size
    speed = 1000 / (per_layer.fixed_ms + per_layer.per_token_ms * rows)
    console.print(f"speed:     {speed:.1f} layers/s over a {rows}-row segment (this node's `speed` in topology.toml "
                  "when every stage's is measured so)")
    report = {"model": model_dir.name, "first": args.first, "layers": layers, "context": args.context,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "median_ms": times,
              "window": asdict(fit), "per_layer": asdict(per_layer), "speed_layers_per_s": speed}
    if args.head:
        width, top_k = (int(v) for v in args.draft_step.split(","))
        head = profile_head(model_dir, args.context, args.repeats, TreeShape(top_k=top_k, width=width), args.draft_vocab,
                            device)
        console.print("head: " + ", ".join(f"{k} = {v:.1f}" if isinstance(v, float) else f"{k} = {v}" for k, v in head.items()))
        report["head"] = head
    if args.batching:
        batching = profile_batching(model_dir, args.first, args.first + layers, args.context, args.batching,
                                    args.batch_rows, args.repeats, device)
        table = Table(title=f"{args.batch_rows} rows per request, {args.context} tokens of context each")
        for column in ("requests", "separate forwards ms", "one packed forward ms", "same rows, one request ms"):
            table.add_column(column, justify="right")
        for b in batching:
            table.add_row(str(b["requests"]), f"{b['separate_ms']:.1f}", f"{b['packed_ms']:.1f}", f"{b['one_request_ms']:.1f}")
        console.print(table)
        report["batching"] = batching
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
