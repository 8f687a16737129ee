"""The head node: tokenizer, embedding + lm_head, draft sources, the scheduler and the client endpoint.

Clients talk to a ROUTER socket; requests are served one at a time in arrival order (the stages
hold one request's tree at a time), each streamed back as it is committed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from .client_protocol import ClientRequestError, pack, unpack
from .liveness import Watchdog
from .memory import return_free_memory
from .draft import DraftSource, TreeShape, make_draft_source
from .model_slices import HeadModel
from .models import eos_ids
from .protocol import Message, StageError
from .sampling import SamplingParams
from .scheduler import (
    ANY_REQUEST, GenerationError, GenerationRequest, GenerationStats, HeadWorkers, Scheduler, StageFailure,
)
from .strategies import make_strategy
from .security import Keys
from .topology import DecodingConfig, TopologyError, override_decoding
from .trace import tracer_from_env
from .transport import RingLink, receive_frames

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    restarts: int  # the watchdog's restart count when the attempt began
    interrupted: bool = False


class Cancelled(Exception):
    """The client asked to stop its request."""


def prompt_ids(tokenizer, request: dict[str, Any]) -> list[int]:
    """Token ids for a request's `prompt_ids`, `messages` (chat template) or `prompt` (raw text)."""
    if "prompt_ids" in request:
        ids = request["prompt_ids"]
        if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < len(tokenizer) for i in ids):
            raise ClientRequestError("prompt_ids must be a list of valid token ids")
        return ids
    if "messages" in request:
        messages = request["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ClientRequestError("messages must be a list of {role, content} strings")
        if tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tokenizer(rendered, add_special_tokens=False)["input_ids"]
        # A base model has no template: a plain transcript works well enough for a demo chat.
        transcript = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        return tokenizer(transcript)["input_ids"]
    prompt = request.get("prompt")
    if not isinstance(prompt, str):
        raise ClientRequestError("a generate request needs 'prompt', 'messages' or 'prompt_ids'")
    return tokenizer(prompt)["input_ids"]


class TextStream:
    """Turns growing token lists into text deltas, holding back half-decoded characters."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


@dataclass
class ClientJob:
    identity: bytes
    request_id: int
    message: dict[str, Any]


class HeadNode:
    def __init__(
        self,
        name: str,
        model_dir: Path,
        head: HeadModel,
        tokenizer,
        link: RingLink,
        client_address: str,
        control_address: str,
        context: zmq.asyncio.Context,
        stages: tuple[str, ...],
        keys: Keys | None,
        defaults: DecodingConfig,
        max_context: int,
        prefill_chunk: int,
        drafts: dict[tuple[str, int], DraftSource],
    ) -> None:
        self.name = name
        self.model_dir = model_dir
        self.head = head
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids(model_dir, tokenizer)
        self.link = link
        self.clients = context.socket(zmq.ROUTER)
        self.clients.setsockopt(zmq.LINGER, 0)
        self.clients.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
        self.clients.setsockopt(zmq.ROUTER_MANDATORY, 1)  # so a vanished client frees its request
        if keys:
            keys.serve(self.clients)
        self.clients.bind(client_address)
        self.control = context.socket(zmq.PULL)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.MAXMSGSIZE, 4096)
        if keys:
            keys.serve(self.control)
        self.control.bind(control_address)
        self.watchdog = Watchdog(stages)
        self.running: Attempt | None = None  # the generation attempt in progress
        self.num_stages = len(stages)
        self.defaults = defaults
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.drafts = drafts  # loaded draft sources by (kind, draft vocabulary); others load on first use
        self.workers = HeadWorkers.start()
        self.returns: asyncio.Queue[Message] = asyncio.Queue()
        self.jobs: deque[ClientJob] = deque()
        self.job_ready = asyncio.Event()
        self.cancelled: set[tuple[bytes, int]] = set()
        self.request_ids = itertools.count(int(time.time() * 1000) % (1 << 40))
        self.tracer = tracer_from_env(name)
        self.max_recoveries = 3
        # How long a request waits for a dead stage to come back (`flowspec launch` restarts it).
        self.recovery_timeout_s = float(os.environ.get("FLOWSPEC_RECOVERY_S", "30"))

    async def run(self) -> None:
        await asyncio.gather(
            self._ring_receive(), self._client_receive(), self._serve(), self._control_receive(), self._watch()
        )

    async def _control_receive(self) -> None:
        while True:
            self.watchdog.beat((await receive_frames(self.control))[-1])

    async def _watch(self) -> None:
        """Interrupt the running attempt as soon as a stage goes silent or comes back as a new
        process (its KV cache gone), instead of waiting forever for rows that will not come."""
        while True:
            await asyncio.sleep(0.25)
            attempt = self.running
            if attempt is None or attempt.interrupted:
                continue
            problem = self.watchdog.problem()
            if problem is None and self.watchdog.restarts != attempt.restarts:
                problem = f"stage {self.watchdog.last_restarted} restarted and lost its cache"
            if problem:
                attempt.interrupted = True
                log.error("%s: %s", self.name, problem)
                await self.returns.put(StageError(ANY_REQUEST, "watchdog", problem))

    async def _healthy_ring(self, failure: StageFailure, produced: list[int]) -> None:
        """Wait until every stage sends heartbeats again (restarted by `flowspec launch` or by hand)."""
        deadline = time.monotonic() + self.recovery_timeout_s
        while (problem := self.watchdog.problem()) is not None:
            if time.monotonic() > deadline:
                raise GenerationError(f"{failure}; not recovered after {self.recovery_timeout_s:.0f} s: {problem}", produced)
            await asyncio.sleep(0.25)

    async def _ring_receive(self) -> None:
        while True:
            await self.returns.put(await self.link.receive())

    async def _reply(self, identity: bytes, message: dict[str, Any]) -> bool:
        """Send to a client; False when it has disconnected (ROUTER_MANDATORY tells us)."""
        try:
            await self.clients.send_multipart([identity, pack(message)])
            return True
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            return False

    async def _client_receive(self) -> None:
        while True:
            frames = await receive_frames(self.clients)
            identity, payload = frames[0], frames[-1]
            try:
                message = unpack(payload)
            except ClientRequestError as exc:
                log.warning("%s: bad client message: %s", self.name, exc)
                await self._reply(identity, {"id": -1, "event": "error", "message": str(exc), "ids": []})
                continue
            match message["op"]:
                case "generate":
                    self.jobs.append(ClientJob(identity, message["id"], message))
                    self.job_ready.set()
                case "cancel":
                    self.cancelled.add((identity, message["id"]))
                case "info":
                    await self._reply(identity, {"id": message["id"], "event": "info", **self.info()})
                case op:
                    await self._reply(identity, {"id": message["id"], "event": "error", "message": f"unknown op {op!r}", "ids": []})

    def info(self) -> dict[str, Any]:
        return {"model": str(self.model_dir), "stages": self.num_stages, "max_context": self.max_context,
                "defaults": asdict(self.defaults)}

    async def _serve(self) -> None:
        while True:
            while not self.jobs:
                self.job_ready.clear()
                await self.job_ready.wait()
            job = self.jobs.popleft()
            if (job.identity, job.request_id) in self.cancelled:
                self.cancelled.discard((job.identity, job.request_id))
                continue
            await self._serve_one(job)
            return_free_memory()  # between requests: the workers' arenas keep what a request freed

    def draft_source(self, kind: str, vocab: int) -> DraftSource:
        if (kind, vocab) not in self.drafts:
            log.info("%s: loading the %s draft (draft vocabulary %s)", self.name, kind, vocab or "full")
            self.drafts[kind, vocab] = make_draft_source(kind, self.model_dir, self.head, vocab)
        return self.drafts[kind, vocab]

    async def _serve_one(self, job: ClientJob) -> None:
        stream = TextStream(self.tokenizer)
        key = (job.identity, job.request_id)

        async def on_tokens(ids: list[int]) -> None:
            if key in self.cancelled:
                raise Cancelled("cancelled by its client")
            event = {"id": job.request_id, "event": "tokens", "ids": ids, "text": stream.push(ids)}
            if not await self._reply(job.identity, event):
                raise Cancelled("its client went away")

        try:
            if problem := self.watchdog.problem():
                raise GenerationError(problem)
            options = self._options(job.message.get("options"))
            ids = prompt_ids(self.tokenizer, job.message)
            stats = await self.generate(ids, options, on_tokens)
            await self._reply(job.identity, {"id": job.request_id, "event": "done", "stats": stats_summary(stats)})
        except (ClientRequestError, GenerationError) as exc:
            await self._reply(job.identity, {"id": job.request_id, "event": "error", "message": str(exc), "ids": stream.ids})
        except Cancelled as reason:
            log.info("%s: request %d stopped after %d tokens: %s", self.name, job.request_id, len(stream.ids), reason)
        finally:
            self.cancelled.discard(key)

    def _options(self, overrides: Any) -> DecodingConfig:
        if overrides is None:
            return self.defaults
        if not isinstance(overrides, dict):
            raise ClientRequestError("options must be a map")
        try:
            return override_decoding(self.defaults, overrides)
        except TopologyError as exc:
            raise ClientRequestError(str(exc)) from None

    async def generate(self, ids: list[int], options: DecodingConfig, on_tokens) -> GenerationStats:
        strategy = make_strategy(options.mode, self.num_stages, options.segment_size, options.tree_top_k)
        loop = asyncio.get_running_loop()
        draft = None
        if strategy.uses_draft:
            draft = await loop.run_in_executor(self.workers.draft, self.draft_source, options.draft, options.draft_vocab)
        scheduler = Scheduler(
            self.head, draft, strategy,
            TreeShape(options.tree_depth, options.tree_top_k, options.tree_total_tokens, options.tree_width),
            self.link.send, self.returns.get, self.max_context, self.prefill_chunk, self.workers, self.tracer,
        )
        sampling = SamplingParams(options.temperature, options.top_k, options.top_p, options.seed)
        produced: list[int] = []

        async def record(new: list[int]) -> None:
            produced.extend(new)
            await on_tokens(new)

        for recoveries in itertools.count():
            # A retry re-prefills prompt + everything committed so far: the stages' caches are rebuilt
            # from the head's tokens, and (greedy, or sampling seeded per position) the rest of the
            # output is what an uninterrupted run would have produced.
            request = GenerationRequest(
                tuple(ids + produced), options.max_new_tokens - len(produced), sampling, self.eos_ids
            )
            while not self.returns.empty():  # leftovers of an earlier attempt
                self.returns.get_nowait()
            self.running = Attempt(self.watchdog.restarts)
            try:
                stats = await scheduler.generate(next(self.request_ids), request, record)
            except StageFailure as failure:
                if recoveries >= self.max_recoveries:
                    raise GenerationError(f"{failure}; gave up after {recoveries} recoveries", produced) from None
                log.warning("%s: %s; re-prefilling %d tokens", self.name, failure, len(ids) + len(produced))
                self.running = None
                await self._healthy_ring(failure, produced)
                continue
            finally:
                self.running = None
            stats.tokens = produced
            stats.recoveries = recoveries
            return stats


def stats_summary(stats: GenerationStats) -> dict[str, Any]:
    gaps = [b - a for a, b in zip(stats.token_times, stats.token_times[1:])]
    return {
        "tokens": len(stats.tokens),
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "tokens_per_s": (len(stats.tokens) - 1) / stats.decode_s if stats.decode_s > 0 else 0.0,
        "verifications": stats.verifications,
        "accepted_per_verification": stats.accepted_per_verification,
        "segments_sent": stats.segments_sent,
        "rows_sent": stats.rows_sent,
        "bytes_sent": stats.bytes_sent,
        "token_times": stats.token_times,
        "mean_gap_s": sum(gaps) / len(gaps) if gaps else 0.0,
        "stop_reason": stats.stop_reason,
        "recoveries": stats.recoveries,
    }

