"""Wire protocol: every message kind round-trips exactly; every malformed frame raises ProtocolError."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowspec_zmq import protocol
from flowspec_zmq.protocol import (
    MAX_CONTROL_BYTES,
    MAX_HEADER_BYTES,
    SCHEMA_VERSION,
    Heartbeat,
    NodeReady,
    Prune,
    ProtocolError,
    Release,
    Segment,
    StageError,
    decode,
    decode_control,
    encode,
    encode_control,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


INT64 = st.integers(-(2**63), 2**63 - 1)
NON_NEGATIVE = st.integers(0, 2**62 - 1)
DTYPE_NAMES = list(protocol.DTYPES)


def random_hidden(dtype_name: str, rows: int, width: int, seed: int) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs, infinities, subnormals included) of the given dtype."""
    dtype = protocol.DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows * width * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).view(rows, width)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.contiguous().view(torch.uint8).numpy().tobytes())


@st.composite
def segments(draw) -> Segment:
    rows = draw(st.integers(0, 64))
    width = draw(st.integers(0, 48))
    dtype_name = draw(st.sampled_from(DTYPE_NAMES))
    ints = st.lists(INT64, min_size=rows, max_size=rows).map(tuple)
    return Segment(
        request_id=draw(NON_NEGATIVE),
        seq=draw(NON_NEGATIVE),
        commit=draw(st.booleans()),
        node_ids=draw(ints),
        parents=draw(ints),
        positions=draw(ints),
        hidden=random_hidden(dtype_name, rows, width, draw(st.integers(0, 2**32 - 1))),
    )


prunes = st.builds(
    Prune,
    request_id=NON_NEGATIVE,
    version=NON_NEGATIVE,
    accepted=st.lists(INT64, max_size=40).map(tuple),
    survivors=st.lists(INT64, max_size=80).map(tuple),
)
releases = st.builds(Release, request_id=NON_NEGATIVE)
stage_errors = st.builds(StageError, request_id=NON_NEGATIVE, node=st.text(max_size=40), reason=st.text(max_size=300))


def as_wire(frames) -> list[bytes]:
    """What a receiving ZMQ socket hands over: independent bytes objects."""
    return [bytes(f) for f in frames]


def assert_same_segment(got: Segment, sent: Segment) -> None:
    assert isinstance(got, Segment)
    assert (got.request_id, got.seq, got.commit) == (sent.request_id, sent.seq, sent.commit)
    assert got.node_ids == sent.node_ids
    assert got.parents == sent.parents
    assert got.positions == sent.positions
    assert got.hidden.dtype == sent.hidden.dtype
    assert got.hidden.shape == sent.hidden.shape
    assert tensor_bytes(got.hidden) == tensor_bytes(sent.hidden)


# -- round trips ---------------------------------------------------------------------------------


@FAST
@given(segments(), st.booleans())
def test_segment_round_trip(segment: Segment, over_wire: bool) -> None:
    frames = encode(segment)
    assert len(frames) == 2
    got = decode(as_wire(frames) if over_wire else frames)
    assert_same_segment(got, segment)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_segment_round_trip_each_dtype_non_contiguous(dtype_name: str) -> None:
    # A transposed (non-contiguous) tensor must still travel as its logical row-major contents.
    hidden = random_hidden(dtype_name, 7, 5, seed=3).t()
    segment = Segment(9, 2, False, tuple(range(5)), (-1, 0, 0, 1, 2), (10, 11, 11, 12, 13), hidden)
    got = decode(as_wire(encode(segment)))
    assert_same_segment(got, segment)
    assert torch.equal(got.hidden.view(torch.uint8), hidden.contiguous().view(torch.uint8))


@FAST
@given(st.one_of(prunes, releases, stage_errors), st.booleans())
def test_control_messages_round_trip(message, over_wire: bool) -> None:
    frames = encode(message)
    assert len(frames) == 1
    got = decode(as_wire(frames) if over_wire else frames)
    assert type(got) is type(message)
    assert got == message


