"""The head's decoding loop: prefill, then keep the ring fed with tree segments, verify what comes
back, commit, prune and grow the tree. The mode only changes the Strategy, never the loop.

The loop only decides (vLLM v1's split): model work runs on two workers, each one thread. The draft
worker grows the tree a frontier at a time while segments are in flight; the verify worker runs one
lm_head call over the returned rows that can decide the next tokens (the draft's most likely path
first). The loop never waits on either to put a ready segment into the ring (embedding a segment
is a table lookup, done inline)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import torch

from .draft import DraftSource, Frontier, Proposals, TreeShape
from .model_slices import HeadModel
from .protocol import Message, Prune, Release, Segment, StageError
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
    """The request cannot run as sent (an empty prompt, or one too long for the context)."""


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


VERIFY_ROWS = 8  # rows per lm_head call: about as fast as 1-4 rows on a CPU (memory bound), far cheaper than 32


@dataclass(frozen=True)
class HeadWorkers:
    """The head's two compute threads: work on each runs in submission order."""

    draft: ThreadPoolExecutor
    verify: ThreadPoolExecutor

    @staticmethod
    def start() -> HeadWorkers:
        return HeadWorkers(ThreadPoolExecutor(1, thread_name_prefix="head-draft"),
                           ThreadPoolExecutor(1, thread_name_prefix="head-verify"))


@dataclass
class Flight:
    """One request's decoding state, owned by the event loop."""

    tree: TokenTree
    committed: list[int]
    in_flight: dict[int, set[int]] = field(default_factory=dict)  # segment seq -> its nodes still alive
    # Rows back from the ring whose target is not known yet: node id -> (final hidden state, the
    # position of the token after it).
    returned: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    version: int = 0
    drafting: asyncio.Future | None = None  # the draft step running now
    draft_nodes: tuple[Frontier, ...] = ()  # its frontier
    verifying: asyncio.Future | None = None  # the verification running now
    verify_rows: tuple[list[int], list[int]] = ((), ())  # its node ids and next positions
    draft_failure: BaseException | None = None


