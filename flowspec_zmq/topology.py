"""topology.toml: which model, which nodes where, which layers each stage runs, request defaults.

Parsed with tomllib into frozen dataclasses. Every mistake is a TopologyError naming the file and
the key, e.g. `topology.toml: nodes[2].port: duplicate port 5610 on 127.0.0.1 (also used by nodes[1]
'stage1')`.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import tomllib
from dataclasses import asdict, dataclass, fields
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, NoReturn, Sequence, get_args

from .devices import is_device_name
from .emulation import DeviceProfile, LinkProfile
from .strategies import MODES, Mode

Role = Literal["head", "stage"]
Dtype = Literal["float32", "bfloat16", "float16"]
DraftKind = Literal["int8", "bf16", "ngram"]
Draft = str  # a DraftKind, or "model:NAME_OR_PATH": another model sharing the target's tokenizer
DTYPES: tuple[str, ...] = get_args(Dtype)
ITEMSIZE: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per weight of each Dtype
DRAFTS: tuple[str, ...] = get_args(DraftKind)


class TopologyError(ValueError):
    """A topology file that cannot be used as written."""


@dataclass(frozen=True)
class ModelConfig:
    source: str  # a known model name (models.MODELS) or a prepared model directory
    dtype: Dtype = "float32"
    max_context: int = 2048


@dataclass(frozen=True)
class DecodingConfig:
    mode: Mode = "flowspec"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # sampling seed; None: the head draws one per request (returned in its statistics)
    draft: Draft = "int8"
    # Tree shape measured best on the edge testbed (README "Tuning"): a deep, narrow tree.
    tree_total_tokens: int = 32
    tree_depth: int = 8
    tree_top_k: int = 2
    tree_width: int = 1
    draft_vocab: int = 32768
    segment_size: int = 12
    prefill_chunk: int = 64


@dataclass(frozen=True)
class ServiceConfig:
    """How the cluster keeps serving through failures and load ([service] in the topology)."""

    recovery_timeout_s: float = 30.0  # a request waits this long for a dead stage to come back
    max_recoveries: int = 3  # re-prefills per request before it fails
    progress_timeout_s: float = 20.0  # ring silence (segments in flight, nothing back) that counts as a failure
    dead_after_s: float = 3.0  # a stage without heartbeats this long is dead
    hung_after_s: float = 120.0  # a stage busy with one computation this long is hung
    max_requests: int = 8  # requests decoding at once, sharing the ring (continuous batching)
    max_batch_rows: int = 48  # rows of all requests in one ring message
    max_queued_requests: int = 64  # waiting requests beyond the running ones; more get "queue full"
    max_open_caches: int = 64  # request KV caches a stage keeps at once (least recently used evicted)
    max_kv_mb: int = 2048  # a stage's KV caches together; the head admits requests within it
    restart_limit: int = 5  # deaths of one node within restart_window_s that `flowspec launch` tolerates
    restart_window_s: float = 300.0
    restart_backoff_s: float = 0.5  # first restart delay; doubles per recent death, at most 30 s


MB, GB = 1 << 20, 1 << 30
LOOPBACK = "127.0.0.1"
HTTP_NODE = "http"  # the gateway's name among the nodes `flowspec launch` starts


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible HTTP gateway ([http] in the topology; `flowspec launch` starts it)."""

    host: str = LOOPBACK
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # accepted `Authorization: Bearer KEY`s; none: no key asked (loopback only)


def exposure_problem(host: str, api_keys: Sequence[str]) -> str | None:
    """Why serving HTTP on `host` with these keys is refused: beyond loopback, only with a key."""
    if api_keys or host == "localhost" or _is_loopback_address(host):
        return None
    return (f"serving on {host} (not loopback) without api_keys would let anyone who reaches it use the "
            "model; set api_keys = [\"...\"] in [http] or serve on 127.0.0.1")


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


@dataclass(frozen=True)
class NodeConfig:
    name: str
    role: Role
    host: str
    port: int
    layers: tuple[int, int] | None = None  # None: a share of the layers nobody claimed, balanced by speed
    client_port: int | None = None
    control_port: int | None = None
    profile: DeviceProfile | None = None  # emulate this device's speed (stages only)
    speed: float = 1.0  # relative speed of an auto stage (2.0: twice as fast); its share of layers follows it
    memory_gb: float | None = None  # memory a stage may use for its weights and KV caches; None: no limit
    device: str = "cpu"  # where the node computes: cpu, cuda, cuda:N or mps
    dtype: Dtype | None = None  # this node's weights and caches; None: [model] dtype


