"""The head's decoding loop: every running request (a Flight) is prefilled, then the ring is kept fed
with pieces of the requests' trees; what comes back is verified, committed, pruned and the trees
grow. The mode only changes a request's Strategy, never the loop.

The loop only decides (vLLM v1's split): model work runs on two workers, each one thread. The draft
worker grows the trees a frontier at a time while segments are in flight, one forward for every
request at once; the verify worker runs one lm_head call over the returned rows of every request
that can decide next tokens (each request's most likely path first). The loop never waits on either
to put a ready message into the ring (embedding is a table lookup, done inline).

Continuous batching: requests join (their prefill chunks enter the ring at once) and leave at any
step; a ring message carries the rows of several requests (a Batch), each request keeping its own
KV cache and tree on every stage. Fairness: the requests that waited longest since their last rows
left take the first share of a message's row budget, the rest goes to the best-scoring nodes of
any request; verification rows are shared the same way."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import torch

from .draft import DraftSource, DraftStep, Frontier, TreeShape
from .model_slices import HeadModel
from .protocol import Batch, Message, Prune, Release, Segment, StageError
from .sampling import SamplingParams, pick_tokens
from .strategies import Strategy
from .trace import Tracer
from .tree import ROOT_PARENT, Node, TokenTree

log = logging.getLogger(__name__)


ANY_REQUEST = -1  # request id of a failure that concerns whatever request is running


class GenerationError(RuntimeError):
    """The request could not finish; `tokens` holds what was committed before the failure."""

    def __init__(self, message: str, tokens: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.tokens = list(tokens)


class StageFailure(GenerationError):
    """A stage failed, went silent or restarted mid-request: the ring can be re-prefilled."""


class RingDown(GenerationError):
    """The ring cannot serve now (a stage is dead, or did not recover): not the request's fault."""


class RequestRejected(GenerationError):
    """The request cannot run as sent (an empty prompt, one too long for the context, or one that
    cannot fit the stages' KV memory)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    eos_ids: frozenset[int]


@dataclass
class GenerationStats:
    tokens: list[int] = field(default_factory=list)
    verifications: int = 0  # verifications that committed at least one token
    segments_sent: int = 0
    rows_sent: int = 0
    bytes_sent: int = 0
    # One request's figures over all its attempts (a recovery re-prefills and goes on): the time to
    # the first token, then decoding from the first token to the last, recoveries included.
    started: float = field(default_factory=time.perf_counter)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    token_times: list[float] = field(default_factory=list)  # seconds since the first token, per token
    stop_reason: str = ""
    recoveries: int = 0  # times the ring was re-prefilled after a stage failure
    draft_steps: int = 0  # draft forwards (one expands up to `width` frontier nodes)
    verify_batches: int = 0  # lm_head calls over returned rows
    stale_proposals: int = 0  # draft children dropped because a prune removed their parent first
    seed: int = 0  # the sampling seed the request used

    @property
    def accepted_per_verification(self) -> float:
        return len(self.tokens) / self.verifications if self.verifications else 0.0



Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
OnTokens = Callable[[list[int]], Awaitable[bool | None]]  # True: stop here (a stop string was reached)


VERIFY_ROWS = 8  # rows per request and lm_head call: about as fast as 1-4 rows on a CPU (memory bound)
VERIFY_BATCH_ROWS = 16  # rows of all requests in one lm_head call: each row costs ~3 ms on a 262k vocabulary


@dataclass(frozen=True)
class HeadWorkers:
    """The head's two compute threads: work on each runs in submission order."""

    draft: ThreadPoolExecutor
    verify: ThreadPoolExecutor

    @staticmethod
    def start() -> HeadWorkers:
        return HeadWorkers(ThreadPoolExecutor(1, thread_name_prefix="head-draft"),
                           ThreadPoolExecutor(1, thread_name_prefix="head-verify"))