# -- rejections ----------------------------------------------------------------------------------


def segment_header(**overrides) -> dict:
    header = {
        "v": SCHEMA_VERSION,
        "kind": "segment",
        "req": 1,
        "seq": 0,
        "commit": False,
        "ids": [0, 1],
        "parents": [-1, 0],
        "pos": [4, 5],
        "tensors": [["float32", [2, 3]]],
    }
    header.update(overrides)
    return header


GOOD_HIDDEN = bytes(2 * 3 * 4)


def frames_of(header: dict, *tensors: bytes) -> list[bytes]:
    return [msgpack.packb(header), *tensors]


def rejected(frames, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(frames)


def test_hand_built_segment_header_decodes() -> None:
    # The baseline the rejection tests below mutate must itself be valid.
    got = decode(frames_of(segment_header(), GOOD_HIDDEN))
    assert isinstance(got, Segment)
    assert got.node_ids == (0, 1) and got.parents == (-1, 0) and got.positions == (4, 5)
    assert got.hidden.shape == (2, 3) and not got.hidden.any()


@pytest.mark.parametrize(
    "header_frame",
    [b"", b"\xc1", b"\xff\xfe\xfd garbage", b"hello world", bytes(range(256)), b"\x92\x01"],
    ids=["empty", "reserved-byte", "garbage", "ascii", "all-bytes", "truncated-array"],
)
def test_garbage_header_rejected(header_frame: bytes) -> None:
    rejected([header_frame], "msgpack|map")


def test_truncated_header_rejected() -> None:
    packed = msgpack.packb(segment_header())
    for cut in (1, len(packed) // 2, len(packed) - 1):
        rejected([packed[:cut], GOOD_HIDDEN], "msgpack")


def test_no_frames_rejected() -> None:
    rejected([], "empty")


@pytest.mark.parametrize("header", [[1, "segment"], "segment", 7, None], ids=["list", "str", "int", "nil"])
def test_header_that_is_not_a_map_rejected(header) -> None:
    rejected([msgpack.packb(header)], "map")


@pytest.mark.parametrize("version", [0, 2, SCHEMA_VERSION + 100, "1", None, -1])
def test_wrong_schema_version_rejected(version) -> None:
    rejected(frames_of(segment_header(v=version), GOOD_HIDDEN), "schema version")
    header = {"v": version, "kind": "release", "req": 1}
    rejected(frames_of(header), "schema version")


def test_missing_schema_version_rejected() -> None:
    rejected(frames_of({"kind": "release", "req": 1}), "schema version")


@pytest.mark.parametrize("kind", ["segments", "Segment", "", "hello", 3, None])
def test_unknown_kind_rejected(kind) -> None:
    rejected(frames_of({"v": SCHEMA_VERSION, "kind": kind, "req": 1}), "kind")


@pytest.mark.parametrize("nbytes", [0, 1, 23, 25, 48, 2 * 3 * 2])
def test_tensor_frame_with_wrong_byte_count_rejected(nbytes: int) -> None:
    rejected(frames_of(segment_header(), bytes(nbytes)), "bytes")


@pytest.mark.parametrize("dtype_name", ["float64", "int8", "uint8", "bool", "FLOAT32", "", 4, None])
def test_unknown_dtype_rejected(dtype_name) -> None:
    rejected(frames_of(segment_header(tensors=[[dtype_name, [2, 3]]]), GOOD_HIDDEN), "dtype")


@pytest.mark.parametrize("dtype_name", [["float32"], {"a": 1}], ids=["list", "map"])
def test_unhashable_dtype_rejected(dtype_name) -> None:
    rejected(frames_of(segment_header(tensors=[[dtype_name, [2, 3]]]), GOOD_HIDDEN), "dtype")


@pytest.mark.parametrize(
    "shape",
    [[6], [1, 2, 3], [], [2, 3, 1], [[2], [3]], [2, -3], [2.0, 3], [True, 3], "2x3", None],
)
def test_bad_shape_rejected(shape) -> None:
    rejected(frames_of(segment_header(tensors=[["float32", shape]]), GOOD_HIDDEN), "shape")


def test_zero_size_shape_with_overflowing_dimension_rejected() -> None:
    header = segment_header(ids=[], parents=[], pos=[], tensors=[["float32", [0, 2**64 - 1]]])
    rejected(frames_of(header, b""), "shape")


@pytest.mark.parametrize(
    "spec",
    [["float32"], ["float32", [2, 3], "extra"], "float32", None, {"dtype": "float32"}],
)
def test_bad_tensor_spec_rejected(spec) -> None:
    rejected(frames_of(segment_header(tensors=[spec]), GOOD_HIDDEN), "tensor spec|dtype")


@pytest.mark.parametrize(
    "field, value",
    [("ids", [0]), ("ids", [0, 1, 2]), ("parents", [-1]), ("pos", [4, 5, 6]), ("ids", [])],
)
def test_mismatched_row_counts_rejected(field: str, value: list[int]) -> None:
    rejected(frames_of(segment_header(**{field: value}), GOOD_HIDDEN), "rows disagree")


def test_hidden_rows_disagreeing_with_ids_rejected() -> None:
    header = segment_header(tensors=[["float32", [3, 2]]])
    rejected(frames_of(header, GOOD_HIDDEN), "rows disagree")


def test_segment_constructor_checks_row_counts() -> None:
    with pytest.raises(ProtocolError, match="rows disagree"):
        Segment(0, 0, False, (1, 2), (-1,), (3, 4), torch.zeros(2, 4))
    with pytest.raises(ProtocolError, match="rows disagree"):
        Segment(0, 0, False, (1, 2), (-1, 1), (3, 4), torch.zeros(3, 4))


@pytest.mark.parametrize("limit", [1000, 100])
def test_oversized_message_rejected(monkeypatch, limit: int) -> None:
    monkeypatch.setattr(protocol, "MAX_MESSAGE_BYTES", limit)
    small = encode(Segment(1, 0, False, (), (), (), torch.zeros(0, 4)))
    assert sum(memoryview(f).nbytes for f in small) <= limit
    try:
        decode(small)
    except ProtocolError as exc:  # may fail for other reasons, but not for its size
        assert "exceeds" not in str(exc)
    big = encode(Segment(1, 0, False, (0,), (-1,), (0,), torch.zeros(1, limit)))
    rejected(big, "exceeds")


def test_oversized_header_rejected() -> None:
    rejected([b"\x00" * (MAX_HEADER_BYTES + 1)], "header .* exceeds")


def test_oversized_message_at_real_limit_rejected() -> None:
    # Many frames that share one small buffer: cheap to build, but their total exceeds the limit.
    chunk = memoryview(bytes(1 << 20))
    count = protocol.MAX_MESSAGE_BYTES // len(chunk) + 1
    rejected([msgpack.packb(segment_header()), *([chunk] * count)], "exceeds")


@pytest.mark.parametrize(
    "field, value",
    [
        ("ids", [0, 1.0]),
        ("ids", [0, "1"]),
        ("ids", [0, True]),
        ("ids", [0, None]),
        ("parents", [-1, [0]]),
        ("pos", [4, 5.5]),
        ("ids", "01"),
        ("ids", None),
        ("ids", {"0": 1}),
    ],
)
def test_non_integer_row_fields_rejected(field: str, value) -> None:
    rejected(frames_of(segment_header(**{field: value}), GOOD_HIDDEN), repr(field))


def test_missing_row_field_rejected() -> None:
    header = segment_header()
    del header["parents"]
    rejected(frames_of(header, GOOD_HIDDEN), "'parents'")


@pytest.mark.parametrize("request_id", [-1, -(2**40), 2**62, 1.0, "1", None, True, [1]])
def test_bad_request_id_rejected(request_id) -> None:
    rejected(frames_of(segment_header(req=request_id), GOOD_HIDDEN), "'req'")
    rejected(frames_of({"v": SCHEMA_VERSION, "kind": "release", "req": request_id}), "'req'")
    prune = {"v": SCHEMA_VERSION, "kind": "prune", "req": request_id, "version": 0, "accepted": [], "survivors": []}
    rejected(frames_of(prune), "'req'")


@pytest.mark.parametrize("value", [-1, 1.5, None, "0"])
def test_bad_sequence_number_rejected(value) -> None:
    rejected(frames_of(segment_header(seq=value), GOOD_HIDDEN), "'seq'")


@pytest.mark.parametrize("commit", [None, 1, 0, "yes"])
def test_non_boolean_commit_rejected(commit) -> None:
    rejected(frames_of(segment_header(commit=commit), GOOD_HIDDEN), "commit")


def test_prune_fields_validated() -> None:
    base = {"v": SCHEMA_VERSION, "kind": "prune", "req": 1, "version": 3, "accepted": [1, 2], "survivors": [3]}
    assert decode(frames_of(base)) == Prune(1, 3, (1, 2), (3,))
    rejected(frames_of({**base, "version": -1}), "'version'")
    rejected(frames_of({**base, "accepted": [1, "2"]}), "'accepted'")
    rejected(frames_of({**base, "survivors": None}), "'survivors'")


def test_error_fields_validated() -> None:
    base = {"v": SCHEMA_VERSION, "kind": "error", "req": 1, "node": "stage1", "reason": "boom"}
    assert decode(frames_of(base)) == StageError(1, "stage1", "boom")
    rejected(frames_of({**base, "node": 5}), "'node'")
    rejected(frames_of({**base, "reason": b"bytes"}), "'reason'")
    rejected(frames_of({k: v for k, v in base.items() if k != "reason"}), "'reason'")


def test_extra_frames_rejected() -> None:
    rejected(frames_of(segment_header(), GOOD_HIDDEN, GOOD_HIDDEN), "frames follow")
    rejected(frames_of({"v": SCHEMA_VERSION, "kind": "release", "req": 1}, b"x"), "frames follow")
    rejected(encode(Prune(1, 0, (), ())) + [b""], "frames follow")
    rejected(encode(StageError(1, "s", "r")) + [b"abc"], "frames follow")


def test_missing_tensor_frame_rejected() -> None:
    rejected(frames_of(segment_header()), "frames follow")


def test_tensors_on_a_control_message_rejected() -> None:
    header = {"v": SCHEMA_VERSION, "kind": "release", "req": 1, "tensors": [["float32", [0, 0]]]}
    rejected(frames_of(header, b""), "carries no tensors")


def test_segment_with_two_tensors_rejected() -> None:
    header = segment_header(tensors=[["float32", [2, 3]], ["float32", [2, 3]]])
    rejected(frames_of(header, GOOD_HIDDEN, GOOD_HIDDEN), "exactly one tensor")


# -- fuzz: decode or ProtocolError, never anything else ------------------------------------------


def decode_or_protocol_error(frames) -> None:
    try:
        message = decode(frames)
    except ProtocolError:
        return
    assert isinstance(message, (Segment, Prune, Release, StageError))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_fuzz_random_frames(frames: list[bytes]) -> None:
    decode_or_protocol_error(frames)


msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.sampled_from(["segment", "prune", "release", "error", "float32", "bfloat16", "float16"]),
)
small_ints = st.integers(-3, 70)
values = st.recursive(
    st.one_of(msgpack_scalars, small_ints),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=10,
)
row_lists = st.lists(small_ints, max_size=4)
dims = st.one_of(st.integers(0, 4), st.integers(0, 2**64 - 1))
shapes = st.one_of(st.lists(dims, min_size=2, max_size=2), st.lists(dims, max_size=3), values)
dtype_names = st.one_of(st.sampled_from(DTYPE_NAMES), values)
# A replacement value for each header key: usually a plausible one, sometimes anything at all.
KEYS = {
    "v": st.one_of(st.just(SCHEMA_VERSION), values),
    "kind": st.one_of(st.sampled_from(["segment", "prune", "release", "error"]), values),
    "req": st.one_of(small_ints, values),
    "seq": st.one_of(small_ints, values),
    "commit": st.one_of(st.booleans(), values),
    "ids": st.one_of(row_lists, values),
    "parents": st.one_of(row_lists, values),
    "pos": st.one_of(row_lists, values),
    "tensors": st.one_of(st.lists(st.tuples(dtype_names, shapes).map(list), max_size=2), values),
    "version": st.one_of(small_ints, values),
    "accepted": st.one_of(row_lists, values),
    "survivors": st.one_of(row_lists, values),
    "node": st.one_of(st.text(max_size=8), values),
    "reason": st.one_of(st.text(max_size=8), values),
}


def _frame_size(spec) -> int | None:
    """The byte count a tensor spec promises, when it is well formed enough to say."""
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and spec[0] in protocol.DTYPES):
        return None
    shape = spec[1]
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d >= 0 for d in shape)):
        return None
    return protocol.DTYPES[spec[0]].itemsize * shape[0] * shape[1]