@dataclass(frozen=True)
class Topology:
    model: ModelConfig
    decoding: DecodingConfig
    nodes: tuple[NodeConfig, ...]
    link: LinkProfile | None = None  # emulate these links on every hop
    path: str = "<string>"
    keys: Path | None = None  # CurveZMQ key folder ([security] keys): every link authenticated
    service: ServiceConfig = ServiceConfig()
    http: HttpConfig | None = None  # serve the OpenAI-compatible API ([http])

    @property
    def head(self) -> NodeConfig:
        return next(n for n in self.nodes if n.role == "head")

    @property
    def client_address(self) -> str:
        """Where clients reach the head."""
        return f"tcp://{self.head.host}:{self.head.client_port}"

    @property
    def stages(self) -> tuple[NodeConfig, ...]:
        return tuple(n for n in self.nodes if n.role == "stage")

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"{self.path}: no node named {name!r}; nodes are {', '.join(n.name for n in self.nodes)}")

    def next_hop(self, name: str) -> NodeConfig:
        ring = [self.head, *self.stages]
        index = [n.name for n in ring].index(self.node(name).name)
        return ring[(index + 1) % len(ring)]

    def layer_windows(self, num_layers: int, layer_params: int | None = None) -> dict[str, tuple[int, int]]:
        """Each stage's [first, last) layers. "auto" stages share the unclaimed layers in file order,
        each as many as balanced_shares gives it for its speed and memory_gb (equal speeds: an even
        split, earlier stages taking the remainder). `layer_params`, the parameters of one decoder
        layer (layer_sizes.model_windows reads them), is needed once a stage declares memory_gb."""
        stages = self.stages
        claimed = sorted((n.layers, n.name) for n in stages if n.layers is not None)
        for (start, end), name in claimed:
            if end > num_layers:
                self._fail_layers(name, f"[{start}, {end}) goes beyond the model's {num_layers} layers")
        for ((_, end_a), a), ((start_b, _), b) in zip(claimed, claimed[1:]):
            if start_b < end_a:
                self._fail_layers(b, f"overlaps the window of {a!r} (layers {start_b}..{end_a - 1} claimed twice)")
        auto = [n for n in stages if n.layers is None]
        free = [i for i in range(num_layers) if not any(s <= i < e for (s, e), _ in claimed)]
        if len(free) < len(auto):
            self._fail_layers(auto[0].name, f"{len(auto)} auto stages ({', '.join(n.name for n in auto)}) but only "
                              f"{len(free)} unclaimed layers")
        if layer_params is None and (limited := next((n for n in stages if n.memory_gb is not None), None)):
            raise ValueError(f"{limited.name}'s memory_gb needs the model's layer size: pass layer_params")
        windows = {name: layers for layers, name in claimed}
        shares = balanced_shares(len(free), [n.speed for n in auto], [self._layer_room(n, layer_params or 0) for n in auto])
        cursor = 0
        for node, size in zip(auto, shares):
            chunk = free[cursor : cursor + size]
            if chunk != list(range(chunk[0], chunk[-1] + 1)):
                self._fail_layers(node.name, f"its auto share of layers {chunk} is not contiguous; give the stages around it explicit windows")
            windows[node.name] = (chunk[0], chunk[-1] + 1)
            cursor += size
        if lost := free[cursor:]:  # only when no stage is auto
            around = " and ".join(f"{n!r} {list(w)}" for n, w in windows.items() if w[1] == lost[0] or w[0] == lost[-1] + 1)
            self._fail_layers(None, f"layers {lost} belong to no stage{f' (next to {around})' if around else ''}; "
                             "widen a window or add an auto stage")
        ring_order = [windows[n.name] for n in stages]
        if ring_order != sorted(ring_order):
            named = ", ".join(f"{n.name!r} {windows[n.name]}" for n in stages)
            self._fail_layers(None, f"stages must hold consecutive layers in ring (file) order, got {named}")
        for node in stages:
            first, last = windows[node.name]
            if last - first > self._layer_room(node, layer_params or 0):
                self._fail_layers(node.name, f"{node.memory_gb:g} GB cannot hold its layers [{first}, {last}): "
                                  f"{self._memory_need(node, last - first, layer_params or 0)}", key="memory_gb")
        return windows

    def dtype_of(self, node: NodeConfig) -> Dtype:
        return node.dtype or self.model.dtype

    def _layer_room(self, node: NodeConfig, layer_params: int) -> float:
        """How many layers fit in the node's memory_gb beside its KV caches (inf: no limit)."""
        if node.memory_gb is None:
            return float("inf")
        return (node.memory_gb * GB - self.service.max_kv_mb * MB) // (layer_params * ITEMSIZE[self.dtype_of(node)])

    def _memory_need(self, node: NodeConfig, layers: int, layer_params: int) -> str:
        kv = self.service.max_kv_mb * MB
        layer_bytes = layer_params * ITEMSIZE[self.dtype_of(node)]
        return (f"{layers} x {layer_bytes / MB:.0f} MB of {self.dtype_of(node)} weights + {self.service.max_kv_mb} MB "
                f"of KV caches ([service] max_kv_mb) = {(layers * layer_bytes + kv) / GB:.2f} GB")

    def _fail_layers(self, node_name: str | None, problem: str, key: str = "layers") -> NoReturn:
        """Raise a TopologyError at `nodes[i].KEY` of the named node, or at `nodes` as a whole."""
        if node_name is None:
            raise TopologyError(f"{self.path}: nodes: {problem}")
        index = next(i for i, n in enumerate(self.nodes) if n.name == node_name)
        raise TopologyError(f"{self.path}: nodes[{index}].{key} ({node_name!r}): {problem}")


