"""`flowspec bench`: the decoding modes side by side on one local ring, on the same prompts.

For each configuration (stage count, prompt length) one cluster is started with every node tracing
its compute and sends (FLOWSPEC_TRACE). After one warm-up request per mode, each prompt is run in
every mode in turn (interleaved, the starting mode rotating), greedy. All modes must produce the same
tokens: a mismatch fails the benchmark. Reported per mode: decode tokens/s and the ratio to `ar`,
time between tokens (mean, p90), accepted tokens per verification, draft rows sent per token,
bytes the head sends per token, stage utilisation (segment compute + pacing / decode wall time) and
the head's busy time per verification.

Edge emulation (default): every stage is paced to a device profile (flowspec_zmq/profiles/*.toml, a per
layer cost of an emulated bigger model, scaled by the stage's share of layers) and every hop is
shaped to the profile's link, so the figures do not depend on the node processes contending for
this machine's cores. `--profile none` runs unpaced at this machine's real speed.

    flowspec bench                                   # 8 prompts x 48 tokens, 4 stages, edge profile
    flowspec bench --stages 2,4,6,8 --prompts-per-config 4 --max-new-tokens 32
    flowspec bench --prompt-lengths 64,256,512 --prompts-per-config 4
    flowspec bench --profile none                    # real, unpaced
    flowspec bench --clients 1,2,4,8                 # concurrent clients sharing the ring (batching)
    flowspec bench --slow-stages 2 --splits even,balanced   # stage 2 twice as slow: even vs balanced split

With `--clients N` (N > 1) N clients send the same prompts at once, each taking the next prompt when
its last one is answered: the aggregate tokens/s, time between tokens and time to first token are
set beside the same configuration's one-at-a-time run (`--clients 1`, also measured).

With `--slow-stages 2` stage 2 emulates a device twice as slow (its profile times doubled). An
`even` split gives it as many layers as the others (today's auto split, no hints); a `balanced` one
writes `speed = 0.5` for it into the generated topology, so the auto split gives it fewer layers.

Writes OUT/bench.json, OUT/summary.md, OUT/speedup.png and OUT/timeline_<config>.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import torch
import uvloop
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import AutoTokenizer

from .bench_metrics import RunRecord, load_spans, mismatches, node_times, pace_overruns, summarise, timeline
from .client import Client, GenerationFailed
from .edge_profiles import DEFAULT_PROFILE, EdgeProfile, ProfileError, load_edge_profile
from .emulation import DeviceProfile, LinkProfile
from .launch import LocalCluster, NodeDied
from .memory import resident_mb
from .model_slices import load_config
from .models import resolve_model_dir
from .strategies import MODES
from .topology import local_topology_toml, parse_topology

PROMPTS = Path(str(files(__package__) / "prompts.jsonl"))
Split = Literal["even", "balanced"]
SPLITS: tuple[str, ...] = get_args(Split)
SLOWDOWN = 2.0  # a --slow-stages stage takes this many times as long per layer
TREE_FLAGS = ("segment_size", "tree_depth", "tree_top_k", "tree_total_tokens", "tree_width", "draft_vocab",
              "prefill_chunk")


class BenchError(RuntimeError):
    """The benchmark could not run as asked."""


@dataclass(frozen=True)
class Prompt:
    category: str
    text: str


@dataclass(frozen=True)
class Config:
    name: str
    stages: int
    prompt_length: int | None  # None: the prompts as written
    clients: int = 1  # requests in flight at once
    slow_stages: tuple[int, ...] = ()  # 1-based stages emulating a device SLOWDOWN times as slow
    split: Split = "even"  # balanced: the generated topology declares the slow stages' speed


@dataclass(frozen=True)
class Settings:
    model: str
    draft: str
    modes: tuple[str, ...]
    max_new_tokens: int
    warmup_tokens: int
    profile: str | None
    link: LinkProfile | None
    decoding: dict[str, int]
    head_threads: int | None
    stage_threads: int | None
    gantt_prompt: int
    gantt_seconds: float


# --- prompts ------------------------------------------------------------------------------------

def load_prompts(path: Path) -> list[Prompt]:
    """JSONL, one {"category": ..., "prompt": ...} per line."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"]:
            raise BenchError(f'{path}:{number}: need {{"category": str, "prompt": non-empty str}}')
        prompts.append(Prompt(str(entry.get("category", "other")), entry["prompt"]))
    if not prompts:
        raise BenchError(f"{path}: no prompts")
    return prompts