class Scheduler:
    def __init__(
        self,
        head: HeadModel,
        draft: DraftSource | None,
        strategy: Strategy,
        tree_shape: TreeShape,
        send: Send,
        receive: Receive,
        max_context: int,
        prefill_chunk: int,
        workers: HeadWorkers,
        tracer: Tracer,
        progress_timeout_s: float = 20.0,
    ) -> None:
        self.head = head
        self.draft = draft if strategy.uses_draft else None
        self.strategy = strategy
        self.tree_shape = tree_shape
        self._send = send
        self._receive = receive
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.workers = workers
        self.tracer = tracer
        self.progress_timeout_s = progress_timeout_s

    def _on(self, executor: ThreadPoolExecutor, what: str, fn: Callable[..., Any], *args) -> asyncio.Future:
        def traced():
            with self.tracer.span(what):
                return fn(*args)

        return asyncio.wrap_future(executor.submit(traced))

    def _targets(self, hidden: torch.Tensor, next_positions: list[int], sampling: SamplingParams) -> list[int]:
        """The target's tokens after every row: one full-vocabulary lm_head call for all of them."""
        return pick_tokens(self.head.logits(hidden), next_positions, sampling)

    def _draft_update(self, flight: Flight, fn: Callable[..., None], *args) -> None:
        """Queue draft bookkeeping (begin/advance) in order with the draft steps; a failure stops
        the request at the next loop turn instead of corrupting later proposals."""

        def check(future: Future) -> None:
            if future.exception() is not None:
                flight.draft_failure = future.exception()

        self.workers.draft.submit(fn, *args).add_done_callback(check)

    async def _send_segment(
        self, stats: GenerationStats, request_id: int, seq: int, commit: bool, tokens: list[int],
        node_ids: list[int], parents: list[int], positions: list[int],
    ) -> None:
        with self.tracer.span("send", request_id, seq, len(tokens)):
            hidden = self.head.embed(tokens)
            await self._send(Segment(request_id, seq, commit, tuple(node_ids), tuple(parents), tuple(positions), hidden))
        stats.segments_sent += 1
        stats.rows_sent += len(tokens)
        stats.bytes_sent += hidden.numel() * hidden.element_size()

    async def _next_for(self, request_id: int, committed: Sequence[int]) -> Segment:
        """The next returning segment of this request; failures anywhere become GenerationError.
        The loop only waits for this while segments are in flight, so a long silence means the ring
        lost a message (dropped as invalid, a dead sender): a failure to recover from, not a hang."""
        deadline = time.monotonic() + self.progress_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(self._receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise StageFailure(f"nothing came back from the ring for {self.progress_timeout_s:g} s",
                                   committed) from None
            if isinstance(message, StageError) and message.request_id in (request_id, ANY_REQUEST):
                raise StageFailure(f"{message.node}: {message.reason}", committed)
            if isinstance(message, Segment) and message.request_id == request_id:
                if message.hidden.shape[1] != self.head.embed_tokens.embedding_dim:
                    raise GenerationError(f"the ring returned hidden states {message.hidden.shape[1]} wide; the "
                                          f"model's are {self.head.embed_tokens.embedding_dim}", committed)
                return message
            # Prune/Release echoes and leftovers of earlier requests need nothing from us.

    async def generate(self, request_id: int, request: GenerationRequest, on_tokens: OnTokens,
                       stats: GenerationStats | None = None) -> GenerationStats:
        """Decode `request`; `stats` of an earlier attempt of the same request add up."""
        prompt = list(request.prompt_ids)
        if not prompt:
            raise RequestRejected("the prompt is empty")
        if len(prompt) + request.max_new_tokens > self.max_context:
            raise RequestRejected(
                f"prompt of {len(prompt)} tokens plus max_new_tokens={request.max_new_tokens} exceeds "
                f"the context of {self.max_context} tokens"
            )
        stats = stats or GenerationStats()
        try:
            await self._decode(request_id, request, prompt, stats, on_tokens)
        finally:
            await self._send(Release(request_id))
        return stats

    async def _prefill(self, request_id: int, request: GenerationRequest, prompt: list[int], stats) -> int:
        chunks = range(0, len(prompt), self.prefill_chunk)
        for seq, begin in enumerate(chunks):
            positions = list(range(begin, min(begin + self.prefill_chunk, len(prompt))))
            tokens = prompt[positions[0] : positions[-1] + 1]
            await self._send_segment(stats, request_id, seq, True, tokens, positions, [ROOT_PARENT] * len(tokens), positions)
        while (returned := await self._next_for(request_id, [])).seq != len(chunks) - 1:
            pass
        targets = await self._on(self.workers.verify, "logits", self._targets,
                                 returned.hidden[-1:], [len(prompt)], request.sampling)
        return targets[0]

    async def _decode(self, request_id, request: GenerationRequest, prompt, stats: GenerationStats, on_tokens) -> None:
        flight = Flight(TokenTree(0, len(prompt)), prompt)  # the real root comes out of the prefill
        if self.draft is not None:
            self._draft_update(flight, self.draft.begin, list(prompt))  # beside the target's prefill
        first = await self._prefill(request_id, request, prompt, stats)
        if not stats.tokens:
            stats.prefill_s = time.perf_counter() - stats.started
        decode_start = stats.started + stats.prefill_s
        stats.tokens.append(first)
        stats.token_times.append(time.perf_counter() - decode_start)
        if await on_tokens([first]):
            stats.stop_reason = "stop"
            return
        if first in request.eos_ids or request.max_new_tokens <= 1:
            stats.stop_reason = "eos" if first in request.eos_ids else "length"
            return
        flight = Flight(TokenTree(first, len(prompt)), prompt + [first], draft_failure=flight.draft_failure)
        seqs = itertools.count(1 << 20)
        receiving = asyncio.ensure_future(self._next_for(request_id, stats.tokens))
        try:
            while True:
                if flight.draft_failure is not None:
                    raise GenerationError(f"the draft failed: {flight.draft_failure!r}", stats.tokens)
                self._start_draft_step(flight, stats)
                await self._feed(flight, stats, request_id, seqs)
                self._start_verification(flight, request.sampling, stats)
                waiting = [f for f in (receiving, flight.drafting, flight.verifying) if f is not None]
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if receiving in done:
                    returned = receiving.result()
                    receiving = asyncio.ensure_future(self._next_for(request_id, stats.tokens))
                    flight.in_flight.pop(returned.seq, None)
                    for hidden, node, position in zip(returned.hidden, returned.node_ids, returned.positions):
                        if node in flight.tree:
                            flight.returned[node] = (hidden, position + 1)
                if flight.drafting in done:
                    self._grow(flight, flight.drafting.result(), stats)
                if flight.verifying in done:
                    if await self._commit(flight, flight.verifying.result(), request, request_id, stats,
                                          decode_start, on_tokens):
                        break
        finally:
            receiving.cancel()
            for future in (flight.drafting, flight.verifying):
                if future is not None:  # finishing on its worker; nobody needs its result
                    future.add_done_callback(lambda f: f.cancelled() or f.exception())
        stats.decode_s = time.perf_counter() - decode_start

    # -- feeding the ring ----------------------------------------------------------------------------
    def _draft_settled(self, flight: Flight) -> bool:
        """The tree will not grow right now: no draft step runs and none could start."""
        return self.draft is None or (flight.drafting is None and not self._frontier(flight))

    async def _feed(self, flight: Flight, stats: GenerationStats, request_id: int, seqs) -> None:
        strategy = self.strategy
        while len(flight.in_flight) < strategy.max_in_flight:
            if strategy.send_when_settled and not self._draft_settled(flight):
                return
            if any(f.node_id == flight.tree.root for f in flight.draft_nodes):
                return  # a fresh root travels with its first children, a draft step from now
            nodes = strategy.cut(flight.tree, len(flight.in_flight))
            # A short segment costs a stage step like a full one, and the draft may still deepen the
            # tree: send it only when full, when the draft has nothing to add, or to an idle ring.
            if not nodes or not (len(nodes) >= strategy.full_segment or not flight.in_flight
                                 or self._draft_settled(flight)):
                return
            await self._send_nodes(stats, request_id, next(seqs), flight, nodes)

    async def _send_nodes(self, stats, request_id: int, seq: int, flight: Flight, nodes: list[Node]) -> None:
        tree = flight.tree
        tree.mark_sent(nodes)
        flight.in_flight[seq] = {n.id for n in nodes}
        await self._send_segment(
            stats, request_id, seq, False,
            [n.token for n in nodes],
            [n.id for n in nodes],
            [ROOT_PARENT if n.id == tree.root else n.parent for n in nodes],
            [n.position for n in nodes],
        )

    # -- drafting ----------------------------------------------------------------------------------
    def _frontier(self, flight: Flight) -> list[Frontier]:
        """The next nodes to expand, EAGLE-2's beam kept incrementally: at every depth only the
        `width` best nodes are ever expanded, and only while they could still improve a full tree.
        A verification that commits k tokens shifts every depth up by k, so about k steps follow."""
        tree, shape = flight.tree, self.tree_shape
        if flight.drafting is not None:
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

    def _start_draft_step(self, flight: Flight, stats: GenerationStats) -> None:
        if self.draft is None or flight.drafting is not None:
            return
        if flight.in_flight and not self.strategy.draft_while_in_flight:
            return
        frontier = self._frontier(flight)
        if not frontier:
            return
        flight.draft_nodes = tuple(frontier)
        flight.drafting = self._on(self.workers.draft, "draft", self.draft.expand, frontier, self.tree_shape.top_k)
        stats.draft_steps += 1

    def _grow(self, flight: Flight, proposals: Proposals, stats: GenerationStats) -> None:
        frontier, flight.drafting, flight.draft_nodes = flight.draft_nodes, None, ()
        added = flight.tree.add_proposals(
            [(f.node_id, children) for f, children in zip(frontier, proposals)],
            budget=self.tree_shape.total_tokens,
        )
        stats.stale_proposals += added.stale

    # -- verification --------------------------------------------------------------------------------
    def _start_verification(self, flight: Flight, sampling: SamplingParams, stats: GenerationStats) -> None:
        if flight.verifying is not None or not flight.returned:
            return
        if self.strategy.verify_when_drained and flight.in_flight:
            return
        node_ids = self._rows_to_verify(flight)
        if not node_ids:
            return
        rows = [flight.returned.pop(node) for node in node_ids]
        flight.verify_rows = (node_ids, [position for _, position in rows])
        flight.verifying = self._on(self.workers.verify, "logits", self._targets,
                                    torch.stack([hidden for hidden, _ in rows]), flight.verify_rows[1], sampling)
        stats.verify_batches += 1

    def _rows_to_verify(self, flight: Flight) -> list[int]:
        """Rows for one lm_head call: the path the draft finds most likely (from the root, through
        the best returned child at each level), then other returned rows by score, up to
        VERIFY_ROWS. Only the verification walk reads targets; rows it does not reach stay
        waiting and are usually pruned before they would cost anything."""
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
        others = sorted((n for n in waiting if n not in path), key=lambda n: -tree.nodes[n].score)
        return (path + others)[:VERIFY_ROWS]

    async def _commit(self, flight: Flight, targets: list[int], request: GenerationRequest, request_id: int,
                      stats: GenerationStats, decode_start: float, on_tokens: OnTokens) -> bool:
        """Apply a verification; True when the request is finished."""
        (node_ids, _), flight.verifying, flight.verify_rows = flight.verify_rows, None, ((), ())
        tree = flight.tree
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
        now = time.perf_counter() - decode_start
        stats.token_times.extend([now] * len(new_tokens))
        if await on_tokens(new_tokens):
            stats.stop_reason = "stop"
            return True
        if new_tokens[-1] in request.eos_ids or produced + len(new_tokens) >= request.max_new_tokens:
            stats.stop_reason = "eos" if new_tokens[-1] in request.eos_ids else "length"
            return True
        flight.version += 1
        await self._send(Prune(request_id, flight.version, advance.accepted, advance.survivors))
        alive = set(advance.survivors)
        flight.in_flight = {s: nodes & alive for s, nodes in flight.in_flight.items() if nodes & alive}
        if self.draft is not None:
            self._draft_update(flight, self.draft.advance, advance.accepted, frozenset(tree.nodes),
                               list(flight.committed))
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
