"""Benchmark: per-hop cost of the wire protocol against raw ZeroMQ, on a real 2-node TCP ring.

A sender process and an echo process on 127.0.0.1 each bind a PULL and connect a PUSH to the other's,
the way ring nodes do. Each message carries one segment of hidden states (`tokens` rows x `--hidden`).

    raw       the tensor's bytes behind a fixed 8-byte prefix, one frame; the echo returns the frame
    flowspec  encode(Segment) -> multipart frames; the echo decodes and re-encodes the segment (a
              stage forwarding without compute); the sender decodes the reply

Latency is the round trip with one message in flight (per hop = RTT / 2). Throughput keeps a window
of messages in flight and counts deliveries per second on each link (both links carry the same rate).

    python -m flowspec_zmq.bench_protocol            # about 35 s
    python -m flowspec_zmq.bench_protocol --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal

import torch
import uvloop
import zmq
import zmq.asyncio
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .protocol import DTYPES, MAX_MESSAGE_BYTES, ProtocolError, Release, Segment, decode, encode

Variant = Literal["raw", "flowspec"]
VARIANTS: tuple[Variant, ...] = ("raw", "flowspec")
TOKENS = (1, 2, 4, 8, 16, 32, 64)
HOST = "127.0.0.1"
RAW_PREFIX = b"fsraw\x00\x00\x01"  # keeps the tensor bytes 8-aligned in the frame
RAW_STOP = b""
STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Settings:
    hidden: int
    dtype: str
    round_trips: int  # timed, per variant and size, over all rounds
    warmup: int  # untimed round trips before each round's latency run
    window: int
    seconds: float  # throughput time per variant and size, over all rounds
    rounds: int  # the variants alternate this many times per size, so drift in load hits both alike


@dataclass(frozen=True)
class Result:
    variant: Variant
    tokens: int
    payload_bytes: int  # tensor bytes per message
    wire_bytes: int  # every frame of one message
    rtt_median_us: float
    rtt_p90_us: float
    hop_median_us: float
    hop_p90_us: float
    msgs_per_s: float  # deliveries per second on one link, `window` in flight
    mb_per_s: float  # tensor payload, 10^6 bytes per second on one link


def _sockets(context: zmq.asyncio.Context) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]:
    """PULL and PUSH with the options RingLink uses, so only the message format differs."""
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    pull.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    for sock in (pull, push):
        sock.setsockopt(zmq.LINGER, 0)
    return pull, push


# --- echo process -------------------------------------------------------------------------------


async def _echo_raw(pull: zmq.asyncio.Socket, push: zmq.asyncio.Socket) -> None:
    while True:
        frame = await pull.recv(copy=False)
        if len(frame) == 0:  # RAW_STOP
            return
        await push.send(frame, copy=False)


async def _echo_flowspec(pull: zmq.asyncio.Socket, push: zmq.asyncio.Socket) -> None:
    while True:
        message = decode(await pull.recv_multipart(copy=False))
        if isinstance(message, Release):
            return
        await push.send_multipart(encode(message), copy=False)


async def _exit_with_parent(parent: int) -> None:
    # An echo whose sender died would otherwise wait on its socket forever.
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    os._exit(1)


async def _echo(variant: Variant, sender_port: int, ports: Connection, parent: int) -> None:
    context = zmq.asyncio.Context()
    pull, push = _sockets(context)
    port = pull.bind_to_random_port(f"tcp://{HOST}")
    push.connect(f"tcp://{HOST}:{sender_port}")
    ports.send(port)
    watchdog = asyncio.create_task(_exit_with_parent(parent))
    try:
        await (_echo_raw if variant == "raw" else _echo_flowspec)(pull, push)
    finally:
        watchdog.cancel()
        pull.close()
        push.close()
        context.term()


def _echo_process(variant: Variant, sender_port: int, ports: Connection, parent: int) -> None:
    uvloop.run(_echo(variant, sender_port, ports, parent))


# --- sender side --------------------------------------------------------------------------------


class RawPeer:
    """Sends one prebuilt frame; the reply is taken as is."""

    def __init__(self, pull: zmq.asyncio.Socket, push: zmq.asyncio.Socket) -> None:
        self.pull, self.push = pull, push
        self.frame = RAW_PREFIX

    def prepare(self, hidden: torch.Tensor) -> tuple[int, int]:
        self.frame = RAW_PREFIX + hidden.view(torch.uint8).numpy().tobytes()
        return hidden.nbytes, len(self.frame)

    async def send(self, seq: int) -> None:
        await self.push.send(self.frame, copy=False)

    async def receive(self) -> None:
        await self.pull.recv(copy=False)

    async def check(self) -> None:
        await self.send(0)
        reply = await self.pull.recv()
        if reply != self.frame:
            raise RuntimeError("raw echo returned different bytes")

    async def stop(self) -> None:
        await self.push.send(RAW_STOP)


class FlowspecPeer:
    """Encodes a fresh Segment per send, as a stage forwarding its output does; decodes replies."""

    def __init__(self, pull: zmq.asyncio.Socket, push: zmq.asyncio.Socket) -> None:
        self.pull, self.push = pull, push
        self.hidden = torch.empty(0, 0)
        self.rows: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] = ((), (), ())

    def prepare(self, hidden: torch.Tensor) -> tuple[int, int]:
        n = hidden.shape[0]
        # A chain of draft nodes after a 100-token committed prefix.
        self.hidden, self.rows = hidden, (tuple(range(n)), tuple(range(-1, n - 1)), tuple(range(100, 100 + n)))
        return hidden.nbytes, sum(memoryview(f).nbytes for f in encode(self._segment(0)))

    def _segment(self, seq: int) -> Segment:
        return Segment(7, seq, False, *self.rows, self.hidden)

    async def send(self, seq: int) -> None:
        await self.push.send_multipart(encode(self._segment(seq)), copy=False)

    async def receive(self) -> None:
        decode(await self.pull.recv_multipart(copy=False))

    async def check(self) -> None:
        await self.send(0)
        reply = decode(await self.pull.recv_multipart(copy=False))
        expected = self._segment(0)
        if not (isinstance(reply, Segment) and reply.node_ids == expected.node_ids
                and torch.equal(reply.hidden.view(torch.uint8), expected.hidden.view(torch.uint8))):
            raise RuntimeError("flowspec echo returned a different segment")

    async def stop(self) -> None:
        await self.push.send_multipart(encode(Release(0)), copy=False)


Peer = RawPeer | FlowspecPeer


async def measure_latency(peer: Peer, round_trips: int, warmup: int) -> list[float]:
    """Round-trip times in microseconds, one message in flight."""
    for seq in range(warmup):
        await peer.send(seq)
        await peer.receive()
    times = []
    for seq in range(round_trips):
        start = time.perf_counter_ns()
        await peer.send(seq)
        await peer.receive()
        times.append((time.perf_counter_ns() - start) / 1e3)
    return times


async def measure_throughput(peer: Peer, window: int, seconds: float) -> tuple[int, float]:
    """Deliveries and the seconds they took, in steady state with `window` messages in flight."""
    for seq in range(window):
        await peer.send(seq)
    # The first `window` deliveries fill the pipeline; timing starts after them.
    seq = window
    for _ in range(window):
        await peer.receive()
        await peer.send(seq)
        seq += 1
    start = time.perf_counter()
    deadline, delivered = start + seconds, 0
    while time.perf_counter() < deadline:
        await peer.receive()
        delivered += 1
        await peer.send(seq)
        seq += 1
    elapsed = time.perf_counter() - start
    for _ in range(window):
        await peer.receive()
    return delivered, elapsed


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


async def _start_echo(context: zmq.asyncio.Context, variant: Variant) -> tuple[Peer, multiprocessing.Process]:
    pull, push = _sockets(context)
    sender_port = pull.bind_to_random_port(f"tcp://{HOST}")
    spawn = multiprocessing.get_context("spawn")
    receiver, reporter = spawn.Pipe(duplex=False)
    process = spawn.Process(
        target=_echo_process, args=(variant, sender_port, reporter, os.getpid()), name=f"echo-{variant}", daemon=True
    )
    process.start()
    reporter.close()
    if not await asyncio.to_thread(receiver.poll, STARTUP_TIMEOUT_S):
        raise RuntimeError(f"the {variant} echo process did not start")
    push.connect(f"tcp://{HOST}:{receiver.recv()}")
    return (RawPeer if variant == "raw" else FlowspecPeer)(pull, push), process


async def _watch(processes: list[multiprocessing.Process]) -> None:
    # An echo that dies would leave the sender waiting on its socket forever.
    while all(p.is_alive() for p in processes):
        await asyncio.sleep(0.5)
    dead = [p.name for p in processes if not p.is_alive()]
    raise RuntimeError(f"echo process died: {', '.join(dead)}")


async def _benchmark(settings: Settings, progress: Progress) -> list[Result]:
    context = zmq.asyncio.Context()
    started = await asyncio.gather(*(_start_echo(context, v) for v in VARIANTS))
    peers = {v: peer for v, (peer, _) in zip(VARIANTS, started)}
    processes = [process for _, process in started]
    task = progress.add_task("measuring", total=len(TOKENS) * settings.rounds)

    async def measure(tokens: int) -> list[Result]:
        hidden = torch.randn(tokens, settings.hidden).to(DTYPES[settings.dtype])
        sizes = {variant: peer.prepare(hidden) for variant, peer in peers.items()}
        rtts: dict[Variant, list[float]] = {variant: [] for variant in VARIANTS}
        delivered, elapsed = dict.fromkeys(VARIANTS, 0), dict.fromkeys(VARIANTS, 0.0)
        for round_ in range(settings.rounds):
            progress.update(task, description=f"{tokens:>2} tokens, round {round_ + 1}/{settings.rounds}")
            order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                peer = peers[variant]
                rtts[variant] += await measure_latency(peer, settings.round_trips // settings.rounds, settings.warmup)
                count, seconds = await measure_throughput(peer, settings.window, settings.seconds / settings.rounds)
                delivered[variant] += count
                elapsed[variant] += seconds
            progress.advance(task)
        results = []
        for variant in VARIANTS:
            median, p90 = statistics.median(rtts[variant]), _percentile(rtts[variant], 0.9)
            rate = delivered[variant] / elapsed[variant]
            payload, wire = sizes[variant]
            results.append(Result(variant, tokens, payload, wire, median, p90, median / 2, p90 / 2, rate,
                                  rate * payload / 1e6))
        return results

    async def run_all() -> list[Result]:
        for peer in peers.values():
            await peer.check()
        results = [result for tokens in TOKENS for result in await measure(tokens)]
        for peer in peers.values():
            await peer.stop()
        return results

    watch = asyncio.create_task(_watch(processes))
    work = asyncio.create_task(run_all())
    try:
        done, _ = await asyncio.wait({watch, work}, return_when=asyncio.FIRST_COMPLETED)
        return await (work if work in done else watch)
    finally:
        watch.cancel()
        work.cancel()
        for process in processes:
            await asyncio.to_thread(process.join, 5.0)
            if process.is_alive():
                process.terminate()
        for peer in peers.values():
            peer.pull.close()
            peer.push.close()
        context.term()


def overheads(results: list[Result]) -> list[dict[str, float]]:
    """flowspec / raw for each size: >1 means slower for latency, <1 means slower for throughput."""
    by_key = {(r.variant, r.tokens): r for r in results}
    rows = []
    for tokens in TOKENS:
        raw, ours = by_key["raw", tokens], by_key["flowspec", tokens]
        rows.append({
            "tokens": tokens,
            "hop_latency_ratio": ours.hop_median_us / raw.hop_median_us,
            "hop_latency_extra_us": ours.hop_median_us - raw.hop_median_us,
            "throughput_ratio": ours.msgs_per_s / raw.msgs_per_s,
        })
    return rows


def _table(settings: Settings, results: list[Result], ratios: list[dict[str, float]]) -> Table:
    table = Table(
        title=f"Per hop, {settings.hidden} x {settings.dtype} rows, TCP 127.0.0.1, window {settings.window}",
        caption="hop = RTT/2 over {} round trips; msg/s and MB/s per link; × = flowspec / raw".format(
            settings.round_trips),
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    for name in ("tok", "KiB"):
        table.add_column(name, justify="right")
    table.add_column("variant", min_width=len("flowspec"))
    for name in ("p50 µs", "p90 µs", "msg/s", "MB/s", "lat×", "+µs", "thr×"):
        table.add_column(name, justify="right")
    ratio_of = {row["tokens"]: row for row in ratios}
    for r in results:
        first, ratio = r.variant == "raw", ratio_of[r.tokens]
        table.add_row(
            str(r.tokens) if first else "", f"{r.payload_bytes / 1024:.1f}" if first else "", r.variant,
            f"{r.hop_median_us:.1f}", f"{r.hop_p90_us:.1f}", f"{r.msgs_per_s:,.0f}", f"{r.mb_per_s:,.0f}",
            "" if first else f"{ratio['hop_latency_ratio']:.2f}",
            "" if first else f"{ratio['hop_latency_extra_us']:+.0f}",
            "" if first else f"{ratio['throughput_ratio']:.2f}",
            end_section=not first,
        )
    return table


def _self_check() -> str | None:
    """Why the flowspec variant cannot run in this checkout, or None."""
    try:
        decode(encode(Segment(0, 0, False, (0,), (-1,), (0,), torch.zeros(1, 1))))
    except ProtocolError as exc:
        return f"protocol.decode fails on a valid segment: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowspec_zmq.bench_protocol", description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=640, help="hidden width (640 = Gemma-3-270M)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--round-trips", type=int, default=3000, help="timed round trips per size for latency")
    parser.add_argument("--rounds", type=int, default=6, help="times the variants alternate per size")
    parser.add_argument("--window", type=int, default=32, help="messages in flight for throughput")
    parser.add_argument("--seconds", type=float, default=1.5, help="throughput measuring time per size")
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer round trips, shorter throughput runs")
    parser.add_argument("--out", type=Path, default=Path("results/bench_protocol.json"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.round_trips < 10 * args.rounds or args.window < 1 or args.seconds <= 0:
        parser.error("need --rounds >= 1, --round-trips >= 10 x rounds, --window >= 1 and --seconds > 0")
    if args.quick:
        settings = Settings(args.hidden, args.dtype, 200, 20, args.window, 0.1, 2)
    else:
        settings = Settings(args.hidden, args.dtype, args.round_trips, 50, args.window, args.seconds, args.rounds)
    console = Console()
    if reason := _self_check():
        console.print(f"[red]cannot benchmark:[/red] {reason}")
        return 2
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        results = uvloop.run(_benchmark(settings, progress))
    ratios = overheads(results)
    console.print(_table(settings, results, ratios))
    report = {
        "settings": asdict(settings),
        "host": {"python": sys.version.split()[0], "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
                 "torch": torch.__version__, "cpus": os.cpu_count()},
        "seconds": time.perf_counter() - started,
        "results": [asdict(r) for r in results],
        "overhead": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
