"""The ring in one process: the head's Scheduler and real StageNodes with real layer windows, joined
by asyncio queues instead of sockets. Logic tests (scheduling, drafting, pruning) run here in
seconds; the end-to-end tests keep real processes and real ZeroMQ sockets."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import torch
import uvicorn
import zmq.asyncio
from starlette.applications import Starlette

from flowspec_zmq.draft import DraftSource, TreeShape
from flowspec_zmq.emulation import DeviceProfile
from flowspec_zmq.engine import HeadEngine, RingHealth
from flowspec_zmq.head_node import HeadNode
from flowspec_zmq.model_slices import HeadModel, load_config, load_layer_window
from flowspec_zmq.models import eos_ids
from flowspec_zmq.protocol import Batch, Message, Prune
from flowspec_zmq.scheduler import FlightPlan, GenerationRequest, GenerationStats, HeadWorkers, Scheduler
from flowspec_zmq.sampling import SamplingParams
from flowspec_zmq.stage_node import StageNode
from flowspec_zmq.strategies import Mode, make_strategy
from flowspec_zmq.topology import DecodingConfig, ServiceConfig, free_ports
from flowspec_zmq.trace import Tracer

MAX_CONTEXT = 512


class QueueLink:
    """A StageNode's place in the ring, over asyncio queues."""

    def __init__(self, inbound: asyncio.Queue, outbound: asyncio.Queue) -> None:
        self.inbound, self.outbound = inbound, outbound

    async def receive(self) -> Message:
        return await self.inbound.get()

    async def send(self, message: Message) -> None:
        await self.outbound.put(message)


@dataclass
class InProcessRing:
    head: HeadModel
    stages: list[StageNode]
    first: asyncio.Queue
    returns: asyncio.Queue
    workers: HeadWorkers
    prunes: int = 0  # prune messages the head has sent so far
    batch_sizes: list[int] = field(default_factory=list)  # requests in each batched message the head sent
    scheduler: Scheduler | None = None

    async def send(self, message: Message) -> None:
        self.prunes += isinstance(message, Prune)
        if isinstance(message, Batch):
            self.batch_sizes.append(len(message.parts))
        await self.first.put(message)

    async def generate(
        self, prompt_ids: list[int], draft: DraftSource | None, mode: Mode, max_new_tokens: int,
        shape: TreeShape = TreeShape(depth=4, top_k=3, total_tokens=16, width=3), segment_size: int = 6,
        request_id: int = 1, sampling: SamplingParams = SamplingParams(),
    ) -> GenerationStats:
        """One request on the ring's scheduler (requests run concurrently share it)."""
        if self.scheduler is None:
            self.scheduler = Scheduler(self.head, self.send, self.returns.get, MAX_CONTEXT, self.workers,
                                       Tracer("head", None), len(self.stages))
        strategy = make_strategy(mode, len(self.stages), segment_size, shape.top_k)
        plan = FlightPlan(strategy, shape, draft if strategy.uses_draft else None, 32)
        request = GenerationRequest(tuple(prompt_ids), max_new_tokens, sampling, frozenset())

        async def ignore(_: list[int]) -> None:
            pass

        return await self.scheduler.generate(request_id, request, plan, ignore)

    async def receive(self) -> Message:  # the head's side of the ring, as a RingLink
        return await self.returns.get()

    def engine(self, model_dir: Path, tokenizer, service: ServiceConfig = ServiceConfig(),
               drafts: dict[tuple[str, int], DraftSource] | None = None) -> HeadEngine:
        """The head's engine (strategy, draft, recovery) on this ring."""
        return HeadEngine(model_dir, self.head, eos_ids(model_dir, tokenizer), self.send, self.returns,
                          len(self.stages), MAX_CONTEXT, 32, service, drafts if drafts is not None else {},
                          Tracer("head", None), RingHealth.assumed_fine(), workers=self.workers)


def stage_windows(model_dir: Path, num_stages: int) -> list:
    layers = load_config(model_dir).num_hidden_layers
    bounds = [layers * i // num_stages for i in range(num_stages + 1)]
    return [load_layer_window(model_dir, a, b, torch.float32) for a, b in zip(bounds, bounds[1:])]


@asynccontextmanager
async def in_process_ring(
    head: HeadModel, windows: list, profile: DeviceProfile | None = None
) -> AsyncIterator[InProcessRing]:
    """Stages paced to `profile` (if given) so that segments really overlap in the pipeline."""
    queues = [asyncio.Queue() for _ in range(len(windows) + 1)]
    stages = [
        StageNode(f"stage{i + 1}", window, QueueLink(queues[i], queues[i + 1]), i == len(windows) - 1, MAX_CONTEXT,
                  Tracer(f"stage{i + 1}", None), profile)
        for i, window in enumerate(windows)
    ]
    tasks = [asyncio.create_task(stage.run()) for stage in stages]
    ring = InProcessRing(head, stages, queues[0], queues[-1], HeadWorkers.start())
    try:
        yield ring
    finally:
        # Let leftover draft work finish: the next ring may share this draft source.
        ring.workers.draft.shutdown(wait=True)
        ring.workers.verify.shutdown(wait=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@asynccontextmanager
async def in_process_head(
    ring: InProcessRing, model_dir: Path, tokenizer, drafts: dict[tuple[str, int], DraftSource],
    service: ServiceConfig = ServiceConfig(), defaults: DecodingConfig = DecodingConfig(max_new_tokens=20),
) -> AsyncIterator[tuple[HeadNode, str]]:
    """The head's whole endpoint (client ROUTER socket, queue, engine) on this ring; yields the
    node and the address real clients connect to."""
    client_port, control_port = free_ports(2)
    context = zmq.asyncio.Context()
    head = HeadNode("head", model_dir, ring.head, tokenizer, ring, f"tcp://127.0.0.1:{client_port}",
                    f"tcp://127.0.0.1:{control_port}", context, tuple(s.name for s in ring.stages), None, defaults,
                    MAX_CONTEXT, 32, drafts, service)
    task = asyncio.create_task(head.run())
    try:
        yield head, f"tcp://127.0.0.1:{client_port}"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        context.destroy(linger=0)
        # The next head may share these draft sources: leftover draft work must finish first.
        head.engine.workers.draft.shutdown(wait=True)
        head.engine.workers.verify.shutdown(wait=True)


@asynccontextmanager
async def in_process_gateway(app: Starlette) -> AsyncIterator[str]:
    """An HTTP app served by uvicorn on this event loop; yields its base URL."""
    port = free_ports(1)[0]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task  # it failed to start: raise why
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
