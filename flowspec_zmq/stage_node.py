"""A stage node: a window of decoder layers in the ring.

Three coroutines joined by queues overlap the work: `_receive` decodes input (and applies a prune
to inputs still queued), `_compute` runs one message at a time on a worker thread (torch releases
the GIL), `_send` ships results downstream. Messages are handled in arrival order, which is the
head's sending order, so a prune always lands after the segments it refers to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

from .emulation import DeviceProfile, pace
from .kv_cache import TreeKVCache
from .model_slices import LayerWindow
from .protocol import Message, Prune, Release, Segment, StageError
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
    ) -> None:
        self.name = name
        self.max_open_caches = max_open_caches  # request KV caches kept at once
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
        for i, queued in enumerate(self.inbox):
            if isinstance(queued, Segment) and queued.request_id == prune.request_id and not queued.commit:
                keep = [row for row, node in enumerate(queued.node_ids) if node in alive]
                if len(keep) < len(queued.node_ids):
                    self.inbox[i] = queued.select(keep)

    async def _compute(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.inbox:
                self.inbox_ready.clear()
                await self.inbox_ready.wait()
            message = self.inbox.popleft()
            rows = len(message.node_ids) if isinstance(message, Segment) else 0
            started = time.perf_counter()
            self.busy_since = time.monotonic()
            try:
                with self.tracer.span(message.kind, message.request_id, getattr(message, "seq", -1), rows):
                    result = await loop.run_in_executor(self.worker, self.handle, message)
                    if self.profile is not None and rows:
                        await pace(started, self.profile.compute_s(rows))
            except Exception as exc:  # a bad request must not take the node down; the head is told
                log.warning("%s: request %d failed: %s: %s", self.name, message.request_id, type(exc).__name__, exc)
                self.caches.pop(message.request_id, None)
                self.prune_versions.pop(message.request_id, None)
                result = StageError(message.request_id, self.name, f"{type(exc).__name__}: {exc}")
            finally:
                self.busy_since = None
            if result is not None:
                await self.outbox.put(result)

    async def _send(self) -> None:
        while True:
            message = await self.outbox.get()
            with self.tracer.span("send", message.request_id, getattr(message, "seq", -1)):
                await self.link.send(message)

    def handle(self, message: Message) -> Message | None:
        match message:
            case Segment():
                return self._forward(message)
            case Prune():
                last = self.prune_versions.get(message.request_id, 0)
                if message.version <= last:
                    raise ValueError(f"prune version {message.version} arrived after version {last}")
                self.prune_versions[message.request_id] = message.version
                cache = self.caches.get(message.request_id)
                if cache is not None:
                    cache.prune(message.accepted, message.survivors)
                return message
            case Release():
                self.caches.pop(message.request_id, None)
                self.prune_versions.pop(message.request_id, None)
                return message
            case StageError():
                return message

    def _forward(self, segment: Segment) -> Segment | None:
        if not segment.node_ids:
            return None  # every row was pruned while queued
        hidden_size = self.window.config.hidden_size
        if segment.hidden.shape[1] != hidden_size:
            raise ValueError(f"hidden rows have width {segment.hidden.shape[1]}, this model needs {hidden_size}")
        if max(segment.positions) >= self.max_context or min(segment.positions) < 0:
            raise ValueError(f"positions {min(segment.positions)}..{max(segment.positions)} outside the context")
        cache = self._cache_for(segment)
        hidden = self.window(
            segment.hidden, cache, segment.commit, segment.node_ids, segment.parents, segment.positions
        )
        if self.is_last and segment.commit:
            # Only the last prefill row's next-token distribution is ever needed.
            return segment.select([len(segment.node_ids) - 1]).with_hidden(hidden[-1:].contiguous())
        return segment.with_hidden(hidden)

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

