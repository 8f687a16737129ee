"""A stage node: a window of decoder layers in the ring.

Three coroutines joined by queues overlap the work: `_receive` decodes input (and applies a prune
to inputs still queued), `_compute` runs one message at a time on a worker thread (torch releases
the GIL), `_send` ships results downstream. Messages are handled in arrival order, which is the
head's sending order, so a prune always lands after the segments it refers to. A batch (segments
of several requests) runs as one forward pass; a part that does not fit its request's cache fails
alone, with a StageError for that request, and the other parts go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

import torch

from .emulation import DeviceProfile, pace
from .kv_cache import TreeKVCache
from .model_slices import LayerWindow, PartPlan, WindowPart
from .protocol import Batch, Message, Prune, Release, Segment, StageError
from .trace import Tracer
from .transport import RingLink

log = logging.getLogger(__name__)


class StageNode:
    def __init__(
        self,
        name: str,
        window: LayerWindow,
        link: RingLink,
        is_last: bool,
        max_context: int,
        tracer: Tracer,
        profile: DeviceProfile | None = None,
        max_open_caches: int = 64,
        max_kv_bytes: int = 1 << 62,
    ) -> None:
        self.name = name
        self.max_open_caches = max_open_caches  # request KV caches kept at once
        self.max_kv_bytes = max_kv_bytes  # all requests' KV caches together
        self.window = window
        self.link = link
        self.is_last = is_last
        self.max_context = max_context
        self.tracer = tracer
        self.profile = profile  # when set, every segment takes the profiled device's time
        self.caches: OrderedDict[int, TreeKVCache] = OrderedDict()  # least recently used first
        self.prune_versions: dict[int, int] = {}  # request id -> last prune applied
        self.inbox: deque[Message] = deque()
        self.inbox_ready = asyncio.Event()
        self.outbox: asyncio.Queue[Message] = asyncio.Queue()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-compute")
        self.busy_since: float | None = None

    def busy_for(self) -> float:
        """Seconds the current computation has been running (0 when idle), for heartbeats."""
        return 0.0 if self.busy_since is None else time.monotonic() - self.busy_since

    async def run(self) -> None:
        await asyncio.gather(self._receive(), self._compute(), self._send())

    async def _receive(self) -> None:
        while True:
            message = await self.link.receive()
            if isinstance(message, Prune):
                self._prune_queued(message)
            self.inbox.append(message)
            self.inbox_ready.set()

    def _prune_queued(self, prune: Prune) -> None:
        """Drop rows the head has just rejected from segments that have not been computed yet."""
        alive = set(prune.survivors)

        def pruned(segment: Segment) -> Segment:
            if segment.request_id != prune.request_id or segment.commit:
                return segment
            keep = [row for row, node in enumerate(segment.node_ids) if node in alive]
            return segment if len(keep) == len(segment.node_ids) else segment.select(keep)

        for i, queued in enumerate(self.inbox):
            if isinstance(queued, Segment):
                self.inbox[i] = pruned(queued)
            elif isinstance(queued, Batch):
                self.inbox[i] = Batch(tuple(pruned(part) for part in queued.parts))

    async def _compute(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.inbox:
                self.inbox_ready.clear()
                await self.inbox_ready.wait()
            message = self.inbox.popleft()
            rows = sum(len(part.node_ids) for part in segments_of(message))
            started = time.perf_counter()
            self.busy_since = time.monotonic()
            try:
                with self.tracer.span(message.kind, message.request_id, getattr(message, "seq", -1), rows):
                    results = await loop.run_in_executor(self.worker, self.handle, message)
                    if self.profile is not None and rows:
                        await pace(started, self.profile.compute_s(rows))
            except Exception as exc:  # a bad request must not take the node down; the head is told
                results = [self._failed(part.request_id, exc) for part in segments_of(message)] or [
                    self._failed(message.request_id, exc)]
            finally:
                self.busy_since = None
            for result in results:
                await self.outbox.put(result)

    def _failed(self, request_id: int, exc: Exception) -> StageError:
        log.warning("%s: request %d failed: %s: %s", self.name, request_id, type(exc).__name__, exc)
        self.caches.pop(request_id, None)
        self.prune_versions.pop(request_id, None)
        return StageError(request_id, self.name, f"{type(exc).__name__}: {exc}")

    async def _send(self) -> None:
        while True:
            message = await self.outbox.get()
            with self.tracer.span("send", message.request_id, getattr(message, "seq", -1)):
                await self.link.send(message)

    def handle(self, message: Message) -> list[Message]:
        match message:
            case Segment() | Batch():
                return self._forward(message)
            case Prune():
                last = self.prune_versions.get(message.request_id, 0)
                if message.version <= last:
                    raise ValueError(f"prune version {message.version} arrived after version {last}")
                self.prune_versions[message.request_id] = message.version
                cache = self.caches.get(message.request_id)
                if cache is not None:
                    cache.prune(message.accepted, message.survivors)
                return [message]
            case Release():
                self.caches.pop(message.request_id, None)
                self.prune_versions.pop(message.request_id, None)
                return [message]
            case StageError():
                return [message]

    def _forward(self, message: Segment | Batch) -> list[Message]:
        """One forward pass over every part that fits its request's cache; the others fail alone."""
        plans: list[PartPlan] = []
        planned: list[Segment] = []
        failures: list[Message] = []
        for part in segments_of(message):
            if not part.node_ids:
                continue  # every row was pruned while queued
            try:
                plans.append(self._plan(part))
                planned.append(part)
            except Exception as exc:
                failures.append(self._failed(part.request_id, exc))
        if not plans:
            return failures
        hidden = torch.cat([part.hidden for part in planned]) if len(planned) > 1 else planned[0].hidden
        out = self.window.run(hidden, plans).cpu()  # the wire carries host memory
        results, start = [], 0
        for segment in planned:
            rows = len(segment.node_ids)
            result = segment.with_hidden(out[start : start + rows])
            start += rows
            if self.is_last and segment.commit:
                # Only the last prefill row's next-token distribution is ever needed.
                result = result.select([rows - 1])
            results.append(result)
        if isinstance(message, Segment):
            return [*results, *failures]
        return [Batch(tuple(results)), *failures]

    def _plan(self, segment: Segment) -> PartPlan:
        hidden_size = self.window.config.hidden_size
        if segment.hidden.shape[1] != hidden_size:
            raise ValueError(f"hidden rows have width {segment.hidden.shape[1]}, this model needs {hidden_size}")
        if max(segment.positions) >= self.max_context or min(segment.positions) < 0:
            raise ValueError(f"positions {min(segment.positions)}..{max(segment.positions)} outside the context")
        cache = self._cache_for(segment)
        self._check_kv_room(cache, len(segment.node_ids))
        return self.window.plan(WindowPart(cache, segment.commit, segment.node_ids, segment.parents, segment.positions))

    def _check_kv_room(self, cache: TreeKVCache, rows: int) -> None:
        used = sum(c.nbytes for c in self.caches.values())
        if used + cache.growth_bytes(rows) > self.max_kv_bytes:
            raise MemoryError(
                f"KV memory full: {rows} more rows need {cache.growth_bytes(rows) >> 20} MB beyond the "
                f"{used >> 20} MB in use of this stage's max_kv_mb = {self.max_kv_bytes >> 20}")

    def _cache_for(self, segment: Segment) -> TreeKVCache:
        """The request's cache, after checking the segment continues it; a request is only opened by
        its first prefill chunk, so rows of an unknown request (say, from before this node restarted)
        fail loudly instead of attending to an empty prefix."""
        cache = self.caches.get(segment.request_id)
        if cache is None:
            if not (segment.commit and segment.positions[0] == 0):
                raise LookupError(f"request {segment.request_id} is unknown here (its prefix is not cached)")
            if len(self.caches) >= self.max_open_caches:
                # Forgotten requests (a peer that never released them) must not lock out live ones;
                # a live request evicted here fails loudly and the head re-prefills it.
                evicted, _ = self.caches.popitem(last=False)
                log.warning("%s: evicted the cache of idle request %d", self.name, evicted)
            cache = self.caches[segment.request_id] = self.window.new_cache()
        self.caches.move_to_end(segment.request_id)
        if segment.commit and list(segment.positions) != list(range(cache.committed, cache.committed + len(segment.positions))):
            raise ValueError(f"prefill rows at {segment.positions[0]}.. do not continue the {cache.committed} cached rows")
        if not segment.commit and min(segment.positions) < cache.committed:
            raise ValueError(f"tree rows at position {min(segment.positions)} overlap the {cache.committed} committed rows")
        return cache



def segments_of(message: Message) -> tuple[Segment, ...]:
    match message:
        case Segment():
            return (message,)
        case Batch():
            return message.parts
    return ()