@st.composite
def plausible_messages(draw) -> list[bytes]:
    """A valid header of a random kind with a few keys replaced or dropped, plus frames whose sizes
    usually match what the header promises, so decoding gets past the early checks."""
    rows = draw(st.integers(0, 3))
    header = {
        "v": SCHEMA_VERSION,
        "kind": draw(st.sampled_from(["segment", "prune", "release", "error"])),
        "req": draw(small_ints.filter(lambda i: i >= 0)),
        "seq": 0,
        "commit": draw(st.booleans()),
        "ids": list(range(rows)),
        "parents": [-1] * rows,
        "pos": list(range(rows)),
        "tensors": [[draw(st.sampled_from(DTYPE_NAMES)), [rows, draw(st.integers(0, 3))]]],
        "version": 0,
        "accepted": [],
        "survivors": [],
        "node": "stage1",
        "reason": "",
    }
    if header["kind"] != "segment" and draw(st.booleans()):
        del header["tensors"]
    for key in draw(st.lists(st.sampled_from(sorted(KEYS)), unique=True, max_size=4)):
        if draw(st.integers(0, 3)) == 0:
            header.pop(key, None)
        else:
            header[key] = draw(KEYS[key])
    specs = header.get("tensors")
    frames = [msgpack.packb(header)]
    count = len(specs) if isinstance(specs, list) and draw(st.integers(0, 4)) else draw(st.integers(0, 2))
    for i in range(count):
        size = _frame_size(specs[i]) if isinstance(specs, list) and i < len(specs) else None
        if size is None or size > 4096 or draw(st.integers(0, 5)) == 0:
            size = draw(st.integers(0, 64))
        frames.append(bytes(size))
    return frames


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plausible_messages())
def test_fuzz_plausible_headers(frames: list[bytes]) -> None:
    decode_or_protocol_error(frames)