def balanced_shares(layers: int, speeds: Sequence[float], rooms: Sequence[float]) -> list[int]:
    """Layers per stage: one each, then every further layer to the stage whose paced time after taking
    it, (share + 1) / speed, is smallest among those with room left. Each step takes the smallest
    stage time still on offer, so the largest one ends up as small as whole layers allow. A tie goes
    to the faster stage (less time added to a token's trip through the ring), then the earlier one.
    When no stage has room the layer goes to the best stage anyway, so that the memory check names a
    stage that overflows."""
    shares = [1] * len(speeds)
    for _ in range(layers - len(speeds) if speeds else 0):
        candidates = [i for i, share in enumerate(shares) if share < rooms[i]] or range(len(shares))
        best = min(candidates, key=lambda i: ((shares[i] + 1) / speeds[i], 1 / speeds[i], i))
        shares[best] += 1
    return shares


class _Reader:
    """Typed access to one TOML table, naming the key path in every error."""

    def __init__(self, path: str, where: str, table: Any) -> None:
        self.path, self.where = path, where
        if not isinstance(table, dict):
            self.fail("", "must be a table")
        self.table = table

    def fail(self, key: str, problem: str) -> NoReturn:
        place = f"{self.where}.{key}" if key else self.where
        raise TopologyError(f"{self.path}: {place}: {problem}")

    def only(self, allowed: set[str]) -> None:
        for key in self.table:
            if key not in allowed:
                self.fail(key, f"unknown key (known: {', '.join(sorted(allowed))})")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., choices: tuple = ()) -> Any:
        if key not in self.table:
            if default is ...:
                self.fail(key, "missing")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            self.fail(key, f"must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        if choices and value not in choices:
            self.fail(key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value

    def positive(self, key: str, default: Any, kind: type = int, limit: float = float("inf")) -> Any:
        value = self.get(key, kind if kind is int else (int, float), default)
        if not 0 < value <= limit:
            self.fail(key, f"must be positive and at most {limit}, got {value}")
        return value


def _draft(reader: _Reader, default: str) -> str:
    value = reader.get("draft", str, default)
    if value not in DRAFTS and not (value.startswith("model:") and value.removeprefix("model:").strip()):
        reader.fail("draft", f"must be one of {', '.join(DRAFTS)} or model:NAME_OR_PATH, got {value!r}")
    return value


def _port(reader: _Reader, key: str, required: bool) -> int | None:
    value = reader.get(key, int, ... if required else None)
    if value is not None and not 1 <= value <= 65535:
        reader.fail(key, f"port {value} is outside 1..65535")
    return value


def _model(path: str, table: Any) -> ModelConfig:
    r = _Reader(path, "model", table)
    r.only({f.name for f in fields(ModelConfig)})
    return ModelConfig(r.get("source", str), r.get("dtype", str, "float32", DTYPES), r.positive("max_context", 2048))


MAX_TREE = 1024  # tree and segment sizes; more would only stall the ring


def _decoding(path: str, table: Any, where: str = "decoding") -> DecodingConfig:
    r = _Reader(path, where, table)
    r.only({f.name for f in fields(DecodingConfig)})
    d = DecodingConfig()
    temperature = float(r.get("temperature", (int, float), d.temperature))
    if temperature < 0:
        r.fail("temperature", "must be >= 0")
    top_p = float(r.get("top_p", (int, float), d.top_p))
    if not 0 < top_p <= 1:
        r.fail("top_p", "must be in (0, 1]")
    top_k = r.get("top_k", int, d.top_k)
    if top_k < 0:
        r.fail("top_k", "must be >= 0")
    return DecodingConfig(
        mode=r.get("mode", str, d.mode, MODES),
        max_new_tokens=r.positive("max_new_tokens", d.max_new_tokens, limit=1 << 20),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=r.get("seed", (int, type(None)), d.seed),  # None (from a merged default): a random seed
        draft=_draft(r, d.draft),
        tree_total_tokens=r.positive("tree_total_tokens", d.tree_total_tokens, limit=MAX_TREE),
        tree_depth=r.positive("tree_depth", d.tree_depth, limit=MAX_TREE),
        tree_top_k=r.positive("tree_top_k", d.tree_top_k, limit=MAX_TREE),
        tree_width=r.positive("tree_width", d.tree_width, limit=MAX_TREE),
        draft_vocab=_draft_vocab(r, d.draft_vocab),
        segment_size=r.positive("segment_size", d.segment_size, limit=MAX_TREE),
        prefill_chunk=r.positive("prefill_chunk", d.prefill_chunk),
    )


def _draft_vocab(r: _Reader, default: int) -> int:
    value = r.get("draft_vocab", int, default)
    if value < 0:
        r.fail("draft_vocab", "must be >= 0 (0: the whole vocabulary)")
    return value


def override_decoding(base: DecodingConfig, overrides: dict[str, Any]) -> DecodingConfig:
    """A request's options: the topology's defaults with a client's overrides, checked like a file."""
    return _decoding("request", {**asdict(base), **overrides}, where="options")


def _profile(path: str, where: str, table: Any) -> DeviceProfile:
    r = _Reader(path, where, table)
    r.only({"fixed_ms", "per_token_ms"})
    return DeviceProfile(float(r.positive("fixed_ms", ..., float)), float(r.positive("per_token_ms", ..., float)))


def _link(path: str, table: Any) -> LinkProfile:
    r = _Reader(path, "link", table)
    r.only({"bandwidth_mbps", "delay_ms"})
    bandwidth = float(r.get("bandwidth_mbps", (int, float), 0.0))
    delay = float(r.get("delay_ms", (int, float), 0.0))
    if bandwidth < 0 or delay < 0:
        r.fail("", "bandwidth_mbps and delay_ms must be >= 0")
    return LinkProfile(bandwidth, delay)


MAX_HINT = 1e6  # speed and memory_gb: any real machine is far below


def _node(path: str, index: int, table: Any) -> NodeConfig:
    r = _Reader(path, f"nodes[{index}]", table)
    r.only({f.name for f in fields(NodeConfig)})
    name = r.get("name", str)
    role = r.get("role", str, ..., ("head", "stage"))
    layers_value = r.get("layers", (str, list), None)
    layers: tuple[int, int] | None = None
    if role == "head":
        if layers_value is not None:
            r.fail("layers", "the head holds no decoder layers")
        if "profile" in r.table:
            r.fail("profile", "only stages are paced to a device profile")
        for key in ("speed", "memory_gb"):
            if key in r.table:
                r.fail(key, "only stages are given a share of the layers")
    else:
        for key in ("client_port", "control_port"):
            if key in r.table:
                r.fail(key, "only the head has this port")
        if isinstance(layers_value, list):
            if len(layers_value) != 2 or not all(type(v) is int for v in layers_value) or not 0 <= layers_value[0] < layers_value[1]:
                r.fail("layers", f'must be "auto" or [start, end) with 0 <= start < end, got {layers_value!r}')
            layers = (layers_value[0], layers_value[1])
        elif layers_value not in (None, "auto"):
            r.fail("layers", f'must be "auto" or [start, end), got {layers_value!r}')
    return NodeConfig(
        name=name,
        role=role,
        host=r.get("host", str),
        port=_port(r, "port", True),
        layers=layers,
        client_port=_port(r, "client_port", role == "head"),
        control_port=_port(r, "control_port", role == "head"),
        profile=_profile(path, f"nodes[{index}].profile", r.table["profile"]) if "profile" in r.table else None,
        speed=float(r.positive("speed", 1.0, float, limit=MAX_HINT)),
        memory_gb=float(r.positive("memory_gb", ..., float, limit=MAX_HINT)) if "memory_gb" in r.table else None,
        device=_device(r),
        dtype=r.get("dtype", str, None, DTYPES),
    )


def _device(reader: _Reader) -> str:
    value = reader.get("device", str, "cpu")
    if not is_device_name(value):
        reader.fail("device", f"must be cpu, cuda, cuda:N or mps, got {value!r}")
    return value


def _check_nodes(path: str, nodes: list[NodeConfig]) -> None:
    heads = [i for i, n in enumerate(nodes) if n.role == "head"]
    if len(heads) != 1:
        raise TopologyError(f"{path}: nodes: need exactly one node with role = \"head\", found {len(heads)}")
    if len(nodes) < 2:
        raise TopologyError(f"{path}: nodes: need at least one stage")
    seen_names: dict[str, int] = {}
    seen_ports: dict[tuple[str, int], tuple[int, str]] = {}
    for i, node in enumerate(nodes):
        if node.name in seen_names:
            raise TopologyError(f"{path}: nodes[{i}].name: duplicate name {node.name!r} (also nodes[{seen_names[node.name]}])")
        seen_names[node.name] = i
        for key in ("port", "client_port", "control_port"):
            port = getattr(node, key)
            if port is None:
                continue
            if (node.host, port) in seen_ports:
                other, other_name = seen_ports[node.host, port]
                raise TopologyError(
                    f"{path}: nodes[{i}].{key}: duplicate port {port} on {node.host} (also used by nodes[{other}] {other_name!r})"
                )
            seen_ports[node.host, port] = (i, node.name)


def parse_topology(text: str, path: str = "<string>") -> Topology:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{path}: not valid TOML: {exc}") from None
    return _build(data, path)


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct ports the OS reports free right now (bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {value!r} as a TOML value")


def local_topology_toml(
    model: str,
    num_stages: int,
    *,
    hosts: Sequence[str] | None = None,
    max_context: int = 1024,
    link: LinkProfile | None = None,
    profile: DeviceProfile | Sequence[DeviceProfile] | None = None,
    speeds: Sequence[float] | None = None,
    ports: Sequence[int] | None = None,
    dtype: str = "float32",
    service: dict[str, Any] | None = None,
    **decoding: Any,
) -> str:
    """The text of a ring of `num_stages` auto-split stages, for tests and benchmarks.

    `hosts[i]` places node i (the head first) on that address, else all on 127.0.0.1. `ports` are
    the head's ring, client and control ports followed by one per stage (default: free ports now).
    `profile` paces every stage alike, or stage i to profile[i]; stage i declares `speed = speeds[i]`
    (the auto split balances by it); `link` shapes every hop; `service` and `decoding` fill those
    tables. Nothing is checked here: parse_topology does that.
    """
    hosts = list(hosts) if hosts is not None else [LOOPBACK] * (num_stages + 1)
    ports = list(ports) if ports is not None else free_ports(num_stages + 3)
    if len(hosts) != num_stages + 1 or len(ports) != num_stages + 3:
        raise ValueError(f"{num_stages} stages need {num_stages + 1} hosts and {num_stages + 3} ports, "
                         f"got {len(hosts)} and {len(ports)}")
    profiles = list(profile) if isinstance(profile, Sequence) else [profile] * num_stages
    if len(profiles) != num_stages:
        raise ValueError(f"{num_stages} stages need one profile each, got {len(profiles)}")
    if speeds is not None and len(speeds) != num_stages:
        raise ValueError(f"{num_stages} stages need one speed each, got {len(speeds)}")
    lines = [f"[model]\nsource = {_toml_value(model)}\ndtype = {_toml_value(dtype)}\nmax_context = {max_context}\n",
             "[decoding]", *(f"{key} = {_toml_value(value)}" for key, value in decoding.items()), ""]
    if service:
        lines += ["[service]", *(f"{key} = {_toml_value(value)}" for key, value in service.items()), ""]
    if link is not None:
        lines.append(f"[link]\nbandwidth_mbps = {link.bandwidth_mbps!r}\ndelay_ms = {link.delay_ms!r}\n")
    lines.append(f'[[nodes]]\nname = "head"\nrole = "head"\nhost = "{hosts[0]}"\nport = {ports[0]}\n'
                 f"client_port = {ports[1]}\ncontrol_port = {ports[2]}\n")
    for i, paced in enumerate(profiles):
        lines.append(f'[[nodes]]\nname = "stage{i + 1}"\nrole = "stage"\nhost = "{hosts[i + 1]}"\n'
                     f'port = {ports[3 + i]}\nlayers = "auto"\n')
        if paced is not None:
            lines.append(f"profile = {{ fixed_ms = {paced.fixed_ms!r}, per_token_ms = {paced.per_token_ms!r} }}\n")
        if speeds is not None:
            lines.append(f"speed = {float(speeds[i])!r}\n")
    return "\n".join(lines)


def make_local_topology(model: str, num_stages: int, **options: Any) -> Topology:
    """local_topology_toml(...) parsed and validated exactly like a file."""
    return parse_topology(local_topology_toml(model, num_stages, **options), f"<local topology of {num_stages} stages>")


def _build(data: dict[str, Any], path: str) -> Topology:
    root = _Reader(path, "topology", data)
    root.only({"model", "decoding", "nodes", "link", "security", "service", "http"})
    if "model" not in data:
        root.fail("model", "missing")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list):
        root.fail("nodes", "missing" if raw_nodes is None else "must be an array of tables, written [[nodes]]")
    nodes = [_node(path, i, table) for i, table in enumerate(raw_nodes)]
    _check_nodes(path, nodes)
    http = _http(path, data["http"], nodes) if "http" in data else None
    return Topology(
        model=_model(path, data["model"]),
        decoding=_decoding(path, data.get("decoding", {})),
        nodes=tuple(nodes),
        link=_link(path, data["link"]) if "link" in data else None,
        path=path,
        keys=_keys(path, data["security"]) if "security" in data else None,
        service=_service(path, data.get("service", {})),
        http=http,
    )


def _http(path: str, table: Any, nodes: list[NodeConfig]) -> HttpConfig:
    r = _Reader(path, "http", table)
    r.only({f.name for f in fields(HttpConfig)})
    keys = r.get("api_keys", list, [])
    if not all(isinstance(key, str) and key for key in keys):
        r.fail("api_keys", "must be a list of non-empty strings")
    http = HttpConfig(r.get("host", str, LOOPBACK), _port(r, "port", False) or HttpConfig.port, tuple(keys))
    if problem := exposure_problem(http.host, http.api_keys):
        r.fail("host", problem)
    for i, node in enumerate(nodes):
        if node.name == HTTP_NODE:
            raise TopologyError(f"{path}: nodes[{i}].name: {HTTP_NODE!r} names the HTTP gateway when [http] is set")
        for key in ("port", "client_port", "control_port"):
            if node.host == http.host and getattr(node, key) == http.port:
                r.fail("port", f"port {http.port} on {http.host} is also nodes[{i}].{key} ({node.name!r})")
    return http


def _service(path: str, table: Any) -> ServiceConfig:
    r = _Reader(path, "service", table)
    defaults = ServiceConfig()
    r.only(set(asdict(defaults)))
    return ServiceConfig(**{
        name: r.positive(name, value, type(value), limit=86400 if isinstance(value, float) else 1 << 20)
        for name, value in asdict(defaults).items()
    })


def _keys(path: str, table: Any) -> Path:
    r = _Reader(path, "security", table)
    r.only({"keys"})
    folder = Path(r.get("keys", str)).expanduser()
    # Relative to the topology file, so a cluster's files can travel together.
    folder = folder if folder.is_absolute() or path.startswith("<") else Path(path).resolve().parent / folder
    if not folder.is_dir():
        r.fail("keys", f"key folder {folder} does not exist; create it with `flowspec keys {folder}`")
    return folder


def load_topology(path: Path | str) -> Topology:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read the topology file: {exc.strerror}") from None
    return parse_topology(text, str(path))


def default_topology_path() -> Path:
    """The repo's topology.toml, shipped as package data (in a checkout the package holds a link
    to it, so there is one file to edit)."""
    return Path(str(files(__package__) / "topology.toml")).resolve()
