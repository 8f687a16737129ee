"""Messages between clients and the head (a DEALER/ROUTER pair), msgpack-encoded.

Client -> head: {"op": "generate", "id": n, "prompt": str | "messages": [...] | "prompt_ids": [...],
                 "options": {...}}, {"op": "cancel", "id": n}, {"op": "info", "id": n}.
Head -> client: {"id": n, "event": "tokens", "ids": [...], "text": str},
                {"id": n, "event": "done", "stats": {...}},
                {"id": n, "event": "error", "message": str, "ids": [...]},
                {"id": n, "event": "info", ...}.
"""

from __future__ import annotations

from typing import Any

import msgpack

MAX_CLIENT_MESSAGE_BYTES = 4 << 20


class ClientRequestError(ValueError):
    """A client request that cannot be served as sent."""


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