@settings(max_examples=300, deadline=None)
@given(dtype_names, shapes, st.data())
def test_fuzz_segment_tensor_specs(dtype_name, shape, data) -> None:
    # An otherwise valid segment whose one tensor spec is arbitrary, with a frame of the promised
    # size where that is computable (so the shape checks, not the size check, must catch it).
    spec = [dtype_name, shape]
    rows = shape[0] if isinstance(shape, list) and shape and type(shape[0]) is int and 0 <= shape[0] <= 4 else 1
    header = segment_header(ids=list(range(rows)), parents=[-1] * rows, pos=list(range(rows)), tensors=[spec])
    size = _frame_size(spec)
    if size is None or size > 4096:
        size = data.draw(st.integers(0, 64))
    decode_or_protocol_error(frames_of(header, bytes(size)))


@FAST
@given(st.one_of(segments(), prunes, releases, stage_errors), st.data())
def test_fuzz_mutated_valid_messages(message, data) -> None:
    # Flip, drop or append bytes in a valid encoding: decode or ProtocolError, nothing else.
    frames = as_wire(encode(message))
    decode(frames)  # the unmutated message is valid
    index = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[index])
    action = data.draw(st.sampled_from(["flip", "cut", "append"]))
    if action == "flip" and frame:
        at = data.draw(st.integers(0, len(frame) - 1))
        frame[at] ^= data.draw(st.integers(1, 255))
    elif action == "cut":
        del frame[data.draw(st.integers(0, len(frame))) :]
    else:
        frame += data.draw(st.binary(min_size=1, max_size=8))
    frames[index] = bytes(frame)
    decode_or_protocol_error(frames)


