"""Edge emulation: pace a stage to a device profile and shape a link's bandwidth and delay.

On a shared machine every node's real compute contends for the same cores, so wall-clock numbers
say more about the host than about the schedule. A paced stage runs the real computation, then
waits until the profile's time for that work has passed; a shaped link delivers each message after
its serialisation time at the given bandwidth plus a fixed one-way delay (netem is unavailable, so
this happens in user space, in the sender).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable


@dataclass(frozen=True)
class DeviceProfile:
    """Time a device needs for one forward pass of its layer window over `rows` tokens."""

    fixed_ms: float
    per_token_ms: float

    def compute_s(self, rows: int) -> float:
        return (self.fixed_ms + self.per_token_ms * rows) / 1000.0


@dataclass(frozen=True)
class LinkProfile:
    bandwidth_mbps: float  # 0 means unlimited
    delay_ms: float

    def transfer_s(self, nbytes: int) -> float:
        return nbytes * 8 / (self.bandwidth_mbps * 1e6) if self.bandwidth_mbps > 0 else 0.0


async def pace(started: float, seconds: float) -> None:
    """Sleep until `seconds` after `started` (a time.perf_counter() reading)."""
    remaining = started + seconds - time.perf_counter()
    if remaining > 0:
        await asyncio.sleep(remaining)


class ShapedSender:
    """Delivers messages in order, each after its transfer time on a busy-until link plus delay."""

    def __init__(self, profile: LinkProfile, deliver: Callable[[list], Awaitable[None]]) -> None:
        self.profile = profile
        self.deliver = deliver
        self.link_free_at = 0.0
        self.queue: asyncio.Queue[tuple[float, list]] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def submit(self, frames: list, nbytes: int) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())
        now = time.perf_counter()
        self.link_free_at = max(now, self.link_free_at) + self.profile.transfer_s(nbytes)
        self.queue.put_nowait((self.link_free_at + self.profile.delay_ms / 1000.0, frames))

    async def _run(self) -> None:
        while True:
            due, frames = await self.queue.get()
            await pace(due, 0.0)
            await self.deliver(frames)
