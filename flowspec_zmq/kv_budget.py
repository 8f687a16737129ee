"""The stages' KV memory as the head sees it, so that a request that cannot fit gets a clear error
instead of a stage running out of memory.

Every running request holds a reservation on every stage, sized by the rule the stages grow their
caches by (kv_cache.grown_capacity) for its longest possible length. A request that could never fit
under a stage's cap is refused at once; one that fits once others finish waits for them, in
arrival order.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator, Mapping

from transformers import PretrainedConfig

from .kv_cache import grown_capacity
from .scheduler import RequestRejected


class KVBudget:
    def __init__(self, bytes_per_token: Mapping[str, int], cap_bytes: int) -> None:
        self.bytes_per_token = dict(bytes_per_token)  # stage name -> KV bytes one token takes there
        self.cap_bytes = cap_bytes
        self.used = dict.fromkeys(self.bytes_per_token, 0)
        self.changed = asyncio.Condition()

    @staticmethod
    def for_stages(config: PretrainedConfig, windows: Mapping[str, tuple[int, int]], itemsize: int,
                   cap_mb: int) -> KVBudget:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_layer = 2 * config.num_key_value_heads * head_dim * itemsize  # keys and values
        return KVBudget({name: (last - first) * per_layer for name, (first, last) in windows.items()}, cap_mb << 20)

    def need(self, tokens: int) -> dict[str, int]:
        rows = grown_capacity(tokens)
        return {name: rows * per_token for name, per_token in self.bytes_per_token.items()}

    @asynccontextmanager
    async def reserve(self, tokens: int) -> AsyncIterator[None]:
        """Hold room for a request of up to `tokens` tokens on every stage while it runs."""
        need = self.need(tokens)
        for name, size in need.items():
            if size > self.cap_bytes:
                raise RequestRejected(
                    f"a request of up to {tokens} tokens (prompt, max_new_tokens and draft tree) needs "
                    f"{size >> 20} MB of KV cache on {name}, more than its max_kv_mb = {self.cap_bytes >> 20}; "
                    "ask for fewer tokens or raise max_kv_mb in [service]")
        async with self.changed:
            await self.changed.wait_for(lambda: all(self.used[n] + size <= self.cap_bytes for n, size in need.items()))
            for name, size in need.items():
                self.used[name] += size
        try:
            yield
        finally:
            async with self.changed:
                for name, size in need.items():
                    self.used[name] -= size
                self.changed.notify_all()