# -- node control messages: readiness and heartbeats ---------------------------------------------

ready_messages = st.builds(NodeReady, node=st.text(max_size=40), pid=st.integers(0, 2**22))
heartbeats = st.builds(
    Heartbeat, node=st.text(max_size=40), busy_s=st.floats(0, 1e6), incarnation=st.text(max_size=40),
    rss_mb=st.floats(0, 1e7),
)


@FAST
@given(st.one_of(ready_messages, heartbeats))
def test_node_control_messages_round_trip(message) -> None:
    got = decode_control(bytes(encode_control(message)))
    assert type(got) is type(message) and got == message


def heartbeat_header(**overrides) -> dict:
    return {"v": SCHEMA_VERSION, "kind": "heartbeat", "node": "stage1", "busy_s": 0.25, "incarnation": "7-1",
            "rss_mb": 512.5, **overrides}


def control_rejected(frame: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_control(frame)


def test_hand_built_control_headers_decode() -> None:
    assert decode_control(msgpack.packb(heartbeat_header(busy_s=0))) == Heartbeat("stage1", 0.0, "7-1", 512.5)
    assert decode_control(msgpack.packb(heartbeat_header(rss_mb=300))) == Heartbeat("stage1", 0.25, "7-1", 300.0)
    ready = {"v": SCHEMA_VERSION, "kind": "ready", "node": "head", "pid": 4242}
    assert decode_control(msgpack.packb(ready)) == NodeReady("head", 4242)


@pytest.mark.parametrize("frame", [b"", b"\xc1", b"hello world", msgpack.packb([1, 2]), msgpack.packb("ready")])
def test_control_garbage_rejected(frame: bytes) -> None:
    control_rejected(frame, "msgpack|map")


@pytest.mark.parametrize("version", [0, SCHEMA_VERSION + 1, "1", None])
def test_control_wrong_schema_version_rejected(version) -> None:
    control_rejected(msgpack.packb(heartbeat_header(v=version)), "schema version")


@pytest.mark.parametrize("kind", ["release", "segment", "Heartbeat", "", 3, None, [1]])
def test_control_unknown_kind_rejected(kind) -> None:
    control_rejected(msgpack.packb(heartbeat_header(kind=kind)), "kind")


def test_ring_message_is_not_a_control_message() -> None:
    control_rejected(bytes(encode(Release(1))[0]), "kind")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("node", 3, "node"), ("node", None, "node"), ("node", b"stage1", "node"),
        ("incarnation", 7, "incarnation"),
        ("busy_s", -0.5, "busy_s"), ("busy_s", float("nan"), "busy_s"), ("busy_s", float("inf"), "busy_s"),
        ("busy_s", "0", "busy_s"), ("busy_s", True, "busy_s"), ("busy_s", None, "busy_s"),
        ("rss_mb", -1, "rss_mb"), ("rss_mb", float("inf"), "rss_mb"), ("rss_mb", "512", "rss_mb"),
        ("extra", 1, "unexpected fields"),
    ],
)
def test_heartbeat_fields_validated(field: str, value, match: str) -> None:
    control_rejected(msgpack.packb(heartbeat_header(**{field: value})), match)