def pick(prompts: list[Prompt], count: int | None) -> list[Prompt]:
    """The first `count` prompts taking the categories in turn, so a short run still mixes them."""
    queues: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        queues.setdefault(prompt.category, []).append(prompt)
    mixed = [q[i] for i in range(max(map(len, queues.values()))) for q in queues.values() if i < len(q)]
    return mixed[:count] if count else mixed


def fit_length(ids: list[int], length: int, lead: list[int], filler: list[int]) -> list[int]:
    """`ids` made exactly `length` tokens long, keeping the tokenizer's leading special tokens and the
    prompt's end: longer prompts lose their beginning, shorter ones get `filler` text before them."""
    body = ids[len(lead):] if ids[: len(lead)] == lead else ids
    room = length - len(lead)
    if room <= 0:
        raise BenchError(f"prompt length {length} leaves no room after {len(lead)} leading tokens")
    if len(body) >= room:
        return lead + body[-room:]
    need = room - len(body)
    pad = filler * math.ceil(need / len(filler))
    return lead + pad[-need:] + body


# --- running one configuration ------------------------------------------------------------------

def start_cluster(topology_path: Path, folder: Path, head_threads: int | None, stage_threads: int | None) -> LocalCluster:
    """LocalCluster with per-role thread counts and the trace on (it reads both from the env)."""
    cluster = LocalCluster(topology_path, log_dir=folder / "logs")
    cluster.log_dir.mkdir(parents=True, exist_ok=True)
    share = max(1, (os.cpu_count() or 1) // len(cluster.names))
    head = cluster.topology.head.name
    for name in cluster.names:
        threads = (head_threads if name == head else stage_threads) or share
        cluster.start_node(name, dict(os.environ, FLOWSPEC_THREADS=str(threads), FLOWSPEC_TRACE=str(folder / "trace")))
    try:
        cluster.wait_ready()
    except BaseException:
        cluster.stop()
        raise
    return cluster


async def request(client: Client, i: int, prompt: Prompt, ids: list[int], mode: str, tokens: int) -> RunRecord:
    run = RunRecord(i, prompt.category, mode, len(ids), time.time(), 0.0)
    async for event in client.events(prompt_ids=ids, mode=mode, max_new_tokens=tokens, temperature=0.0):
        if event["event"] == "tokens" and event["ids"]:
            run.first_token = run.first_token or time.time()
            run.ids.extend(event["ids"])
        elif event["event"] == "done":
            run.stats = event["stats"]
    run.end = time.time()
    return run


async def measure(address: str, settings: Settings, clients: int, prompts: list[Prompt], prompt_ids: list[list[int]],
                  progress: Progress, task) -> list[RunRecord]:
    client = Client(address)
    modes = list(settings.modes)
    for mode in modes:  # warm-up: first-call costs (draft load, allocator, caches) stay out of the figures
        await client.complete(prompt_ids=prompt_ids[0], mode=mode, max_new_tokens=settings.warmup_tokens, temperature=0.0)
        progress.advance(task)
    runs = []
    if clients == 1:  # one at a time, the modes interleaved per prompt
        for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
            for mode in modes[i % len(modes):] + modes[: i % len(modes)]:
                progress.update(task, description=f"prompt {i + 1}/{len(prompts)} ({prompt.category}), {mode}")
                runs.append(await request(client, i, prompt, ids, mode, settings.max_new_tokens))
                progress.advance(task)
        return runs
    for mode in modes:  # every prompt of a mode through `clients` concurrent clients
        progress.update(task, description=f"{clients} clients, {mode}")
        waiting = list(enumerate(zip(prompts, prompt_ids)))

        async def one_client() -> None:
            while waiting:
                i, (prompt, ids) = waiting.pop(0)
                runs.append(await request(Client(address), i, prompt, ids, mode, settings.max_new_tokens))
                progress.advance(task)

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return runs


def stage_speeds(config: Config) -> list[float]:
    """Each stage's emulated speed: 1, or 1 / SLOWDOWN for a slow stage."""
    return [1 / SLOWDOWN if i + 1 in config.slow_stages else 1.0 for i in range(config.stages)]


def speed_hints(config: Config) -> list[float] | None:
    """What the generated topology declares: the stages' speeds for a balanced split, nothing for an even one."""
    return stage_speeds(config) if config.split == "balanced" else None


def stage_layers(model: str, config: Config, num_layers: int) -> list[int]:
    """Layers per stage, as the nodes of the configuration's topology will split them."""
    windows = parse_topology(local_topology_toml(model, config.stages, speeds=speed_hints(config))).layer_windows(num_layers)
    return [last - first for first, last in (windows[f"stage{i + 1}"] for i in range(config.stages))]


def stage_profiles(edge: EdgeProfile | None, config: Config, layers: list[int], num_layers: int) -> list[DeviceProfile] | None:
    """Each stage paced to its share of the emulated model at its speed."""
    if edge is None:
        return None
    return [edge.stage(n, num_layers, speed) for n, speed in zip(layers, stage_speeds(config))]


def run_config(config: Config, settings: Settings, edge: EdgeProfile | None, num_layers: int, prompts: list[Prompt],
               prompt_ids: list[list[int]], folder: Path, progress: Progress) -> dict[str, Any]:
    layers = stage_layers(settings.model, config, num_layers)
    profiles = stage_profiles(edge, config, layers, num_layers)
    longest = max(map(len, prompt_ids)) + settings.max_new_tokens + settings.decoding.get("tree_depth", 8) + 16
    text = local_topology_toml(settings.model, config.stages, max_context=max(256, 64 * math.ceil(longest / 64)),
                               link=settings.link, profile=profiles, speeds=speed_hints(config), draft=settings.draft,
                               temperature=0.0, service={"max_requests": config.clients}, **settings.decoding)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "topology.toml").write_text(text)
    task = progress.add_task(f"{config.name}: starting nodes", total=len(settings.modes) * (len(prompts) + 1))
    cluster = start_cluster(folder / "topology.toml", folder, settings.head_threads, settings.stage_threads)
    try:
        head = cluster.topology.head
        runs = uvloop.run(measure(f"tcp://{head.host}:{head.client_port}", settings, config.clients, prompts, prompt_ids,
                                  progress, task))
        memory = {name: resident_mb(node.process.pid) for name, node in cluster.nodes.items()}
    finally:
        cluster.stop()
    progress.update(task, description=f"{config.name}: done")
    return analyse(config, settings, runs, profiles, folder) | {"resident_mb": memory, "layers": layers}



