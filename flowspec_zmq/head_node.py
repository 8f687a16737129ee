"""The head node's endpoint: clients, the admission queue, liveness of the stages; the engine runs
the requests on the ring.

Clients talk to a ROUTER socket; up to `max_requests` requests decode at once (the engine batches
them through the ring), the rest wait in arrival order; each is streamed back as it is committed. Whatever goes wrong in
one request ends that request with a clear error and the tokens it has; the head keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from .client_protocol import (
    ALIVE_S, MAX_CLIENT_MESSAGE_BYTES, Accepted, Alive, Cancel, ClientRequestError, Done, Failed, FailureReason,
    Generate, Info, InfoReply, Reply, Tokens, pack, unpack_request,
)
from .detokenize import TextStream
from .draft import DraftSource
from .engine import HeadEngine, RingHealth
from .kv_budget import KVBudget
from .layer_sizes import model_windows
from .liveness import Watchdog
from .memory import return_free_memory
from .model_slices import HeadModel
from .models import eos_ids
from .protocol import Message, StageError
from .scheduler import ANY_REQUEST, GenerationError, GenerationStats, RequestRejected, RingDown
from .security import Keys
from .status import node_status
from .stops import StopScanner
from .topology import DecodingConfig, ServiceConfig, Topology, TopologyError, override_decoding
from .trace import tracer_from_env
from .transport import RingLink, receive_frames

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The client asked to stop its request, or went away."""


def prompt_ids(tokenizer, request: Generate) -> list[int]:
    """Token ids for a request's `prompt_ids`, `messages` (chat template) or `prompt` (raw text)."""
    if request.prompt_ids is not None:
        if not all(i < len(tokenizer) for i in request.prompt_ids):
            raise ClientRequestError("prompt_ids must be a list of valid token ids", request.id)
        return request.prompt_ids
    if request.messages is not None:
        if not tokenizer.chat_template:
            # A base model has no template: a plain transcript works well enough for a demo chat.
            transcript = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in request.messages)
            return tokenizer(transcript + "Assistant:")["input_ids"]
        try:
            rendered = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # templates raise their own errors, e.g. for roles that do not alternate
            raise ClientRequestError(f"the model's chat template rejects these messages: {exc}", request.id) from None
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if request.prompt is None:
        raise ClientRequestError("a generate request needs 'prompt', 'messages' or 'prompt_ids'", request.id)
    return tokenizer(request.prompt)["input_ids"]


@dataclass
class ServingMetrics:
    """Counters since the head started."""

    requests: int = 0  # finished, failed or cancelled
    requests_failed: int = 0
    requests_cancelled: int = 0
    tokens: int = 0  # generated and streamed
    decode_seconds: float = 0.0
    verifications: int = 0
    recoveries: int = 0