@pytest.mark.parametrize("pid", [-1, True, "42", 4.5, None, 1 << 63])
def test_ready_pid_validated(pid) -> None:
    control_rejected(msgpack.packb({"v": SCHEMA_VERSION, "kind": "ready", "node": "head", "pid": pid}), "pid")


@pytest.mark.parametrize("missing", ["node", "busy_s", "incarnation", "rss_mb"])
def test_heartbeat_missing_field_rejected(missing: str) -> None:
    header = heartbeat_header()
    del header[missing]
    control_rejected(msgpack.packb(header), missing)


def test_oversized_control_message_rejected() -> None:
    control_rejected(msgpack.packb(heartbeat_header(node="s" * MAX_CONTROL_BYTES)), "limit")


control_headers = st.dictionaries(
    st.sampled_from(["v", "kind", "node", "pid", "busy_s", "incarnation", "rss_mb"]),
    st.one_of(msgpack_scalars, st.sampled_from([SCHEMA_VERSION, "ready", "heartbeat"])),
    max_size=7,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), control_headers.map(msgpack.packb)))
def test_fuzz_control_frames(frame: bytes) -> None:
    # Decode or ProtocolError, nothing else.
    try:
        message = decode_control(frame)
    except ProtocolError:
        return
    assert isinstance(message, (NodeReady, Heartbeat))