def add_ratios(modes: dict[str, dict[str, Any]]) -> None:
    """tokens/s relative to `ar` (the speedup) and to `tree`, aggregate tokens/s relative to `ar`'s;
    None where that mode did not run."""
    for name, key, reference in (("speedup", "tokens_per_s", "ar"), ("vs_tree", "tokens_per_s", "tree"),
                                 ("aggregate_vs_ar", "aggregate_tokens_per_s", "ar")):
        base = modes.get(reference, {}).get(key) or 0.0
        for figures in modes.values():
            figures[name] = figures.get(key, 0.0) / base if base else None


def add_client_ratios(results: list[dict[str, Any]]) -> None:
    """Each mode's aggregate tokens/s and TBT p90 relative to the same configuration served one
    request at a time (its `clients` = 1 run)."""
    def setup(r: dict[str, Any]) -> tuple:
        return r["stages"], r["prompt_length"], tuple(r.get("slow_stages", ())), r.get("split", "even")

    alone = {setup(r): r for r in results if r.get("clients", 1) == 1}
    for result in results:
        base = alone.get(setup(result))
        for mode, figures in result["modes"].items():
            single = base["modes"].get(mode) if base else None
            figures["vs_one_at_a_time"] = (figures["aggregate_tokens_per_s"] / single["aggregate_tokens_per_s"]
                                           if single and single.get("aggregate_tokens_per_s") else None)
            figures["tbt_p90_vs_one_at_a_time"] = (figures["tbt_p90_ms"] / single["tbt_p90_ms"]
                                                   if single and single.get("tbt_p90_ms") else None)