@dataclass(frozen=True)
class FlightPlan:
    """How one request decodes: its mode's strategy, tree shape and draft."""

    strategy: Strategy
    shape: TreeShape
    draft: DraftSource | None
    prefill_chunk: int


@dataclass
class Flight:
    """One request's decoding state, owned by the event loop."""

    request_id: int
    request: GenerationRequest
    plan: FlightPlan
    stats: GenerationStats
    on_tokens: OnTokens
    done: asyncio.Future
    prefill_seq: int  # the last prefill chunk's message
    tree: TokenTree | None = None  # None until the prefill's target token is known
    committed: list[int] = field(default_factory=list)
    decode_start: float = 0.0
    first_row: tuple[torch.Tensor, int] | None = None  # the prefill's last row, waiting for its target
    in_flight: dict[int, set[int]] = field(default_factory=dict)  # message seq -> this request's nodes still alive
    # Rows back from the ring whose target is not known yet: node id -> (final hidden state, the
    # position of the token after it).
    returned: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    version: int = 0
    draft_nodes: tuple[Frontier, ...] = ()  # the frontier of the draft step running for it now
    verifying: bool = False
    draft_failure: BaseException | None = None
    last_sent: float = 0.0  # when its rows last entered the ring (fairness)
    last_verified: float = 0.0
    last_progress: float = field(default_factory=time.monotonic)  # the ring last answered it (or it began)

    @property
    def decoding(self) -> bool:
        return self.tree is not None

    @property
    def awaits_ring(self) -> bool:
        return bool(self.in_flight) or (self.tree is None and self.first_row is None and not self.verifying)


@dataclass(frozen=True)
class VerifyJob:
    flight: Flight
    node_ids: list[int]  # empty: the prefill's last row
    positions: list[int]


