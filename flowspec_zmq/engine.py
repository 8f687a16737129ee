"""The head's engine: runs requests on the ring with the right strategy and draft, several at once
(they share the scheduler, which batches them), within the stages' KV memory, and recovers a request
from a failed stage or a lost message by re-prefilling prompt + committed tokens on a fresh request.

The engine knows nothing about clients or sockets: it talks to the ring through `send` and the
queue of returned messages, so the same code runs behind the head's endpoint and in-process tests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .draft import DraftSource, TreeShape, make_draft_source
from .kv_budget import KVBudget
from .model_slices import HeadModel
from .protocol import Message
from .sampling import SamplingParams
from .scheduler import (
    FlightPlan, GenerationRequest, GenerationStats, HeadWorkers, OnTokens, RequestRejected, RingDown, Scheduler, Send,
    StageFailure,
)
from .strategies import make_strategy
from .topology import DecodingConfig, ServiceConfig
from .trace import Tracer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Attempt:
    restarts: int  # the watchdog's restart count when the attempt began
    interrupted: bool = False


@dataclass(frozen=True)
class RingHealth:
    """What the head's watchdog knows: a sentence naming a dead or hung stage (or None), and how
    many times any stage came back as a new process."""

    problem: Callable[[], str | None]
    restarts: Callable[[], int]

    @staticmethod
    def assumed_fine() -> RingHealth:  # in-process rings have no heartbeats
        return RingHealth(lambda: None, lambda: 0)


class HeadEngine:
    def __init__(
        self,
        model_dir: Path,
        head: HeadModel,
        eos_ids: frozenset[int],
        send: Send,
        returns: asyncio.Queue[Message],
        num_stages: int,
        max_context: int,
        prefill_chunk: int,
        service: ServiceConfig,
        drafts: dict[tuple[str, int], DraftSource],
        tracer: Tracer,
        health: RingHealth,
        first_request_id: int = 1,
        workers: HeadWorkers | None = None,
        kv_budget: KVBudget | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.head = head
        self.eos_ids = eos_ids
        self.send = send
        self.returns = returns
        self.num_stages = num_stages
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.service = service
        self.drafts = drafts  # loaded draft sources by (kind, draft vocabulary); others load on first use
        self.tracer = tracer
        self.health = health
        self.workers = workers or HeadWorkers.start()
        self.request_ids = itertools.count(first_request_id)
        self.running: set[Attempt] = set()  # attempts in progress, for the watchdog to interrupt
        self.kv_budget = kv_budget
        self.scheduler = Scheduler(head, send, returns.get, max_context, self.workers, tracer, num_stages,
                                   service.max_batch_rows, service.progress_timeout_s)

    def draft_source(self, kind: str, vocab: int) -> DraftSource:
        if (kind, vocab) not in self.drafts:
            log.info("loading the %s draft (draft vocabulary %s)", kind, vocab or "full")
            try:
                self.drafts[kind, vocab] = make_draft_source(kind, self.model_dir, self.head, vocab)
            except (ValueError, OSError) as exc:  # an unknown, missing or incompatible draft: the request's choice
                raise RequestRejected(f"draft {kind!r}: {exc}") from None
        return self.drafts[kind, vocab]

    async def generate(self, ids: list[int], options: DecodingConfig, on_tokens: OnTokens) -> GenerationStats:
        strategy = make_strategy(options.mode, self.num_stages, options.segment_size, options.tree_top_k)
        draft = None
        if strategy.uses_draft:
            draft = await asyncio.get_running_loop().run_in_executor(
                self.workers.draft, self.draft_source, options.draft, options.draft_vocab)
        plan = FlightPlan(
            strategy, TreeShape(options.tree_depth, options.tree_top_k, options.tree_total_tokens, options.tree_width),
            draft, self.prefill_chunk)
        self.scheduler.check(len(ids), options.max_new_tokens)
        # The longest the request can get on a stage: its tokens, a full tree and a message in flight.
        longest = len(ids) + options.max_new_tokens + options.tree_total_tokens + self.service.max_batch_rows
        if self.kv_budget is None:
            return await self._attempts(ids, options, plan, on_tokens)
        async with self.kv_budget.reserve(longest):
            return await self._attempts(ids, options, plan, on_tokens)

    async def _attempts(self, ids: list[int], options: DecodingConfig, plan: FlightPlan,
                        on_tokens: OnTokens) -> GenerationStats:
        # Without a seed every request gets its own, reported with the statistics so it can be repeated.
        seed = options.seed if options.seed is not None else secrets.randbelow(1 << 31)
        sampling = SamplingParams(options.temperature, options.top_k, options.top_p, seed)
        stats = GenerationStats(seed=seed)
        recoveries = 0
        while True:
            # A retry re-prefills prompt + everything committed so far: the stages' caches are rebuilt
            # from the head's tokens, and (greedy, or sampling seeded per position) the rest of the
            # output is what an uninterrupted run would have produced.
            request = GenerationRequest(
                tuple(ids + stats.tokens), options.max_new_tokens - len(stats.tokens), sampling, self.eos_ids
            )
            attempt = Attempt(self.health.restarts())
            self.running.add(attempt)
            try:
                await self.scheduler.generate(next(self.request_ids), request, plan, on_tokens, stats)
            except StageFailure as failure:
                if recoveries >= self.service.max_recoveries:
                    raise RingDown(f"{failure}; gave up after {recoveries} recoveries", stats.tokens) from None
                recoveries += 1
                log.warning("%s; re-prefilling %d tokens", failure, len(ids) + len(stats.tokens))
                self.running.discard(attempt)
                await self._healthy_ring(failure, stats.tokens)
                continue
            finally:
                self.running.discard(attempt)
            stats.recoveries = recoveries
            return stats

    async def _healthy_ring(self, failure: StageFailure, produced: list[int]) -> None:
        """Wait until every stage sends heartbeats again (restarted by `flowspec launch` or by hand)."""
        deadline = time.monotonic() + self.service.recovery_timeout_s
        while (problem := self.health.problem()) is not None:
            if time.monotonic() > deadline:
                raise RingDown(
                    f"{failure}; not recovered after {self.service.recovery_timeout_s:.0f} s: {problem}", produced)
            await asyncio.sleep(0.25)
