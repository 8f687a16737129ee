"""Wire protocol: typed, versioned messages as a msgpack header plus raw tensor frames.

A message on the wire is a multipart ZMQ message: frame 0 is the msgpack header, every further frame
is the raw bytes of one tensor described in the header's "tensors" list. Nothing is pickled; decoding
validates every field so a malformed frame raises ProtocolError instead of reaching the model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Sequence

import msgpack
import torch

SCHEMA_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 256 << 20
MAX_ROWS = 1 << 16
MAX_DIM = 1 << 24
MAX_TEXT = 1 << 20

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class ProtocolError(ValueError):
    """A frame that does not decode into a valid message."""


@dataclass(frozen=True)
class Segment:
    """Rows of hidden states travelling the ring for one request.

    `commit` rows (prefill) go straight into every stage's committed KV prefix. Other rows are
    tree nodes: each attends to the committed prefix, its ancestors among the stage's live tree rows
    (found through `parents`, -1 meaning "hangs off the committed prefix") and itself.
    """

    kind: ClassVar[str] = "segment"
    request_id: int
    seq: int
    commit: bool
    node_ids: tuple[int, ...]
    parents: tuple[int, ...]
    positions: tuple[int, ...]
    hidden: torch.Tensor = field(repr=False)

    def __post_init__(self) -> None:
        rows = len(self.node_ids)
        if not (len(self.parents) == len(self.positions) == rows == self.hidden.shape[0]):
            raise ProtocolError(
                f"segment rows disagree: {rows} node ids, {len(self.parents)} parents, "
                f"{len(self.positions)} positions, {self.hidden.shape[0]} hidden rows"
            )

    def select(self, keep: Sequence[int]) -> Segment:
        """The same segment restricted to the row indices in `keep`."""
        index = torch.tensor(list(keep), dtype=torch.long)
        return Segment(
            self.request_id,
            self.seq,
            self.commit,
            tuple(self.node_ids[i] for i in keep),
            tuple(self.parents[i] for i in keep),
            tuple(self.positions[i] for i in keep),
            self.hidden.index_select(0, index),
        )

    def with_hidden(self, hidden: torch.Tensor) -> Segment:
        return Segment(self.request_id, self.seq, self.commit, self.node_ids, self.parents, self.positions, hidden)


MAX_PARTS = 64  # requests in one batch


@dataclass(frozen=True)
class Batch:
    """Segments of several requests that every stage runs in one forward pass. Each part keeps its
    own request id, KV cache and tree; a stage returns the parts it computed as one batch."""

    kind: ClassVar[str] = "batch"
    parts: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if not 0 < len(self.parts) <= MAX_PARTS:
            raise ProtocolError(f"a batch carries 1 to {MAX_PARTS} segments, not {len(self.parts)}")
        ids = [part.request_id for part in self.parts]
        if len(set(ids)) != len(ids):
            raise ProtocolError(f"a batch carries one segment per request; requests {ids} repeat")

    @property
    def request_id(self) -> int:  # for logs and traces: the batch's first request
        return self.parts[0].request_id


@dataclass(frozen=True)
class Prune:
    """Verification outcome: `accepted` node rows join the committed prefix (in this order), the
    tree rows in `survivors` stay, every other tree row of the request is dropped."""

    kind: ClassVar[str] = "prune"
    request_id: int
    version: int
    accepted: tuple[int, ...]
    survivors: tuple[int, ...]


@dataclass(frozen=True)
class Release:
    """The request is over: free its KV cache on every stage."""

    kind: ClassVar[str] = "release"
    request_id: int


@dataclass(frozen=True)
class StageError:
    """A stage could not process a request's message; travels the ring to the head."""

    kind: ClassVar[str] = "error"
    request_id: int
    node: str
    reason: str


Message = Segment | Batch | Prune | Release | StageError


