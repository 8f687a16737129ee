"""The head's decoding loop: prefill, then keep the ring fed with tree segments, verify what comes
back, commit, prune and re-draft. The mode only changes the Strategy, never the loop."""

from __future__ import annotations

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from .draft import DraftContext, DraftSource, TreeShape
from .model_slices import HeadModel
from .protocol import Message, Prune, Release, Segment, StageError
from .sampling import SamplingParams, pick_tokens
from .strategies import Strategy
from .trace import Tracer
from .tree import ROOT_PARENT, Node, TokenTree


ANY_REQUEST = -1  # request id of a failure that concerns whatever request is running


class GenerationError(RuntimeError):
    """The request could not finish; `tokens` holds what was committed before the failure."""

    def __init__(self, message: str, tokens: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.tokens = list(tokens)


class StageFailure(GenerationError):
    """A stage failed, went silent or restarted mid-request: the ring can be re-prefilled."""


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
    prefill_s: float = 0.0
    decode_s: float = 0.0
    token_times: list[float] = field(default_factory=list)  # seconds since decode start, per token
    stop_reason: str = ""
    recoveries: int = 0  # times the ring was re-prefilled after a stage failure

    @property
    def accepted_per_verification(self) -> float:
        return len(self.tokens) / self.verifications if self.verifications else 0.0


Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
OnTokens = Callable[[list[int]], Awaitable[None]]


class Scheduler:
    def __init__(
        self,
        head: HeadModel,
        draft: DraftSource,
        strategy: Strategy,
        tree_shape: TreeShape,
        send: Send,
        receive: Receive,
        max_context: int,
        prefill_chunk: int,
        compute: ThreadPoolExecutor,
        tracer: Tracer,
    ) -> None:
        self.head = head
        self.draft_source = draft
        self.strategy = strategy
        self.tree_shape = tree_shape
        self._send = send
        self._receive = receive
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.compute = compute  # one head thread: model work runs in order, the event loop stays free
        self.tracer = tracer

    async def _run(self, what: str, fn, *args):
        with self.tracer.span(what):
            return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def _send_segment(
        self, stats: GenerationStats, request_id: int, seq: int, commit: bool, tokens: list[int],
        node_ids: list[int], parents: list[int], positions: list[int],
    ) -> None:
        hidden = await self._run("embed", self.head.embed, tokens)
        with self.tracer.span("send", request_id, seq, len(tokens)):
            await self._send(Segment(request_id, seq, commit, tuple(node_ids), tuple(parents), tuple(positions), hidden))
        stats.segments_sent += 1
        stats.rows_sent += len(tokens)
        stats.bytes_sent += hidden.numel() * hidden.element_size()

    async def _next_for(self, request_id: int, committed: Sequence[int]) -> Segment:
        """The next returning segment of this request; failures anywhere become GenerationError."""
        while True:
            message = await self._receive()
            if isinstance(message, StageError) and message.request_id in (request_id, ANY_REQUEST):
                raise StageFailure(f"{message.node}: {message.reason}", committed)
            if isinstance(message, Segment) and message.request_id == request_id:
                return message
            # Prune/Release echoes and leftovers of earlier requests need nothing from us.

    async def generate(self, request_id: int, request: GenerationRequest, on_tokens: OnTokens) -> GenerationStats:
        prompt = list(request.prompt_ids)
        if not prompt:
            raise GenerationError("the prompt is empty")
        if len(prompt) + request.max_new_tokens > self.max_context:
            raise GenerationError(
                f"prompt of {len(prompt)} tokens plus max_new_tokens={request.max_new_tokens} exceeds "
                f"the context of {self.max_context} tokens"
            )
        stats = GenerationStats()
        try:
            await self._decode(request_id, request, prompt, stats, on_tokens)
        finally:
            await self._send(Release(request_id))
        return stats

    async def _prefill(self, request_id: int, request: GenerationRequest, prompt: list[int], stats) -> int:
        start = time.perf_counter()
        chunks = range(0, len(prompt), self.prefill_chunk)
        for seq, begin in enumerate(chunks):
            positions = list(range(begin, min(begin + self.prefill_chunk, len(prompt))))
            tokens = prompt[positions[0] : positions[-1] + 1]
            await self._send_segment(stats, request_id, seq, True, tokens, positions, [ROOT_PARENT] * len(tokens), positions)
        while (returned := await self._next_for(request_id, [])).seq != len(chunks) - 1:
            pass
        logits = await self._run("logits", self.head.logits, returned.hidden)
        stats.prefill_s = time.perf_counter() - start
        return pick_tokens(logits, [len(prompt)], request.sampling)[0]

    def _draft_shape(self, tree: TokenTree) -> TreeShape:
        room = self.max_context - 1 - tree.nodes[tree.root].position
        return TreeShape(min(self.tree_shape.depth, max(room, 0)), self.tree_shape.top_k, self.tree_shape.total_tokens)

    async def _decode(self, request_id, request: GenerationRequest, prompt, stats: GenerationStats, on_tokens) -> None:
        strategy = self.strategy
        first = await self._prefill(request_id, request, prompt, stats)
        decode_start = time.perf_counter()
        committed = prompt + [first]
        stats.tokens.append(first)
        stats.token_times.append(0.0)
        await on_tokens([first])
        if first in request.eos_ids or request.max_new_tokens <= 1:
            stats.stop_reason = "eos" if first in request.eos_ids else "length"
            return
        tree = TokenTree(first, len(prompt))
        in_flight: dict[int, set[int]] = {}  # segment seq -> its nodes still alive
        seqs = itertools.count(1 << 20)
        version = 0
        needs_draft = strategy.uses_draft
        while True:
            if needs_draft:
                draft = await self._run("draft", self.draft_source.draft, DraftContext(committed, self._draft_shape(tree)))
                tree.merge(draft)
                needs_draft = False
            while len(in_flight) < strategy.max_in_flight and (nodes := strategy.cut(tree, len(in_flight))):
                await self._send_nodes(stats, request_id, next(seqs), tree, nodes, in_flight)
            returned = await self._next_for(request_id, stats.tokens)
            in_flight.pop(returned.seq, None)
            await self._take_targets(tree, returned, request.sampling)
            if strategy.verify_when_drained and in_flight:
                continue
            advance = tree.verify()
            if not advance.tokens:
                continue
            stats.verifications += 1
            new_tokens = self._clip(advance.tokens, request, len(stats.tokens))
            committed.extend(new_tokens)
            stats.tokens.extend(new_tokens)
            now = time.perf_counter() - decode_start
            stats.token_times.extend([now] * len(new_tokens))
            await on_tokens(new_tokens)
            if new_tokens[-1] in request.eos_ids or len(stats.tokens) >= request.max_new_tokens:
                stats.stop_reason = "eos" if new_tokens[-1] in request.eos_ids else "length"
                break
            version += 1
            await self._send(Prune(request_id, version, advance.accepted, advance.survivors))
            alive = set(advance.survivors)
            in_flight = {s: nodes & alive for s, nodes in in_flight.items() if nodes & alive}
            fresh_root = not tree.nodes[tree.root].sent
            needs_draft = strategy.uses_draft and (strategy.redraft_after_progress or fresh_root)
        stats.decode_s = time.perf_counter() - decode_start

    async def _send_nodes(self, stats, request_id: int, seq: int, tree: TokenTree, nodes: list[Node], in_flight) -> None:
        tree.mark_sent(nodes)
        in_flight[seq] = {n.id for n in nodes}
        root = tree.root
        await self._send_segment(
            stats, request_id, seq, False,
            [n.token for n in nodes],
            [n.id for n in nodes],
            [ROOT_PARENT if n.id == root else n.parent for n in nodes],
            [n.position for n in nodes],
        )

    async def _take_targets(self, tree: TokenTree, returned: Segment, sampling: SamplingParams) -> None:
        rows = [i for i, node in enumerate(returned.node_ids) if node in tree]
        if not rows:
            return
        live = returned.select(rows)
        logits = await self._run("logits", self.head.logits, live.hidden)
        targets = pick_tokens(logits, [p + 1 for p in live.positions], sampling)
        tree.set_targets(live.node_ids, targets)

    @staticmethod
    def _clip(tokens: Sequence[int], request: GenerationRequest, have: int) -> list[int]:
        """Committed tokens up to the first EOS and within max_new_tokens."""
        out = []
        for token in tokens[: request.max_new_tokens - have]:
            out.append(token)
            if token in request.eos_ids:
                break
        return out