# -- batches of several requests' segments ---------------------------------------------------------


@FAST
@given(st.lists(segments(), min_size=1, max_size=5, unique_by=lambda s: s.request_id), st.booleans())
def test_batch_round_trip(parts: list[Segment], over_wire: bool) -> None:
    batch = protocol.Batch(tuple(parts))
    frames = encode(batch)
    assert len(frames) == 1 + len(parts)
    got = decode(as_wire(frames) if over_wire else frames)
    assert isinstance(got, protocol.Batch) and len(got.parts) == len(parts)
    for got_part, part in zip(got.parts, parts):
        assert_same_segment(got_part, part)


def batch_header(**changes) -> dict:
    part = {"req": 4, "seq": 1, "commit": False, "ids": [7], "parents": [-1], "pos": [3]}
    header = {"v": SCHEMA_VERSION, "kind": "batch", "req": 4, "parts": [part], "tensors": [["float32", [1, 2]]]}
    return {**header, **changes}


def test_hand_built_batch_decodes() -> None:
    got = decode([msgpack.packb(batch_header()), bytes(8)])
    assert isinstance(got, protocol.Batch) and got.parts[0].request_id == 4 and got.parts[0].node_ids == (7,)


@pytest.mark.parametrize("changes, message", [
    ({"parts": []}, "part maps"),
    ({"parts": "x"}, "part maps"),
    ({"parts": [7]}, "part maps"),
    ({"parts": [{"req": 4, "seq": 1, "commit": 1, "ids": [7], "parents": [-1], "pos": [3]}]}, "commit"),
    ({"parts": [{"req": -4, "seq": 1, "commit": False, "ids": [7], "parents": [-1], "pos": [3]}]}, "req"),
])
def test_malformed_batch_rejected(changes: dict, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode([msgpack.packb(batch_header(**changes)), bytes(8)])


def test_batch_repeating_a_request_or_empty_rejected() -> None:
    part = Segment(4, 1, False, (7,), (-1,), (3,), torch.zeros(1, 2))
    with pytest.raises(ProtocolError, match="repeat"):
        protocol.Batch((part, part))
    with pytest.raises(ProtocolError, match="1 to"):
        protocol.Batch(())
    two = batch_header(parts=batch_header()["parts"] * 2, tensors=[["float32", [1, 2]]] * 2)
    with pytest.raises(ProtocolError, match="repeat"):
        decode([msgpack.packb(two), bytes(8), bytes(8)])