class Scheduler:
    """One per head: runs every admitted request's flight on the ring."""

    def __init__(
        self,
        head: HeadModel,
        send: Send,
        receive: Receive,
        max_context: int,
        workers: HeadWorkers,
        tracer: Tracer,
        num_stages: int,
        max_batch_rows: int = 48,
        progress_timeout_s: float = 20.0,
    ) -> None:
        self.head = head
        self._send = send
        self._receive = receive
        self.max_context = max_context
        self.workers = workers
        self.tracer = tracer
        self.num_stages = num_stages  # ring messages in flight at once, at most
        self.max_batch_rows = max_batch_rows
        self.progress_timeout_s = progress_timeout_s
        self.flights: dict[int, Flight] = {}
        self.seqs = itertools.count(1)
        self.wake = asyncio.Event()  # a request joined or left
        self.loop_task: asyncio.Task | None = None
        self.drafting: tuple[asyncio.Future, list[Flight]] | None = None
        self.verifying: tuple[asyncio.Future, list[VerifyJob]] | None = None

    # -- requests joining and leaving --------------------------------------------------------------
    def check(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if not prompt_tokens:
            raise RequestRejected("the prompt is empty")
        if prompt_tokens + max_new_tokens > self.max_context:
            raise RequestRejected(
                f"prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} exceeds "
                f"the context of {self.max_context} tokens"
            )

    async def generate(self, request_id: int, request: GenerationRequest, plan: FlightPlan, on_tokens: OnTokens,
                       stats: GenerationStats | None = None) -> GenerationStats:
        """Decode `request` beside the others; `stats` of an earlier attempt of the same request add up."""
        prompt = list(request.prompt_ids)
        self.check(len(prompt), request.max_new_tokens)
        stats = stats or GenerationStats()
        flight = Flight(request_id, request, plan, stats, on_tokens, asyncio.get_running_loop().create_future(),
                        prefill_seq=-1, committed=prompt)
        if plan.draft is not None:
            self._draft_update(flight, plan.draft.begin, request_id, list(prompt))  # beside the target's prefill
        try:
            await self._prefill(flight)
            self.flights[request_id] = flight
            flight.last_progress = time.monotonic()
            self.wake.set()
            if self.loop_task is None or self.loop_task.done():
                self.loop_task = asyncio.ensure_future(self._run())
            await flight.done
        finally:
            self._leave(flight)
            if plan.draft is not None:
                self._draft_update(flight, plan.draft.end, request_id)
            await self._send(Release(request_id))
        return stats

    def _leave(self, flight: Flight, error: BaseException | None = None) -> None:
        if self.flights.get(flight.request_id) is flight:
            del self.flights[flight.request_id]
            self.wake.set()
        if not flight.done.done():
            if error is None:
                flight.done.set_result(None)
            else:
                flight.done.set_exception(error)

    async def _prefill(self, flight: Flight) -> None:
        prompt, chunk = flight.committed, flight.plan.prefill_chunk
        for begin in range(0, len(prompt), chunk):
            positions = list(range(begin, min(begin + chunk, len(prompt))))
            flight.prefill_seq = next(self.seqs)
            segment = self._segment(flight, flight.prefill_seq, True, prompt[begin : positions[-1] + 1], positions,
                                    [ROOT_PARENT] * len(positions), positions)
            await self._send(segment)

    # -- the loop ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        receiving = asyncio.ensure_future(self._receive())
        woken = asyncio.ensure_future(self.wake.wait())
        try:
            while self.flights:
                self.wake.clear()
                for flight in list(self.flights.values()):
                    if flight.draft_failure is not None:
                        self._leave(flight, GenerationError(f"the draft failed: {flight.draft_failure!r}", flight.stats.tokens))
                self._start_draft_step()
                await self._feed()
                self._start_verification()
                if woken.done():
                    woken = asyncio.ensure_future(self.wake.wait())
                waiting = [receiving, woken, *(job[0] for job in (self.drafting, self.verifying) if job is not None)]
                done, _ = await asyncio.wait(waiting, timeout=self._silence_left(), return_when=asyncio.FIRST_COMPLETED)
                if receiving in done:
                    self._route(receiving.result())
                    receiving = asyncio.ensure_future(self._receive())
                if self.drafting is not None and self.drafting[0] in done:
                    self._grow(*self.drafting)
                if self.verifying is not None and self.verifying[0] in done:
                    await self._apply_verification(*self.verifying)
                self._fail_silent_flights()
        except Exception as exc:  # a bug must end the requests with an error, never leave them hanging
            log.exception("the scheduler failed")
            for flight in list(self.flights.values()):
                self._leave(flight, GenerationError(f"internal error: {type(exc).__name__}: {exc}", flight.stats.tokens))
        finally:
            receiving.cancel()
            woken.cancel()
            for job in (self.drafting, self.verifying):
                if job is not None:  # finishing on its worker; nobody needs its result
                    job[0].add_done_callback(lambda f: f.cancelled() or f.exception())
            self.drafting = self.verifying = None
            for flight in self.flights.values():
                flight.draft_nodes, flight.verifying = (), False

    def _silence_left(self) -> float | None:
        """Seconds until some request's ring silence counts as a failure; None while none waits on the ring."""
        waiting = [f.last_progress for f in self.flights.values() if f.awaits_ring]
        return max(0.0, min(waiting) + self.progress_timeout_s - time.monotonic()) if waiting else None

    def _fail_silent_flights(self) -> None:
        """A request with rows in the ring heard nothing back for progress_timeout_s: the ring lost a
        message (dropped as invalid, a dead sender), a failure to recover from, not a hang."""
        now = time.monotonic()
        for flight in list(self.flights.values()):
            if flight.awaits_ring and now - flight.last_progress > self.progress_timeout_s:
                self._leave(flight, StageFailure(
                    f"nothing came back from the ring for {self.progress_timeout_s:g} s", flight.stats.tokens))

    def _route(self, message: Message) -> None:
        match message:
            case StageError() if message.request_id == ANY_REQUEST:
                for flight in list(self.flights.values()):
                    self._leave(flight, StageFailure(f"{message.node}: {message.reason}", flight.stats.tokens))
            case StageError():
                if (flight := self.flights.get(message.request_id)) is not None:
                    self._leave(flight, StageFailure(f"{message.node}: {message.reason}", flight.stats.tokens))
            case Segment():
                self._returned(message)
            case Batch():
                for part in message.parts:
                    self._returned(part)
            # Prune/Release echoes and leftovers of earlier requests need nothing from us.

    def _returned(self, segment: Segment) -> None:
        flight = self.flights.get(segment.request_id)
        if flight is None:
            return
        flight.last_progress = time.monotonic()
        width = self.head.embed_tokens.embedding_dim
        if segment.hidden.shape[1] != width:
            self._leave(flight, GenerationError(f"the ring returned hidden states {segment.hidden.shape[1]} wide; the "
                                                f"model's are {width}", flight.stats.tokens))
        elif segment.commit:
            if segment.seq == flight.prefill_seq:
                flight.first_row = (segment.hidden[-1], len(flight.committed))
        else:
            flight.in_flight.pop(segment.seq, None)
            for hidden, node, position in zip(segment.hidden, segment.node_ids, segment.positions):
                if node in flight.tree:
                    flight.returned[node] = (hidden, position + 1)

    def _on(self, executor: ThreadPoolExecutor, what: str, fn: Callable[..., Any], *args) -> asyncio.Future:
        def traced():
            with self.tracer.span(what):
                return fn(*args)

        return asyncio.wrap_future(executor.submit(traced))

    def _draft_update(self, flight: Flight, fn: Callable[..., None], *args) -> None:
        """Queue draft bookkeeping (begin/advance/end) in order with the draft steps; a failure stops
        the request at the next loop turn instead of corrupting later proposals."""

        def check(future: Future) -> None:
            if future.exception() is not None:
                flight.draft_failure = future.exception()

        self.workers.draft.submit(fn, *args).add_done_callback(check)

    # -- feeding the ring --------------------------------------------------------------------------
    def _segment(self, flight: Flight, seq: int, commit: bool, tokens: list[int], node_ids: list[int],
                 parents: list[int], positions: list[int]) -> Segment:
        hidden = self.head.embed(tokens).cpu()  # the wire carries host memory
        stats = flight.stats
        stats.segments_sent += 1
        stats.rows_sent += len(tokens)
        stats.bytes_sent += hidden.numel() * hidden.element_size()
        return Segment(flight.request_id, seq, commit, tuple(node_ids), tuple(parents), tuple(positions), hidden)

    def _draft_settled(self, flight: Flight) -> bool:
        """The tree will not grow right now: no draft step runs for it and none could start."""
        return flight.plan.draft is None or (not flight.draft_nodes and not self._frontier(flight))

    def _candidate(self, flight: Flight) -> tuple[list[Node], bool]:
        """The nodes this request could send now, and whether they are worth a message of their own."""
        strategy = flight.plan.strategy
        if not flight.decoding or len(flight.in_flight) >= strategy.max_in_flight:
            return [], False
        if strategy.send_when_settled and not self._draft_settled(flight):
            return [], False
        if any(f.node_id == flight.tree.root for f in flight.draft_nodes):
            return [], False  # a fresh root travels with its first children, a draft step from now
        nodes = strategy.cut(flight.tree, len(flight.in_flight))
        # A short segment costs a stage step like a full one, and the draft may still deepen the
        # tree: it is worth a message only when full, when the draft has nothing to add, or to an
        # idle request; otherwise it only rides along with others.
        worth = bool(nodes) and (len(nodes) >= strategy.full_segment or not flight.in_flight
                                 or self._draft_settled(flight))
        return nodes, worth

    async def _feed(self) -> None:
        while len({seq for f in self.flights.values() for seq in f.in_flight}) < self.num_stages:
            candidates = [(f, *self._candidate(f)) for f in self.flights.values()]
            candidates = [(f, nodes) for f, nodes, _ in candidates if nodes] if any(w for *_, w in candidates) else []
            if not candidates:
                return
            await self._send_batch(self._share(candidates, self.max_batch_rows))

    @staticmethod
    def _share(candidates: list[tuple[Flight, list[Node]]], budget: int) -> list[tuple[Flight, list[Node]]]:
        """Split a message's row budget: the longest-waiting requests first take an equal share, then
        the best-scoring remaining nodes of any request (each request's nodes stay in cut order,
        which lists parents first)."""
        candidates.sort(key=lambda c: c[0].last_sent)
        share = max(1, budget // len(candidates))
        taken = [nodes[:share] for _, nodes in candidates]
        budget -= sum(map(len, taken))
        heads = [(-nodes[len(t)].score, i) for i, ((_, nodes), t) in enumerate(zip(candidates, taken)) if len(nodes) > len(t)]
        heapq.heapify(heads)
        while budget > 0 and heads:
            _, i = heapq.heappop(heads)
            nodes = candidates[i][1]
            taken[i].append(nodes[len(taken[i])])
            budget -= 1
            if len(nodes) > len(taken[i]):
                heapq.heappush(heads, (-nodes[len(taken[i])].score, i))
        return [(flight, t) for (flight, _), t in zip(candidates, taken) if t]

    async def _send_batch(self, parts: list[tuple[Flight, list[Node]]]) -> None:
        seq = next(self.seqs)
        now = time.monotonic()
        segments = []
        for flight, nodes in parts:
            tree = flight.tree
            tree.mark_sent(nodes)
            if not flight.in_flight:
                flight.last_progress = now  # its silence counts from here
            flight.in_flight[seq] = {n.id for n in nodes}
            flight.last_sent = now
            segments.append(self._segment(
                flight, seq, False, [n.token for n in nodes], [n.id for n in nodes],
                [ROOT_PARENT if n.id == tree.root else n.parent for n in nodes], [n.position for n in nodes]))
        rows = sum(len(nodes) for _, nodes in parts)
        with self.tracer.span("send", segments[0].request_id, seq, rows):
            await self._send(segments[0] if len(segments) == 1 else Batch(tuple(segments)))

    # -- drafting ----------------------------------------------------------------------------------
    def _frontier(self, flight: Flight) -> list[Frontier]:
        """The next nodes to expand, EAGLE-2's beam kept incrementally: at every depth only the
        `width` best nodes are ever expanded, and only while they could still improve a full tree.
        A verification that commits k tokens shifts every depth up by k, so about k steps follow."""
        tree, shape = flight.tree, flight.plan.shape
        if flight.draft_nodes or tree is None:
            return []
        floor = tree.expansion_floor(shape.total_tokens)
        last_position = self.max_context - 2  # a child must still fit in the context
        by_depth: dict[int, list[Node]] = {}
        for node in tree.nodes.values():
            if node.depth < shape.depth and node.target is None:
                by_depth.setdefault(node.depth, []).append(node)
        candidates = []
        for nodes in by_depth.values():
            nodes.sort(key=lambda n: (-n.score, n.id))
            candidates += [n for n in nodes[: shape.width]
                           if not n.expanded and n.score > floor and n.position <= last_position]
        candidates.sort(key=lambda n: (-n.score, n.depth, n.id))
        return [
            Frontier(n.id, ROOT_PARENT if n.id == tree.root else n.parent, n.position,
                     (tree.nodes[tree.root].token, *tree.path_tokens(n.id)))
            for n in candidates[: shape.width]
        ]

    def _start_draft_step(self) -> None:
        """One draft forward for every request of one draft source that has nodes to expand."""
        if self.drafting is not None:
            return
        groups: dict[int, list[tuple[Flight, list[Frontier]]]] = {}
        for flight in self.flights.values():
            draft = flight.plan.draft
            if draft is None or (flight.in_flight and not flight.plan.strategy.draft_while_in_flight):
                continue
            if frontier := self._frontier(flight):
                groups.setdefault(id(draft), []).append((flight, frontier))
        if not groups:
            return
        group = next(iter(groups.values()))
        for flight, frontier in group:
            flight.draft_nodes = tuple(frontier)
            flight.stats.draft_steps += 1
        steps = [DraftStep(f.request_id, frontier, f.plan.shape.top_k) for f, frontier in group]
        future = self._on(self.workers.draft, "draft", group[0][0].plan.draft.expand, steps)
        self.drafting = (future, [flight for flight, _ in group])

    def _grow(self, future: asyncio.Future, flights: list[Flight]) -> None:
        self.drafting = None
        try:
            proposals = future.result()
        except Exception as exc:  # these requests stop at the next turn; the others go on
            for flight in flights:
                flight.draft_nodes, flight.draft_failure = (), exc
            return
        for flight, children in zip(flights, proposals):
            frontier, flight.draft_nodes = flight.draft_nodes, ()
            if self.flights.get(flight.request_id) is not flight:
                continue
            added = flight.tree.add_proposals(
                [(f.node_id, kids) for f, kids in zip(frontier, children)], budget=flight.plan.shape.total_tokens)
            flight.stats.stale_proposals += added.stale

    # -- verification --------------------------------------------------------------------------------
    def _start_verification(self) -> None:
        if self.verifying is not None:
            return
        ready = [f for f in self.flights.values()
                 if f.first_row is not None or (f.returned and not (f.plan.strategy.verify_when_drained and f.in_flight))]
        if not ready:
            return
        ready.sort(key=lambda f: f.last_verified)
        per_request = max(2, min(VERIFY_ROWS, VERIFY_BATCH_ROWS // len(ready)))
        # Alone, rows off the likely path cost nothing extra (the lm_head reads its weights once for
        # a few rows); shared, every row costs ~3 ms, so each request sends only its likely path.
        off_path = len(ready) == 1
        jobs, rows = [], []
        for flight in ready:
            if flight.first_row is not None:
                hidden, position = flight.first_row
                flight.first_row = None
                jobs.append(VerifyJob(flight, [], [position]))
                rows.append(hidden)
                continue
            node_ids = self._rows_to_verify(flight, per_request, off_path)
            if not node_ids:
                continue
            taken = [flight.returned.pop(node) for node in node_ids]
            jobs.append(VerifyJob(flight, node_ids, [position for _, position in taken]))
            rows += [hidden for hidden, _ in taken]
            flight.stats.verify_batches += 1
        if not jobs:
            return
        for job in jobs:
            job.flight.verifying = True
        future = self._on(self.workers.verify, "logits", self._targets, torch.stack(rows),
                          [(job.positions, job.flight.request.sampling) for job in jobs])
        self.verifying = (future, jobs)

    def _targets(self, hidden: torch.Tensor, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
        """The target's tokens after every row: one full-vocabulary lm_head call for all requests."""
        logits = self.head.logits(hidden)
        picks, start = [], 0
        for positions, sampling in requests:
            picks.append(pick_tokens(logits[start : start + len(positions)], positions, sampling))
            start += len(positions)
        return picks

    @staticmethod
    def _rows_to_verify(flight: Flight, limit: int, off_path: bool) -> list[int]:
        """Rows for one lm_head call: the path the draft finds most likely (from the root, through
        the best returned child at each level), then (`off_path`) other returned rows by score, up
        to `limit`.
        Only the verification walk reads targets; rows it does not reach stay waiting and are
        usually pruned before they would cost anything."""
        tree, waiting = flight.tree, flight.returned
        path: list[int] = []
        node = tree.nodes[tree.root]
        while node.id in waiting:
            path.append(node.id)
            children = [tree.nodes[c] for c in node.children.values() if c in waiting]
            if not children:
                break
            node = max(children, key=lambda n: n.score)
        if not path:  # the root is still in flight: nothing below it can be judged yet
            return []
        others = sorted((n for n in waiting if n not in path), key=lambda n: -tree.nodes[n].score) if off_path else []
        return (path + others)[:limit]

    async def _apply_verification(self, future: asyncio.Future, jobs: list[VerifyJob]) -> None:
        self.verifying = None
        now = time.monotonic()
        for job, targets in zip(jobs, future.result()):
            flight = job.flight
            flight.verifying = False
            flight.last_verified = now
            if self.flights.get(flight.request_id) is not flight:
                continue
            try:
                finished = await (self._commit(flight, job.node_ids, targets) if job.node_ids
                                  else self._first_token(flight, targets[0]))
            except Exception as exc:  # the client's stream failed (gone, cancelled): this request ends
                self._leave(flight, exc)
                continue
            if finished:
                self._leave(flight)

    async def _first_token(self, flight: Flight, first: int) -> bool:
        """The prefill's target token; True when the request is finished."""
        stats, request = flight.stats, flight.request
        if not stats.tokens:
            stats.prefill_s = time.perf_counter() - stats.started
        flight.decode_start = stats.started + stats.prefill_s
        stats.tokens.append(first)
        stats.token_times.append(time.perf_counter() - flight.decode_start)
        if await flight.on_tokens([first]):
            return self._stopped(flight, "stop")
        if first in request.eos_ids or request.max_new_tokens <= 1:
            return self._stopped(flight, "eos" if first in request.eos_ids else "length")
        flight.tree = TokenTree(first, len(flight.committed))
        flight.committed.append(first)
        return False

    def _stopped(self, flight: Flight, reason: str) -> bool:
        flight.stats.stop_reason = reason
        flight.stats.decode_s = time.perf_counter() - flight.decode_start
        return True

    async def _commit(self, flight: Flight, node_ids: list[int], targets: list[int]) -> bool:
        """Apply a verification; True when the request is finished."""
        tree, request, stats = flight.tree, flight.request, flight.stats
        tree.set_targets(node_ids, targets)
        advance = tree.verify()
        flight.returned = {n: row for n, row in flight.returned.items() if n in tree}
        if not advance.tokens:
            return False
        stats.verifications += 1
        produced = len(flight.committed) - len(request.prompt_ids)  # by this attempt
        new_tokens = self._clip(advance.tokens, request, produced)
        flight.committed.extend(new_tokens)
        stats.tokens.extend(new_tokens)
        now = time.perf_counter() - flight.decode_start
        stats.token_times.extend([now] * len(new_tokens))
        if await flight.on_tokens(new_tokens):
            return self._stopped(flight, "stop")
        if new_tokens[-1] in request.eos_ids or produced + len(new_tokens) >= request.max_new_tokens:
            return self._stopped(flight, "eos" if new_tokens[-1] in request.eos_ids else "length")
        flight.version += 1
        await self._send(Prune(flight.request_id, flight.version, advance.accepted, advance.survivors))
        alive = set(advance.survivors)
        flight.in_flight = {s: nodes & alive for s, nodes in flight.in_flight.items() if nodes & alive}
        if flight.plan.draft is not None:
            self._draft_update(flight, flight.plan.draft.advance, flight.request_id, advance.accepted,
                               frozenset(tree.nodes), list(flight.committed))
        return False

    @staticmethod
    def _clip(tokens: Sequence[int], request: GenerationRequest, have: int) -> list[int]:
        """Committed tokens up to the first EOS and within max_new_tokens."""
        out = []
        for token in tokens[: request.max_new_tokens - have]:
            out.append(token)
            if token in request.eos_ids:
                break
        return out