def analyse(config: Config, settings: Settings, runs: list[RunRecord], profiles: list[DeviceProfile] | None,
            folder: Path) -> dict[str, Any]:
    spans = load_spans(folder / "trace")
    stages = [f"stage{i + 1}" for i in range(config.stages)]
    modes: dict[str, Any] = {}
    for mode in settings.modes:
        mine = [r for r in runs if r.mode == mode]
        modes[mode] = {**summarise(mine), **node_times(spans, mine, stages)}
    add_ratios(modes)
    paced = dict(zip(stages, profiles)) if profiles else {}
    gantt = {}
    for mode in settings.modes:
        run = next((r for r in runs if r.mode == mode and r.prompt == settings.gantt_prompt), None)
        if run is not None:
            gantt[mode] = timeline(spans, run, settings.gantt_seconds)
    return {
        **asdict(config),
        "stage_profiles": [asdict(p) for p in profiles] if profiles else None,
        "modes": modes,
        "mismatches": mismatches(runs),
        "pace_overruns": pace_overruns(spans, runs, paced) if paced else None,
        "folder": str(folder),
        "runs": [asdict(r) for r in runs],
        "gantt": gantt,
    }


# --- reporting ----------------------------------------------------------------------------------

COLUMNS = (  # header, key, format
    ("tok/s", "tokens_per_s", "{:.2f}"), ("x ar", "speedup", "{:.2f}"), ("x tree", "vs_tree", "{:.2f}"),
    ("TBT mean ms", "tbt_mean_ms", "{:.0f}"),
    ("TBT p90 ms", "tbt_p90_ms", "{:.0f}"), ("acc/verif", "accepted_per_verification", "{:.2f}"),
    ("rows/tok", "rows_per_token", "{:.1f}"), ("KB/tok", "bytes_per_token", "{:.1f}"),
)


def rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for mode, m in result["modes"].items():
        util = list(m["utilisation"].values())
        head = m["head_ms_per_verification"]
        cells = ["-" if m.get(key, 0.0) is None else fmt.format(m.get(key, 0.0) / (1000 if key == "bytes_per_token" else 1))
                 for _, key, fmt in COLUMNS]
        cells += [f"{100 * sum(util) / len(util):.0f} ({100 * min(util):.0f}-{100 * max(util):.0f})",
                  f"{head['draft']:.0f}", f"{head['logits']:.0f}", f"{100 * m['head_busy']:.0f}",
                  f"{100 * m.get('head_alone', 0.0):.0f}"]
        out.append([result["name"], mode, *cells])
    return out


HEADERS = ["config", "mode", *(h for h, _, _ in COLUMNS), "stage util % (min-max)", "draft ms/verif", "logits ms/verif",
           "head busy %", "head alone %"]


CLIENT_COLUMNS = (  # header, key, format: serving several clients at once against one at a time
    ("agg tok/s", "aggregate_tokens_per_s", "{:.2f}"), ("x one at a time", "vs_one_at_a_time", "{:.2f}"),
    ("x ar agg", "aggregate_vs_ar", "{:.2f}"), ("TBT p50 ms", "tbt_p50_ms", "{:.0f}"),
    ("TBT p90 ms", "tbt_p90_ms", "{:.0f}"), ("TBT p90 x alone", "tbt_p90_vs_one_at_a_time", "{:.2f}"),
    ("TTFT p50 ms", "ttft_p50_ms", "{:.0f}"), ("TTFT p90 ms", "ttft_p90_ms", "{:.0f}"),
    ("acc/verif", "accepted_per_verification", "{:.2f}"),
)
CLIENT_HEADERS = ["config", "clients", "mode", *(h for h, _, _ in CLIENT_COLUMNS)]


def client_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    return [[r["name"], str(r.get("clients", 1)), mode,
             *("-" if m.get(key) is None else fmt.format(m[key]) for _, key, fmt in CLIENT_COLUMNS)]
            for r in results for mode, m in r["modes"].items()]


def table(results: list[dict[str, Any]], title: str, headers: list[str] = HEADERS,
          cells: Callable[[list[dict[str, Any]]], list[list[str]]] = lambda rs: [c for r in rs for c in rows(r)]) -> Table:
    t = Table(title=title, box=box.SIMPLE_HEAVY)
    for header in headers:
        t.add_column(header, justify="left" if header in ("config", "mode") else "right")
    for row in cells(results):
        t.add_row(*row)
    return t