def _ints(header: dict[str, Any], key: str, *, limit: int = MAX_ROWS) -> tuple[int, ...]:
    value = header.get(key)
    if not isinstance(value, list) or len(value) > limit or not all(type(v) is int for v in value):
        raise ProtocolError(f"field {key!r} must be a list of at most {limit} integers")
    return tuple(value)


def _int(header: dict[str, Any], key: str) -> int:
    value = header.get(key)
    if type(value) is not int or value < 0 or value >= 1 << 62:
        raise ProtocolError(f"field {key!r} must be a non-negative integer, got {value!r}")
    return value


def _str(header: dict[str, Any], key: str) -> str:
    value = header.get(key)
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ProtocolError(f"field {key!r} must be a string")
    return value


def _tensor_to_frame(tensor: torch.Tensor) -> memoryview:
    # Viewing as bytes shares the tensor's memory, so zmq sends it without a copy.
    return tensor.contiguous().view(torch.uint8).numpy().data


def _frame_to_tensor(frame: memoryview | bytes, dtype_name: Any, shape: Any) -> torch.Tensor:
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ProtocolError(f"unknown tensor dtype {dtype_name!r}")
    if not isinstance(shape, list) or len(shape) != 2 or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
        raise ProtocolError(f"tensor shape must be two integers in [0, {MAX_DIM}], got {shape!r}")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    buffer = memoryview(frame)
    if buffer.nbytes != expected:
        raise ProtocolError(f"tensor frame has {buffer.nbytes} bytes, header promises {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # The frame is read-only; the model only reads its input, so sharing it is safe.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)


def _tensor_spec(tensor: torch.Tensor) -> list:
    return [DTYPE_NAMES[tensor.dtype], list(tensor.shape)]


def _segment_fields(segment: Segment) -> dict[str, Any]:
    return {"seq": segment.seq, "commit": segment.commit, "ids": list(segment.node_ids),
            "parents": list(segment.parents), "pos": list(segment.positions)}


def _segment(fields: dict[str, Any], request_id: int, spec: Any, frame: memoryview) -> Segment:
    if type(fields.get("commit")) is not bool:
        raise ProtocolError("a segment needs a boolean 'commit'")
    if not isinstance(spec, list) or len(spec) != 2:
        raise ProtocolError("tensor spec must be [dtype, shape]")
    return Segment(request_id, _int(fields, "seq"), fields["commit"], _ints(fields, "ids"), _ints(fields, "parents"),
                   _ints(fields, "pos"), _frame_to_tensor(frame, spec[0], spec[1]))


def encode(message: Message) -> list[bytes | memoryview]:
    """Message -> multipart frames (header first)."""
    header: dict[str, Any] = {"v": SCHEMA_VERSION, "kind": message.kind, "req": message.request_id}
    frames: list[bytes | memoryview] = []
    match message:
        case Segment():
            header.update(_segment_fields(message), tensors=[_tensor_spec(message.hidden)])
            frames.append(_tensor_to_frame(message.hidden))
        case Batch():
            header.update(parts=[{"req": part.request_id, **_segment_fields(part)} for part in message.parts],
                          tensors=[_tensor_spec(part.hidden) for part in message.parts])
            frames += [_tensor_to_frame(part.hidden) for part in message.parts]
        case Prune():
            header.update(version=message.version, accepted=list(message.accepted), survivors=list(message.survivors))
        case Release():
            pass
        case StageError():
            header.update(node=message.node, reason=message.reason)
    return [msgpack.packb(header), *frames]


def _header(buffer: memoryview, limit: int) -> dict[str, Any]:
    """A msgpack header of at most `limit` bytes, as a map of this schema version."""
    if buffer.nbytes > limit:
        raise ProtocolError(f"header of {buffer.nbytes} bytes exceeds the {limit}-byte limit")
    try:
        header = msgpack.unpackb(buffer, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    if type(header.get("v")) is not int or header["v"] != SCHEMA_VERSION:
        raise ProtocolError(f"schema version {header.get('v')!r} is not {SCHEMA_VERSION}")
    return header


def decode(frames: Sequence[bytes | memoryview | Any]) -> Message:
    """Multipart frames -> Message, or ProtocolError saying what is wrong."""
    if not frames:
        raise ProtocolError("empty message")
    buffers = [memoryview(getattr(f, "buffer", f)) for f in frames]
    total = sum(b.nbytes for b in buffers)
    if total > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {total} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    header = _header(buffers[0], MAX_HEADER_BYTES)
    kind = header.get("kind")
    request_id = _int(header, "req")
    tensor_specs = header.get("tensors", [])
    if not isinstance(tensor_specs, list) or len(tensor_specs) != len(buffers) - 1:
        raise ProtocolError(f"header describes {tensor_specs!r} tensors but {len(buffers) - 1} frames follow")
    if kind == "segment":
        if len(tensor_specs) != 1:
            raise ProtocolError("a segment carries exactly one tensor")
        return _segment(header, request_id, tensor_specs[0], buffers[1])
    if kind == "batch":
        parts = header.get("parts")
        if not isinstance(parts, list) or len(parts) != len(tensor_specs) or not all(isinstance(p, dict) for p in parts):
            raise ProtocolError("a batch needs a list of part maps, one per tensor")
        return Batch(tuple(_segment(part, _int(part, "req"), spec, frame)
                           for part, spec, frame in zip(parts, tensor_specs, buffers[1:])))
    if tensor_specs:
        raise ProtocolError(f"a {kind!r} message carries no tensors")
    if kind == "prune":
        return Prune(request_id, _int(header, "version"), _ints(header, "accepted"), _ints(header, "survivors"))
    if kind == "release":
        return Release(request_id)
    if kind == "error":
        return StageError(request_id, _str(header, "node"), _str(header, "reason"))
    raise ProtocolError(f"unknown message kind {kind!r}")


# --- Node control messages: beside the ring, one frame each (readiness to the launcher, heartbeats
# to the head). Same header convention as the ring messages; no tensors.

MAX_CONTROL_BYTES = 4096


@dataclass(frozen=True)
class NodeReady:
    """A node process serves now; sent once to the launcher that started it."""

    kind: ClassVar[str] = "ready"
    node: str
    pid: int


@dataclass(frozen=True)
class Heartbeat:
    """A stage is alive. `busy_s`: how long its current computation has run (0 when idle);
    `incarnation`: which process it is (a new one has lost its KV caches); `rss_mb`: its resident
    memory (0 when it cannot be read), for `flowspec status`."""

    kind: ClassVar[str] = "heartbeat"
    node: str
    busy_s: float
    incarnation: str
    rss_mb: float = 0.0


ControlMessage = NodeReady | Heartbeat


def _amount(header: dict[str, Any], key: str, unit: str) -> float:
    value = header.get(key)
    if type(value) not in (int, float) or not 0 <= value < math.inf:
        raise ProtocolError(f"field {key!r} must be a finite number of {unit} >= 0, got {value!r}")
    return float(value)


def _only(header: dict[str, Any], *keys: str) -> None:
    extra = set(header) - {"v", "kind", *keys}
    if extra:
        raise ProtocolError(f"unexpected fields {sorted(map(str, extra))} in a {header['kind']!r} message")


def encode_control(message: ControlMessage) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, "kind": message.kind, **asdict(message)})


def decode_control(frame: bytes | memoryview) -> ControlMessage:
    """One control frame -> NodeReady or Heartbeat, or ProtocolError saying what is wrong."""
    header = _header(memoryview(frame), MAX_CONTROL_BYTES)
    kind = header.get("kind")
    if kind == NodeReady.kind:
        _only(header, "node", "pid")
        return NodeReady(_str(header, "node"), _int(header, "pid"))
    if kind == Heartbeat.kind:
        _only(header, "node", "busy_s", "incarnation", "rss_mb")
        return Heartbeat(_str(header, "node"), _amount(header, "busy_s", "seconds"), _str(header, "incarnation"),
                         _amount(header, "rss_mb", "MB"))
    raise ProtocolError(f"unknown control message kind {kind!r}")
