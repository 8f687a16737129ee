"""Messages between clients and the head (a DEALER/ROUTER pair): typed and versioned like the ring's
messages (one msgpack map, {"v": SCHEMA_VERSION, "kind": ..., fields}), validated field by field.

Client -> head: Generate, Cancel, Info.
Head -> client: Accepted (queue position), then Alive at least every ALIVE_S while the request waits
or runs, Tokens ..., and Done or Failed; InfoReply. A client that hears nothing for a few seconds
knows the head is gone instead of waiting out a long timeout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal, get_args

import msgpack

from .protocol import MAX_TEXT, SCHEMA_VERSION

MAX_CLIENT_MESSAGE_BYTES = 4 << 20
MAX_IDS = 1 << 20
MAX_STOPS, MAX_STOP_CHARS = 16, 256
ALIVE_S = 1.0  # the head's longest silence towards a client whose request it holds
# Why a request failed, so that a client (the HTTP gateway) can answer with the right status:
# the request as sent; a full queue (try later); a ring or head that cannot serve now; anything else.
FailureReason = Literal["invalid", "busy", "unavailable", "failed"]
FAILURE_REASONS: tuple[str, ...] = get_args(FailureReason)


class ClientRequestError(ValueError):
    """A client message that cannot be served as sent; `request_id` when it could be read."""

    def __init__(self, message: str, request_id: int = -1, reason: FailureReason = "invalid") -> None:
        super().__init__(message)
        self.request_id = request_id
        self.reason = reason


@dataclass(frozen=True)
class Generate:
    kind: ClassVar[str] = "generate"
    id: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_ids: list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    stop: list[str] | None = None  # the output ends before the first of these strings


@dataclass(frozen=True)
class Cancel:
    kind: ClassVar[str] = "cancel"
    id: int


@dataclass(frozen=True)
class Info:
    kind: ClassVar[str] = "info"
    id: int


@dataclass(frozen=True)
class Accepted:
    kind: ClassVar[str] = "accepted"
    id: int
    queued: int  # requests ahead of this one (0: it runs now)


@dataclass(frozen=True)
class Alive:
    kind: ClassVar[str] = "alive"
    id: int


@dataclass(frozen=True)
class Tokens:
    kind: ClassVar[str] = "tokens"
    id: int
    ids: list[int]
    text: str


@dataclass(frozen=True)
class Done:
    kind: ClassVar[str] = "done"
    id: int
    stats: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    kind: ClassVar[str] = "error"
    id: int  # -1: the head could not tell which request a bad message meant
    message: str
    ids: list[int]  # tokens committed before the failure
    reason: FailureReason = "failed"


@dataclass(frozen=True)
class InfoReply:
    kind: ClassVar[str] = "info"
    id: int
    info: dict[str, Any]


ClientMessage = Generate | Cancel | Info
Reply = Accepted | Alive | Tokens | Done | Failed | InfoReply
REQUESTS: dict[str, type] = {cls.kind: cls for cls in (Generate, Cancel, Info)}
REPLIES: dict[str, type] = {cls.kind: cls for cls in (Accepted, Alive, Tokens, Done, Failed, InfoReply)}


def pack(message: ClientMessage | Reply) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, "kind": message.kind, **asdict(message)})


def _check(name: str, value: Any, request_id: int) -> None:
    """Type checks of every field that any message carries."""

    def fail(problem: str) -> None:
        raise ClientRequestError(f"field {name!r} {problem}", request_id)

    match name:
        case "id":
            if type(value) is not int or not -1 <= value < 1 << 62:
                fail("must be an integer id")
        case "reason":
            if value not in FAILURE_REASONS:
                fail(f"must be one of {', '.join(FAILURE_REASONS)}")
        case "queued":
            if type(value) is not int or value < 0:
                fail("must be a non-negative integer")
        case "prompt" | "text" | "message":
            if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT):
                fail(f"must be a string of at most {MAX_TEXT} characters")
        case "prompt_ids" | "ids":
            if value is not None and (not isinstance(value, list) or len(value) > MAX_IDS
                                      or not all(type(i) is int and i >= 0 for i in value)):
                fail("must be a list of token ids")
        case "stop":
            if value is not None and not (isinstance(value, list) and len(value) <= MAX_STOPS and all(
                    isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in value)):
                fail(f"must be a list of at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        case "messages":
            if value is not None and not (isinstance(value, list) and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value)):
                fail("must be a list of {role, content} strings")
        case "options" | "stats" | "info":
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                fail("must be a map with string keys")


def _unpack(frame: bytes, kinds: dict[str, type]) -> Any:
    if len(frame) > MAX_CLIENT_MESSAGE_BYTES:
        raise ClientRequestError(f"message of {len(frame)} bytes is over the {MAX_CLIENT_MESSAGE_BYTES}-byte limit")
    try:
        message = msgpack.unpackb(frame)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise ClientRequestError(f"not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise ClientRequestError("a message must be a map")
    request_id = message.get("id") if type(message.get("id")) is int else -1
    if message.get("v") != SCHEMA_VERSION or type(message.get("v")) is not int:
        raise ClientRequestError(f"schema version {message.get('v')!r} is not {SCHEMA_VERSION}", request_id)
    cls = kinds.get(message.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise ClientRequestError(f"unknown kind {message.get('kind')!r} (known: {', '.join(kinds)})", request_id)
    names = {f.name for f in fields(cls)}
    if unknown := set(message) - names - {"v", "kind"}:
        raise ClientRequestError(f"unknown field(s) {sorted(map(str, unknown))} in {cls.kind!r}", request_id)
    values = {name: message[name] for name in names if name in message}
    if "id" not in values:
        raise ClientRequestError(f"a {cls.kind!r} message needs an integer 'id'")
    for name, value in values.items():
        _check(name, value, request_id)
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise ClientRequestError(f"{cls.kind!r}: {exc}", request_id) from None


def unpack_request(frame: bytes) -> ClientMessage:
    return _unpack(frame, REQUESTS)


def unpack_reply(frame: bytes) -> Reply:
    return _unpack(frame, REPLIES)