def markdown(headers: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def serving_clients(results: list[dict[str, Any]]) -> bool:
    return any(r.get("clients", 1) > 1 for r in results)


def tables(results: list[dict[str, Any]], title: str, console: Console) -> str:
    """Print the tables and return them as markdown: the modes side by side, and when several
    clients were measured, serving them against one at a time."""
    console.print(table(results, title))
    text = markdown(HEADERS, [c for r in results for c in rows(r)])
    if serving_clients(results):
        console.print(table(results, "concurrent clients", CLIENT_HEADERS, client_rows))
        text += "\n" + markdown(CLIENT_HEADERS, client_rows(results))
    return text


def describe(settings: Settings, edge: EdgeProfile | None) -> str:
    pacing = (f"stages paced as {edge.name} ({edge.fixed_ms_per_layer} ms + {edge.per_token_ms_per_layer} ms/row per "
              f"layer of {edge.model_layers})" if edge else "unpaced (this machine's real speed)")
    link = f"links {settings.link.bandwidth_mbps:g} Mbps + {settings.link.delay_ms:g} ms/hop" if settings.link else "unshaped links"
    tree = ", ".join(f"{k}={v}" for k, v in settings.decoding.items()) or "topology defaults"
    return f"{settings.model}, {settings.draft} draft, {settings.max_new_tokens} new tokens, greedy; {pacing}; {link}; {tree}"


def plot(results: list[dict[str, Any]], settings: Settings, out: Path, title: str, console: Console) -> list[str]:
    try:
        from .bench_plots import clients_chart, gantt, speedup_chart
    except ImportError:
        console.print("[yellow]matplotlib is missing (pip install -e '.[bench]'): no plots[/yellow]")
        return []
    paths = [speedup_chart(results, list(settings.modes), out / "speedup.png", title)]
    if serving_clients(results):
        paths.append(clients_chart(results, list(settings.modes), out / "clients.png", title))
    for result in results:
        nodes = ["head", *(f"stage{i + 1}" for i in range(result["stages"]))]
        slug = result["name"].replace(" ", "").replace("/", "_").replace(",", "_")
        paths.append(gantt(result["gantt"], nodes, settings.gantt_seconds, out / f"timeline_{slug}.png",
                           f"{result['name']}: first {settings.gantt_seconds:g} s of decoding prompt {settings.gantt_prompt}, per mode"))
    return [str(p) for p in paths]


# --- command line -------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flowspec bench", description=__doc__.split("\n")[0],
                                     epilog="Speed figures depend on this machine; never assert them in tests.")
    parser.add_argument("--model", default="gemma3-270m", help="prepared model name or directory")
    parser.add_argument("--draft", default="int8", help="int8, bf16, ngram or model:NAME_OR_PATH")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--prompts", type=Path, default=PROMPTS, help="JSONL file of {category, prompt}")
    parser.add_argument("--prompts-per-config", type=int, default=None, help="use this many prompts (categories in turn)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--warmup-tokens", type=int, default=8)
    parser.add_argument("--stages", type=_ints, default=[4], help="stage counts, e.g. 2,4,6,8 (one cluster each)")
    parser.add_argument("--prompt-lengths", type=_ints, default=None, help="prompt lengths in tokens, e.g. 64,256,512")
    parser.add_argument("--clients", type=_ints, default=[1],
                        help="concurrent clients, e.g. 1,2,4,8 (one configuration each; 1 is always measured with more)")
    parser.add_argument("--slow-stages", type=_ints, default=[],
                        help=f"1-based stages paced {SLOWDOWN:g}x slower than the profile, e.g. 2")
    parser.add_argument("--splits", default="even",
                        help="comma-separated: even (the plain auto split), balanced (the slow stages declare their speed)")
    parser.add_argument("--profile", default=str(DEFAULT_PROFILE), help="edge profile TOML, or 'none' for unpaced stages")
    parser.add_argument("--bandwidth-mbps", type=float, default=None, help="link bandwidth (default: the profile's)")
    parser.add_argument("--delay-ms", type=float, default=None, help="one-way delay per hop (default: the profile's)")
    parser.add_argument("--no-link", action="store_true", help="no link shaping at all")
    for flag in TREE_FLAGS:  # defaults: the topology's [decoding] defaults, which this benchmark tuned
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None, help="(default: the topology's)")
    parser.add_argument("--head-threads", type=int, default=None, help="torch threads of the head (default: cores / nodes)")
    parser.add_argument("--stage-threads", type=int, default=None, help="torch threads per stage (default: cores / nodes)")
    parser.add_argument("--gantt-prompt", type=int, default=0, help="which prompt the timelines show")
    parser.add_argument("--gantt-seconds", type=float, default=2.0, help="how much of its decoding they show")
    parser.add_argument("--label", default="", help="prefix of configuration names")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--report", type=Path, nargs="+", default=None, metavar="BENCH_JSON",
                        help="run nothing: print the table of earlier bench.json files together and re-plot into --out")
    args = parser.parse_args(argv)
    args.modes = tuple(m.strip() for m in args.modes.split(","))
    if unknown := [m for m in args.modes if m not in MODES]:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    if args.max_new_tokens < 2 or args.warmup_tokens < 1:
        parser.error("need --max-new-tokens >= 2 and --warmup-tokens >= 1")
    args.splits = tuple(s.strip() for s in args.splits.split(","))
    if unknown := [s for s in args.splits if s not in SPLITS]:
        parser.error(f"unknown splits {unknown}; choose from {', '.join(SPLITS)}")
    if args.slow_stages and args.profile == "none":
        parser.error("--slow-stages needs an edge profile to pace the stages to")
    if args.slow_stages and max(args.slow_stages) > min(args.stages):
        parser.error(f"--slow-stages {max(args.slow_stages)} is beyond the {min(args.stages)} stages of --stages")
    return args