@dataclass(eq=False)
class ClientJob:
    identity: bytes
    request: Generate
    options: DecodingConfig
    cancelled: str = ""  # why it must stop, once its client cancelled or vanished
    task: asyncio.Task | None = None  # serving it, once it left the queue


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
        service: ServiceConfig,
        kv_budget: KVBudget | None = None,
        topology: Topology | None = None,  # where the nodes run, for `flowspec status`
    ) -> None:
        self.name = name
        self.topology = topology
        self.windows = model_windows(topology, model_dir) if topology else {}  # for `flowspec status`
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.link = link
        self.clients = context.socket(zmq.ROUTER)
        self.clients.setsockopt(zmq.LINGER, 0)
        self.clients.setsockopt(zmq.MAXMSGSIZE, MAX_CLIENT_MESSAGE_BYTES)
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
        self.watchdog = Watchdog(stages, dead_after_s=service.dead_after_s, hung_after_s=service.hung_after_s)
        self.num_stages = len(stages)
        self.defaults = defaults
        self.max_context = max_context
        self.service = service
        self.returns: asyncio.Queue[Message] = asyncio.Queue()
        self.engine = HeadEngine(
            model_dir, head, eos_ids(model_dir, tokenizer), link.send, self.returns, len(stages), max_context,
            prefill_chunk, service, drafts, tracer_from_env(name),
            RingHealth(self.watchdog.problem, lambda: self.watchdog.restarts),
            # Ids unique across head restarts: stages may still hold caches of the old head's requests.
            first_request_id=int(time.time() * 1000) % (1 << 40), kv_budget=kv_budget,
        )
        self.jobs: deque[ClientJob] = deque()  # admitted, waiting (at most service.max_queued_requests)
        self.job_ready = asyncio.Event()  # a job arrived or a running one ended
        self.serving: list[ClientJob] = []  # running, at most service.max_requests
        self.metrics = ServingMetrics()

    async def run(self) -> None:
        await asyncio.gather(
            self._ring_receive(), self._client_receive(), self._serve(), self._control_receive(), self._watch(),
            self._keep_clients_informed(),
        )

    async def _control_receive(self) -> None:
        while True:
            self.watchdog.beat((await receive_frames(self.control))[-1])

    async def _watch(self) -> None:
        """Interrupt the running attempt as soon as a stage goes silent or comes back as a new
        process (its KV cache gone), instead of waiting for rows that will not come."""
        while True:
            await asyncio.sleep(0.25)
            attempts = [a for a in self.engine.running if not a.interrupted]
            if not attempts:
                continue
            problem = self.watchdog.problem()
            if problem is None and any(self.watchdog.restarts != a.restarts for a in attempts):
                problem = f"stage {self.watchdog.last_restarted} restarted and lost its cache"
            if problem:
                for attempt in attempts:
                    attempt.interrupted = True
                log.error("%s: %s", self.name, problem)
                await self.returns.put(StageError(ANY_REQUEST, "watchdog", problem))

    async def _ring_receive(self) -> None:
        while True:
            await self.returns.put(await self.link.receive())

    async def _reply(self, identity: bytes, message: Reply) -> bool:
        """Send to a client; False when it is gone (ROUTER_MANDATORY tells us) or not reading."""
        try:
            # Never wait on a client: one that stops reading fills its queue and is let go.
            await self.clients.send_multipart([identity, pack(message)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                log.warning("%s: cannot answer a client: %s", self.name, exc)
            return False

    async def _client_receive(self) -> None:
        while True:
            frames = await receive_frames(self.clients)
            identity, payload = frames[0], frames[-1]
            try:
                match unpack_request(payload):
                    case Generate() as request:
                        await self._admit(identity, request)
                    case Cancel(id=request_id):
                        self._cancel(identity, request_id, "cancelled by its client")
                    case Info(id=request_id):
                        await self._reply(identity, InfoReply(request_id, self.info()))
            except ClientRequestError as exc:
                log.warning("%s: bad client message: %s", self.name, exc)
                await self._reply(identity, Failed(exc.request_id, str(exc), [], exc.reason))

    async def _admit(self, identity: bytes, request: Generate) -> None:
        """Queue a request whose options are valid, or refuse it at once."""
        options = self._options(request.options, request.id)
        if len(self.jobs) >= self.service.max_queued_requests:
            raise ClientRequestError(
                f"the head is busy: {len(self.jobs)} requests are waiting already (max_queued_requests); "
                "try again later", request.id, reason="busy")
        self.jobs.append(ClientJob(identity, request, options))
        self.job_ready.set()
        # Requests ahead of it: those queued before it, and one running request per missing free slot.
        ahead = len(self.jobs) - 1 + max(0, len(self.serving) - self.service.max_requests + 1)
        await self._reply(identity, Accepted(request.id, ahead))

    def _cancel(self, identity: bytes, request_id: int, reason: str) -> None:
        """Only requests the head holds can be cancelled: nothing to remember for later. A running
        one stops at once: its rows leave the ring and its caches are released."""
        for job in self.serving:
            if (job.identity, job.request.id) == (identity, request_id) and not job.cancelled:
                job.cancelled = reason
                job.task.cancel()
        self.jobs = deque(j for j in self.jobs if (j.identity, j.request.id) != (identity, request_id))

    async def _keep_clients_informed(self) -> None:
        """Every held request hears from the head at least every ALIVE_S; clients that vanished
        leave the queue."""
        while True:
            await asyncio.sleep(ALIVE_S / 2)
            for job in [*self.jobs, *self.serving]:
                if not await self._reply(job.identity, Alive(job.request.id)):
                    self._cancel(job.identity, job.request.id, "its client went away")

    def info(self) -> dict[str, Any]:
        """What the head serves, whether every stage is alive, and its counters (for /health, /metrics and
        `flowspec status`)."""
        now = time.monotonic()
        seen = {name: (now - at if (at := self.watchdog.last_seen.get(name)) is not None else None)
                for name in self.watchdog.stages}
        problem = self.watchdog.problem() or next(
            (f"stage {name} has not sent a heartbeat yet" for name, age in seen.items() if age is None), None)
        return {"model": str(self.model_dir), "stages": self.num_stages, "max_context": self.max_context,
                "defaults": asdict(self.defaults),
                "health": {"ok": problem is None, "problem": problem, "last_heartbeat_s": seen},
                "nodes": node_status(self.name, self.watchdog, self.topology, self.windows),
                "metrics": {**asdict(self.metrics), "queued": len(self.jobs), "running": len(self.serving)}}

    async def _serve(self) -> None:
        while True:
            while not self.jobs or len(self.serving) >= self.service.max_requests:
                self.job_ready.clear()
                await self.job_ready.wait()
            job = self.jobs.popleft()
            job.task = asyncio.ensure_future(self._serve_one(job))
            job.task.add_done_callback(lambda _, job=job: self._served(job))
            self.serving.append(job)

    def _served(self, job: ClientJob) -> None:
        self.serving.remove(job)
        self.job_ready.set()
        if not self.serving:
            return_free_memory()  # between requests: the workers' arenas keep what requests freed

    async def _serve_one(self, job: ClientJob) -> None:
        """Run one request to its end; whatever fails ends this request only, with the tokens it has."""
        stream = TextStream(self.tokenizer)
        stops = StopScanner(job.request.stop or ())
        request_id = job.request.id

        async def on_tokens(ids: list[int]) -> bool:
            if job.cancelled:
                raise Cancelled(job.cancelled)
            if not await self._reply(job.identity, Tokens(request_id, ids, stops.feed(stream.push(ids)))):
                raise Cancelled("its client went away")
            return stops.stopped

        self.metrics.requests += 1
        try:
            if problem := self.watchdog.problem():
                raise RingDown(problem)
            ids = prompt_ids(self.tokenizer, job.request)
            stats = await self.engine.generate(ids, job.options, on_tokens)
            self.metrics.tokens += len(stats.tokens)
            self.metrics.decode_seconds += stats.decode_s
            self.metrics.verifications += stats.verifications
            self.metrics.recoveries += stats.recoveries
            # Text held back for a character that never completed, or for a stop string that did not come.
            if not stops.stopped and (tail := stops.feed(stream.flush()) + stops.flush()):
                await self._reply(job.identity, Tokens(request_id, [], tail))
            await self._reply(job.identity, Done(request_id, stats_summary(stats, len(ids))))
        except (Cancelled, asyncio.CancelledError) as reason:
            if isinstance(reason, asyncio.CancelledError) and not job.cancelled:
                raise  # the head itself is stopping
            self.metrics.requests_cancelled += 1
            log.info("%s: request %d stopped after %d tokens: %s", self.name, request_id, len(stream.ids),
                     job.cancelled or reason)
        except (ClientRequestError, GenerationError) as exc:
            self.metrics.requests_failed += 1
            await self._reply(job.identity, Failed(request_id, str(exc), stream.ids, failure_reason(exc)))
        except Exception as exc:  # a bug or a broken peer must not take the head down with it
            self.metrics.requests_failed += 1
            log.exception("%s: request %d failed", self.name, request_id)
            await self._reply(job.identity, Failed(request_id, f"internal error: {type(exc).__name__}: {exc}", stream.ids))

    def _options(self, overrides: dict[str, Any], request_id: int) -> DecodingConfig:
        try:
            return override_decoding(self.defaults, overrides)
        except TopologyError as exc:
            raise ClientRequestError(str(exc), request_id) from None


def failure_reason(exc: ClientRequestError | GenerationError) -> FailureReason:
    """How the client should take the failure (the HTTP gateway picks its status by it)."""
    match exc:
        case ClientRequestError():
            return exc.reason
        case RequestRejected():
            return "invalid"
        case RingDown():
            return "unavailable"
    return "failed"


def stats_summary(stats: GenerationStats, prompt_tokens: int) -> dict[str, Any]:
    gaps = [b - a for a, b in zip(stats.token_times, stats.token_times[1:])]
    return {
        "prompt_tokens": prompt_tokens,
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
        "draft_steps": stats.draft_steps,
        "verify_batches": stats.verify_batches,
        "seed": stats.seed,
    }

