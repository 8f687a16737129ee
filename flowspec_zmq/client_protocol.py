"""Messages between clients and the head (a DEALER/ROUTER pair), msgpack-encoded.

Client -> head: {"op": "generate", "id": n, "prompt": str | "messages": [...] | "prompt_ids": [...],
                 "options": {...}}, {"op": "cancel", "id": n}, {"op": "info", "id": n}.
Head -> client: {"id": n, "event": "tokens", "ids": [...], "text": str},
                {"id": n, "event": "done", "stats": {...}},
                {"id": n, "event": "error", "message": str, "ids": [...]},
                {"id": n, "event": "info", ...}.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import msgpack

from .strategies import MODES

MAX_CLIENT_MESSAGE_BYTES = 4 << 20
DRAFTS = ("int8", "bf16", "ngram")


class ClientRequestError(ValueError):
    """A client request that cannot be served as sent."""


@dataclass(frozen=True)
class GenerateOptions:
    mode: str = "flowspec"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    draft: str = "int8"
    tree_total_tokens: int = 64
    tree_depth: int = 5
    tree_top_k: int = 8
    segment_size: int = 16

    def updated(self, overrides: dict[str, Any]) -> GenerateOptions:
        """These options with a client's overrides, each checked."""
        known = {f.name: f.type for f in fields(self)}
        for key, value in overrides.items():
            if key not in known:
                raise ClientRequestError(f"unknown option {key!r}; known: {', '.join(known)}")
            expected = {"str": str, "int": int, "float": (int, float)}[known[key]]
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ClientRequestError(f"option {key!r} must be {known[key]}, got {value!r}")
        options = replace(self, **overrides)
        options.check()
        return options

    def check(self) -> None:
        if self.mode not in MODES:
            raise ClientRequestError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.draft not in DRAFTS:
            raise ClientRequestError(f"draft {self.draft!r} is not one of {', '.join(DRAFTS)}")
        if not 1 <= self.max_new_tokens <= 1 << 20:
            raise ClientRequestError(f"max_new_tokens must be between 1 and {1 << 20}, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ClientRequestError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        for name in ("tree_total_tokens", "tree_depth", "tree_top_k", "segment_size"):
            if not 1 <= getattr(self, name) <= 1024:
                raise ClientRequestError(f"{name} must be between 1 and 1024")


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message)


def unpack(frame: bytes) -> dict[str, Any]:
    if len(frame) > MAX_CLIENT_MESSAGE_BYTES:
        raise ClientRequestError(f"message of {len(frame)} bytes is over the {MAX_CLIENT_MESSAGE_BYTES}-byte limit")
    try:
        message = msgpack.unpackb(frame)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise ClientRequestError(f"not valid msgpack: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ClientRequestError("a request must be a map with an 'op'")
    if type(message.get("id")) is not int:
        raise ClientRequestError("a request needs an integer 'id'")
    return message


def unpack_reply(frame: bytes) -> dict[str, Any]:
    message = msgpack.unpackb(frame)
    if not isinstance(message, dict) or "event" not in message:
        raise ClientRequestError("the head sent a reply without an 'event'")
    return message