def configurations(args: argparse.Namespace) -> list[Config]:
    """One configuration per stage count, split, prompt length and client count, named by what varies."""
    clients = sorted(set(args.clients) | ({1} if args.clients != [1] else set()))  # one at a time: the baseline
    slow = f" / {'+'.join(f'stage{s}' for s in args.slow_stages)} {SLOWDOWN:g}x slower" if args.slow_stages else ""
    return [Config(f"{args.label}{n} stages{slow}" + (f" / {split} split" if args.splits != ("even",) else "")
                   + (f" / {length} tok" if length else "") + (f" / {c} clients" if clients != [1] else ""),
                   n, length, c, tuple(args.slow_stages), split)
            for n in args.stages for split in args.splits for length in (args.prompt_lengths or [None]) for c in clients]


def refresh(config: dict[str, Any], folder: Path) -> None:
    """Recompute the trace figures of a saved configuration (when its trace is still there) and the ratios."""
    trace = Path(config.get("folder", folder)) / "trace"
    if trace.is_dir():
        spans = load_spans(trace)
        stages = [f"stage{i + 1}" for i in range(config["stages"])]
        runs = [RunRecord(**run) for run in config["runs"]]
        for mode, figures in config["modes"].items():
            figures.update(node_times(spans, [r for r in runs if r.mode == mode], stages))
    add_ratios(config["modes"])


def _saved_settings(report: dict[str, Any]) -> Settings:
    saved = report["settings"]
    return Settings(**{k: v for k, v in saved.items() if k in Settings.__dataclass_fields__}
                    | {"modes": tuple(saved["modes"]), "link": LinkProfile(**saved["link"]) if saved["link"] else None})


def _saved_title(report: dict[str, Any]) -> str:
    if report.get("title"):
        return report["title"]
    edge = report.get("edge_profile")
    if edge:
        edge = EdgeProfile(**edge | {"link": LinkProfile(**edge["link"]) if edge.get("link") else None})
    return describe(_saved_settings(report), edge)


def report_only(paths: list[Path], out: Path, console: Console) -> int:
    """Tables and plots of earlier runs, side by side (e.g. the edge and the unpaced run)."""
    reports = [json.loads(path.read_text()) for path in paths]
    results = []
    for path, report in zip(paths, reports):
        for config in report["configs"]:
            refresh(config, path.parent / "configs" / config["name"].replace(" ", "").replace("/", "_"))
            results.append(config)
    title = " | ".join(dict.fromkeys(_saved_title(report) for report in reports))
    add_client_ratios(results)
    console.print(tables(results, title, console), soft_wrap=True, markup=False)
    out.mkdir(parents=True, exist_ok=True)
    for path in plot(results, _saved_settings(reports[0]), out, title, console):
        console.print(f"wrote {path}")
    return 0 if all(report["agree"] for report in reports) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # logs and CI: keep the table on one line per row
    if args.report:
        return report_only(args.report, args.out, console)
    try:
        edge = None if args.profile == "none" else load_edge_profile(args.profile)
        prompts = pick(load_prompts(args.prompts), args.prompts_per_config)
    except (ProfileError, BenchError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    link = None
    if not args.no_link:
        base = edge.link if edge and edge.link else LinkProfile(0.0, 0.0)
        link = LinkProfile(args.bandwidth_mbps if args.bandwidth_mbps is not None else base.bandwidth_mbps,
                           args.delay_ms if args.delay_ms is not None else base.delay_ms)
        link = link if link.bandwidth_mbps or link.delay_ms else None
    settings = Settings(
        model=args.model, draft=args.draft, modes=args.modes, max_new_tokens=args.max_new_tokens,
        warmup_tokens=args.warmup_tokens, profile=None if edge is None else str(args.profile), link=link,
        decoding={f: getattr(args, f) for f in TREE_FLAGS if getattr(args, f) is not None},
        head_threads=args.head_threads, stage_threads=args.stage_threads,
        gantt_prompt=min(args.gantt_prompt, len(prompts) - 1), gantt_seconds=args.gantt_seconds,
    )
    model_dir = resolve_model_dir(args.model)
    num_layers = load_config(model_dir).num_hidden_layers
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    natural = [tokenizer(p.text)["input_ids"] for p in prompts]
    lead = tokenizer("")["input_ids"]
    filler = tokenizer("\n\n".join(p.text for p in prompts) + "\n\n", add_special_tokens=False)["input_ids"]
    configs = configurations(args)
    title = describe(settings, edge)
    console.print(f"[bold]flowspec bench[/bold]: {len(prompts)} prompts x {len(args.modes)} modes per configuration; {title}")
    started = time.perf_counter()
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    error = None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        for config in configs:
            ids = natural if config.prompt_length is None else [fit_length(i, config.prompt_length, lead, filler) for i in natural]
            try:
                results.append(run_config(config, settings, edge, num_layers, prompts, ids,
                                          args.out / "configs" / config.name.replace(" ", "").replace("/", "_"), progress))
            except (NodeDied, GenerationFailed, TimeoutError, BenchError) as exc:
                error = f"{config.name}: {type(exc).__name__}: {exc}"
                break
    add_client_ratios(results)
    summary = tables(results, title, console) if results else ""
    layer_lines = "".join(f"{r['name']}: layers per stage {', '.join(map(str, r['layers']))}\n" for r in results)
    console.print(layer_lines, end="", markup=False)
    for result in results:
        if memory := result.get("resident_mb"):
            console.print(f"{result['name']}: resident MB " + ", ".join(f"{n} {mb:.0f}" for n, mb in memory.items()))
        for bad in result["mismatches"]:
            console.print(f"[red]MISMATCH[/red] {result['name']}: prompt {bad['prompt']} ({bad['category']}) {bad['mode']} "
                          f"differs from {bad['reference']} at token {bad['first_difference']}")
        if (over := result["pace_overruns"]) and over["fraction"] > 0.05:
            console.print(f"[yellow]{result['name']}: {100 * over['fraction']:.0f}% of paced segments overran their profile "
                          f"(worst +{over['worst_ms']:.0f} ms): real compute did not fit; the figures mix in CPU contention[/yellow]")
    agree = bool(results) and not any(r["mismatches"] for r in results)
    args.out.mkdir(parents=True, exist_ok=True)
    plots = plot(results, settings, args.out, title, console) if results else []
    report = {
        "settings": asdict(settings) | {"link": asdict(link) if link else None, "prompts_file": str(args.prompts)},
        "edge_profile": asdict(edge) if edge else None,
        "host": {"python": sys.version.split()[0], "torch": torch.__version__, "cpus": os.cpu_count(),
                 "load_before": load_before, "load_after": os.getloadavg()},  # other work on this machine
        "prompts": [asdict(p) for p in prompts],
        "seconds": time.perf_counter() - started,
        "title": title,
        "agree": agree,
        "error": error,
        "configs": results,
        "plots": plots,
    }
    (args.out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "summary.md").write_text(f"{title}\n\n{summary}\n{layer_lines}" if results else "")
    console.print(f"wrote {args.out / 'bench.json'}, {args.out / 'summary.md'}" + "".join(f", {p}" for p in plots)
                  + f" ({report['seconds']:.0f} s)")
    if error:
        console.print(f"[red]error:[/red] {error}")
        return 2
    if not agree:
        console.print("[red]the modes disagree: the benchmark failed[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
