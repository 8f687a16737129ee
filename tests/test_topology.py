"""topology.toml parsing: the default file, layer splits, the ring, and a clear error per mistake."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from flowspec_zmq.emulation import DeviceProfile, LinkProfile
from flowspec_zmq.layer_sizes import layer_parameters, model_windows
from flowspec_zmq.topology import (
    DecodingConfig,
    HttpConfig,
    TopologyError,
    balanced_shares,
    default_topology_path,
    load_topology,
    local_topology_toml,
    make_local_topology,
    parse_topology,
)

MODEL = '[model]\nsource = "smollm2-135m"\n'
HEAD = '[[nodes]]\nname = "head"\nrole = "head"\nhost = "127.0.0.1"\nport = 6000\nclient_port = 6001\ncontrol_port = 6002\n'


def stage(name: str, port: int, layers: str = '"auto"', extra: str = "", host: str = "127.0.0.1") -> str:
    return f'[[nodes]]\nname = "{name}"\nrole = "stage"\nhost = "{host}"\nport = {port}\nlayers = {layers}\n{extra}'


def topology(*nodes: str, model: str = MODEL, rest: str = "", head: str = HEAD) -> str:
    return "\n".join([model, rest, head, *nodes])


ONE_STAGE = topology(stage("a", 6010))


def test_default_file_is_the_qwen_chat_model_on_four_loopback_stages():
    t = load_topology(default_topology_path())
    assert t.model.source == "qwen2.5-coder-1.5b" and t.model.dtype == "bfloat16"
    assert t.decoding.mode == "flowspec"
    assert [n.name for n in t.stages] == ["stage1", "stage2", "stage3", "stage4"]
    assert {n.host for n in t.nodes} == {"127.0.0.1"}
    assert all(n.layers is None for n in t.stages)
    assert t.layer_windows(28) == {"stage1": (0, 7), "stage2": (7, 14), "stage3": (14, 21), "stage4": (21, 28)}
    assert t.http is None  # the HTTP gateway is opt-in


def test_the_gemma_topology_runs_beside_the_default():
    gemma = load_topology(Path(__file__).resolve().parent.parent / "topologies" / "gemma3-270m.toml")
    assert gemma.model.source == "gemma3-270m" and gemma.decoding == DecodingConfig()
    assert gemma.layer_windows(18) == {"stage1": (0, 5), "stage2": (5, 10), "stage3": (10, 14), "stage4": (14, 18)}
    default = load_topology(default_topology_path())
    ports = [{p for n in t.nodes for p in (n.port, n.client_port, n.control_port)} for t in (gemma, default)]
    assert ports[0] & ports[1] <= {None}


def test_missing_decoding_table_gives_the_documented_defaults():
    d = parse_topology(ONE_STAGE).decoding
    assert d == DecodingConfig()
    assert (d.mode, d.max_new_tokens, d.temperature, d.top_k, d.top_p, d.draft) == ("flowspec", 128, 0.0, 0, 1.0, "int8")
    assert (d.tree_total_tokens, d.tree_depth, d.tree_top_k, d.segment_size, d.prefill_chunk) == (32, 8, 2, 12, 64)
    assert (d.tree_width, d.draft_vocab) == (1, 32768)


def test_integer_temperature_is_read_as_float():
    assert parse_topology(topology(stage("a", 6010), rest="[decoding]\ntemperature = 1\n")).decoding.temperature == 1.0


def test_http_table_defaults_and_values():
    assert parse_topology(topology(stage("a", 6010), rest="[http]\n")).http == HttpConfig("127.0.0.1", 8000, ())
    public = parse_topology(topology(stage("a", 6010), rest='[http]\nhost = "0.0.0.0"\nport = 9000\napi_keys = ["k1", "k2"]\n'))
    assert public.http == HttpConfig("0.0.0.0", 9000, ("k1", "k2"))


def test_ring_order_follows_the_file():
    t = parse_topology(topology(stage("b", 6020), stage("a", 6010), stage("c", 6030)))
    assert t.head.name == "head"
    assert [s.name for s in t.stages] == ["b", "a", "c"]
    assert [t.next_hop(n).name for n in ("head", "b", "a", "c")] == ["b", "a", "c", "head"]


def test_unknown_node_name_lists_the_nodes():
    with pytest.raises(KeyError, match="head, a"):
        parse_topology(ONE_STAGE).node("z")


def test_explicit_windows_and_auto_stages_mix():
    t = parse_topology(topology(stage("a", 6010, "[0, 4]"), stage("b", 6020), stage("c", 6030)))
    assert t.layer_windows(30) == {"a": (0, 4), "b": (4, 17), "c": (17, 30)}
    t = parse_topology(topology(stage("a", 6010), stage("b", 6020), stage("c", 6030, "[12, 18]")))
    assert t.layer_windows(18) == {"a": (0, 6), "b": (6, 12), "c": (12, 18)}


def test_fully_explicit_windows():
    t = parse_topology(topology(stage("a", 6010, "[0, 1]"), stage("b", 6020, "[1, 18]")))
    assert t.layer_windows(18) == {"a": (0, 1), "b": (1, 18)}


def hinted(speeds: list[float], memory: dict[int, float] | None = None) -> list[str]:
    """Auto stages a, b, c, ... with these speeds, stage i limited to memory[i] GB."""
    return [stage(name, 6010 + i, extra=f"speed = {speed}\n" + (f"memory_gb = {memory[i]}\n" if i in (memory or {}) else ""))
            for i, (name, speed) in enumerate(zip("abcdefgh", speeds))]


def slowest_stage_time(shares: list[int], speeds: list[float]) -> float:
    return max(share / speed for share, speed in zip(shares, speeds))


def test_a_stage_half_as_fast_gets_fewer_layers_and_no_stage_is_slower_than_it_must_be():
    t = parse_topology(topology(*hinted([1, 1, 0.5, 1])))
    assert t.layer_windows(18) == {"a": (0, 6), "b": (6, 11), "c": (11, 13), "d": (13, 18)}
    # Stage times 6, 5, 4, 5 (an even split: 5, 5, 8, 4). 5, 5, 3, 5 would also peak at 6 but adds a
    # slow layer to every token's trip through the ring.
    assert slowest_stage_time([6, 5, 2, 5], [1, 1, 0.5, 1]) == 6


@pytest.mark.parametrize("speeds", [[1, 1, 0.5, 1], [3, 1, 2], [0.7, 1.3, 1, 0.4, 2.5], [1, 1, 1]])
def test_balanced_shares_minimise_the_slowest_stage_like_a_brute_force(speeds):
    for layers in range(len(speeds), 13):
        best = min(slowest_stage_time(list(split), speeds)
                   for split in itertools.product(range(1, layers + 1), repeat=len(speeds)) if sum(split) == layers)
        shares = balanced_shares(layers, speeds, [float("inf")] * len(speeds))
        assert sum(shares) == layers and min(shares) >= 1
        assert slowest_stage_time(shares, speeds) == pytest.approx(best), (layers, shares)


def test_balanced_shares_respect_each_stage_room_and_stay_optimal():
    speeds, rooms = [1, 2, 1], [3, float("inf"), 2]
    for layers in range(3, 12):
        fits = [split for split in itertools.product(range(1, layers + 1), repeat=3)
                if sum(split) == layers and all(s <= r for s, r in zip(split, rooms))]
        shares = balanced_shares(layers, speeds, rooms)
        assert all(s <= r for s, r in zip(shares, rooms))
        assert slowest_stage_time(shares, speeds) == min(slowest_stage_time(list(s), speeds) for s in fits)


def test_explicit_windows_and_auto_stages_with_speeds_mix():
    t = parse_topology(topology(stage("a", 6010, "[0, 4]"), stage("b", 6020, extra="speed = 2\n"), stage("c", 6030)))
    # 26 free layers for b (twice as fast) and c: 18 and 8 (times 9 and 8)
    assert t.layer_windows(30) == {"a": (0, 4), "b": (4, 22), "c": (22, 30)}


LAYER = 10_000_000  # parameters of one decoder layer: 38 MB in float32
SMALL_KV = "[service]\nmax_kv_mb = 64\n"


def test_memory_gb_caps_an_auto_stage_and_the_others_take_the_rest():
    t = parse_topology(topology(*hinted([1, 1, 1], {1: 0.2}), rest=SMALL_KV))
    # 0.2 GB = 204.8 MB: 64 MB of KV caches and 3 layers of 38 MB
    assert t.layer_windows(18, LAYER) == {"a": (0, 8), "b": (8, 11), "c": (11, 18)}


@pytest.mark.parametrize(
    "nodes, fragment",
    [
        (hinted([1], {0: 0.2}),
         "nodes[1].memory_gb ('a'): 0.2 GB cannot hold its layers [0, 18): 18 x 38 MB of float32 weights "
         "+ 64 MB of KV caches ([service] max_kv_mb) = 0.73 GB"),
        (hinted([1, 1], {0: 0.2, 1: 0.3}), "nodes[1].memory_gb ('a'): 0.2 GB cannot hold its layers [0, 9): 9 x 38 MB"),
        (hinted([1, 1], {0: 0.05}), "nodes[1].memory_gb ('a'): 0.05 GB cannot hold its layers [0, 1): 1 x 38 MB"),
        ([stage("a", 6010, "[0, 9]", "memory_gb = 0.2\n"), stage("b", 6020)],
         "nodes[1].memory_gb ('a'): 0.2 GB cannot hold its layers [0, 9): 9 x 38 MB"),
    ],
)
def test_a_split_that_does_not_fit_names_the_stage_its_memory_and_its_need(nodes, fragment):
    t = parse_topology(topology(*nodes, rest=SMALL_KV), "my.toml")
    with pytest.raises(TopologyError, match=None) as error:
        t.layer_windows(18, LAYER)
    assert str(error.value).startswith("my.toml: ") and fragment in str(error.value), str(error.value)


def test_memory_gb_is_checked_against_the_model_own_layer_size(model_dir):
    # SmolLM2-135M: q, o 576x576, k, v 576x192, gate, up, down 576x1536, two norms of 576
    assert layer_parameters(model_dir) == 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    t = parse_topology(topology(*hinted([1, 1], {0: 2.05})))
    assert model_windows(t, model_dir) == {"a": (0, 3), "b": (3, 30)}  # 2048 MB of KV leave room for 3 layers of 13.5 MB
    with pytest.raises(ValueError, match="pass layer_params"):
        t.layer_windows(30)


def test_same_port_on_different_hosts_is_fine():
    t = parse_topology(topology(stage("a", 6010, host="10.0.0.2"), stage("b", 6010, host="10.0.0.3")))
    assert [s.port for s in t.stages] == [6010, 6010]


def test_emulation_settings_parse():
    t = parse_topology(topology(stage("a", 6010, extra="profile = { fixed_ms = 20.0, per_token_ms = 0.5 }\n"),
                                rest="[link]\nbandwidth_mbps = 150\ndelay_ms = 3\n"))
    assert t.node("a").profile == DeviceProfile(20.0, 0.5)
    assert t.link == LinkProfile(150.0, 3.0)


def test_make_local_topology_builds_a_validated_loopback_ring():
    t = make_local_topology("smollm2-135m", 3, ports=range(7000, 7006), mode="ar", max_new_tokens=9)
    assert (t.head.port, t.head.client_port, t.head.control_port) == (7000, 7001, 7002)
    assert [(s.name, s.host, s.port) for s in t.stages] == [
        ("stage1", "127.0.0.1", 7003), ("stage2", "127.0.0.1", 7004), ("stage3", "127.0.0.1", 7005)]
    assert (t.decoding.mode, t.decoding.max_new_tokens, t.decoding.segment_size) == ("ar", 9, 12)
    assert t.layer_windows(30) == {"stage1": (0, 10), "stage2": (10, 20), "stage3": (20, 30)}
    assert t.next_hop("stage3") == t.head
    assert t.link is None and all(s.profile is None for s in t.stages)


def test_local_topology_picks_distinct_free_ports_by_default():
    t = make_local_topology("smollm2-135m", 4)
    ports = [t.head.port, t.head.client_port, t.head.control_port, *(s.port for s in t.stages)]
    assert len(set(ports)) == 7 and all(1024 <= p <= 65535 for p in ports)


def test_local_topology_carries_emulation_hosts_and_typed_decoding_values():
    paced = [DeviceProfile(50.0, 0.8), DeviceProfile(40.0, 0.5)]
    text = local_topology_toml("gemma3-270m", 2, hosts=["10.0.0.1", "10.0.0.2", "10.0.0.3"], max_context=600,
                               link=LinkProfile(150.0, 3.0), profile=paced, temperature=0, draft="ngram")
    t = parse_topology(text)
    assert [n.host for n in t.nodes] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert t.model.max_context == 600 and t.link == LinkProfile(150.0, 3.0)
    assert [s.profile for s in t.stages] == paced
    assert (t.decoding.temperature, t.decoding.draft) == (0.0, "ngram")
    assert parse_topology(local_topology_toml("gemma3-270m", 2, draft="model:my-draft")).decoding.draft == "model:my-draft"
    one = make_local_topology("smollm2-135m", 3, profile=DeviceProfile(2.0, 0.1))
    assert {s.profile for s in one.stages} == {DeviceProfile(2.0, 0.1)}
    hinted_ring = make_local_topology("gemma3-270m", 4, speeds=[1, 0.5, 1, 1])
    assert [s.speed for s in hinted_ring.stages] == [1.0, 0.5, 1.0, 1.0]
    assert [last - first for first, last in hinted_ring.layer_windows(18).values()] == [6, 2, 5, 5]


def test_local_topology_wants_one_host_per_node_and_one_profile_per_stage():
    with pytest.raises(ValueError, match="need 3 hosts"):
        local_topology_toml("smollm2-135m", 2, hosts=["127.0.0.1"])
    with pytest.raises(ValueError, match="one profile each"):
        local_topology_toml("smollm2-135m", 2, profile=[DeviceProfile(1.0, 1.0)])
    with pytest.raises(ValueError, match="one speed each"):
        local_topology_toml("smollm2-135m", 2, speeds=[1.0])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"mode": "warp"}, "decoding.mode: must be one of"),
        ({"moood": 1}, "decoding.moood: unknown key"),
        ({"top_p": 2.0}, "decoding.top_p"),
    ],
)
def test_make_local_topology_validates_overrides(overrides, fragment):
    with pytest.raises(TopologyError, match=None) as error:
        make_local_topology("smollm2-135m", 2, **overrides)
    assert fragment in str(error.value)


def test_make_local_topology_needs_a_stage():
    with pytest.raises(TopologyError, match="at least one stage"):
        make_local_topology("smollm2-135m", 0)


def _without(text: str, line: str) -> str:
    assert line in text
    return text.replace(line, "", 1)


@pytest.mark.parametrize(
    "text, fragment",
    [
        # unknown keys, in every table
        (topology(stage("a", 6010), rest="[wat]\n"), "topology.wat: unknown key"),
        (topology(stage("a", 6010), model=MODEL + "colour = 1\n"), "model.colour: unknown key"),
        (topology(stage("a", 6010), rest="[decoding]\nmood = 1\n"), "decoding.mood: unknown key"),
        (topology(stage("a", 6010, extra="colour = 1\n")), "nodes[1].colour: unknown key"),
        (topology(stage("a", 6010, extra="profile = { fixed_ms = 1, per_token_ms = 1, x = 1 }\n")),
         "nodes[1].profile.x: unknown key"),
        (topology(stage("a", 6010), rest="[link]\nbandwidth_mbps = 1\nlatency = 1\n"), "link.latency: unknown key"),
        (topology(stage("a", 6010), rest="[http]\ncolour = 1\n"), "http.colour: unknown key"),
        # missing required keys
        (topology(stage("a", 6010), model='[model]\ndtype = "float32"\n'), "model.source: missing"),
        (topology(stage("a", 6010), model=""), "topology.model: missing"),
        (MODEL, "topology.nodes: missing"),
        (MODEL + '[nodes]\nname = "head"\n', "topology.nodes: must be an array of tables"),
        (_without(ONE_STAGE, 'host = "127.0.0.1"\nport = 6010\n'), "nodes[1].host: missing"),
        (_without(ONE_STAGE, "port = 6010\n"), "nodes[1].port: missing"),
        (_without(ONE_STAGE, 'name = "a"\n'), "nodes[1].name: missing"),
        (_without(ONE_STAGE, "client_port = 6001\n"), "nodes[0].client_port: missing"),
        (_without(ONE_STAGE, "control_port = 6002\n"), "nodes[0].control_port: missing"),
        # wrong types
        (topology(stage("a", '"6010"')), "nodes[1].port: must be int"),
        (topology(stage("a", 6010), rest='[decoding]\ntemperature = "hot"\n'), "decoding.temperature: must be int or float"),
        (topology(stage("a", 6010), rest="[decoding]\nmax_new_tokens = true\n"), "decoding.max_new_tokens: must be int"),
        (topology(stage("a", 6010), rest="[decoding]\nmax_new_tokens = 1.5\n"), "decoding.max_new_tokens: must be int"),
        (topology(stage("a", 6010), model="[model]\nsource = 3\n"), "model.source: must be str"),
        (topology(stage("a", 6010), model='decoding = "fast"\n' + MODEL), "my.toml: decoding: must be a table"),
        # roles, the one head, at least one stage
        (ONE_STAGE.replace('role = "stage"', 'role = "worker"'), "nodes[1].role: must be one of head, stage"),
        (topology(stage("a", 6010)).replace('role = "head"', 'role = "stage"').replace(
            "client_port = 6001\ncontrol_port = 6002\n", ""), "exactly one node with role = \"head\", found 0"),
        (topology(stage("a", 6010), HEAD.replace('"head"', '"head2"', 1).replace("600", "610")),
         "exactly one node with role = \"head\", found 2"),
        (topology(), "need at least one stage"),
        # names and ports
        (topology(stage("a", 6010), stage("a", 6020)), "nodes[2].name: duplicate name 'a' (also nodes[1])"),
        (topology(stage("a", 6010), stage("b", 6010)),
         "nodes[2].port: duplicate port 6010 on 127.0.0.1 (also used by nodes[1] 'a')"),
        (topology(stage("a", 6001)), "nodes[1].port: duplicate port 6001 on 127.0.0.1 (also used by nodes[0] 'head')"),
        (topology(stage("a", 6010), head=HEAD.replace("control_port = 6002", "control_port = 6000")),
         "nodes[0].control_port: duplicate port 6000"),
        (topology(stage("a", 70000)), "nodes[1].port: port 70000 is outside 1..65535"),
        (topology(stage("a", 0)), "nodes[1].port: port 0 is outside"),
        (topology(stage("a", 6010), head=HEAD.replace("client_port = 6001", "client_port = -1")),
         "nodes[0].client_port: port -1 is outside"),
        # choices
        (topology(stage("a", 6010), model='[model]\nsource = "x"\ndtype = "int3"\n'), "model.dtype: must be one of"),
        (topology(stage("a", 6010), rest='[decoding]\nmode = "warp"\n'), "decoding.mode: must be one of"),
        (topology(stage("a", 6010), rest='[decoding]\ndraft = "oracle"\n'), "decoding.draft: must be one of"),
        (topology(stage("a", 6010), rest='[decoding]\ndraft = "model: "\n'), "decoding.draft: must be one of int8, bf16, ngram or model:NAME_OR_PATH"),
        # sizes and sampling ranges
        (topology(stage("a", 6010), model=MODEL + "max_context = 0\n"), "model.max_context: must be positive"),
        (topology(stage("a", 6010), rest="[decoding]\nmax_new_tokens = -1\n"), "decoding.max_new_tokens: must be positive"),
        (topology(stage("a", 6010), rest="[decoding]\ntree_total_tokens = 0\n"), "decoding.tree_total_tokens: must be positive"),
        (topology(stage("a", 6010), rest="[decoding]\ntree_depth = 0\n"), "decoding.tree_depth: must be positive"),
        (topology(stage("a", 6010), rest="[decoding]\ntree_top_k = 0\n"), "decoding.tree_top_k: must be positive"),
        (topology(stage("a", 6010), rest="[decoding]\nsegment_size = 0\n"), "decoding.segment_size: must be positive"),
        (topology(stage("a", 6010), rest="[decoding]\ntree_width = 0\n"), "decoding.tree_width: must be positive"),
        (topology(stage("a", 6010), rest="[decoding]\ndraft_vocab = -1\n"), "decoding.draft_vocab: must be >= 0"),
        (topology(stage("a", 6010), rest="[decoding]\nprefill_chunk = 0\n"), "decoding.prefill_chunk: must be positive"),
        (topology(stage("a", 6010), rest="[decoding]\ntop_k = -1\n"), "decoding.top_k: must be >= 0"),
        (topology(stage("a", 6010), rest="[decoding]\ntemperature = -0.5\n"), "decoding.temperature: must be >= 0"),
        (topology(stage("a", 6010), rest="[decoding]\ntop_p = 0\n"), "decoding.top_p: must be in (0, 1]"),
        (topology(stage("a", 6010), rest="[decoding]\ntop_p = 1.5\n"), "decoding.top_p: must be in (0, 1]"),
        # layers
        (topology(stage("a", 6010, "[3, 1]")), "nodes[1].layers: must be"),
        (topology(stage("a", 6010, "[2, 2]")), "nodes[1].layers: must be"),
        (topology(stage("a", 6010, "[-1, 2]")), "nodes[1].layers: must be"),
        (topology(stage("a", 6010, "[0, 1, 2]")), "nodes[1].layers: must be"),
        (topology(stage("a", 6010, "[0.0, 2.0]")), "nodes[1].layers: must be"),
        (topology(stage("a", 6010, '"half"')), "nodes[1].layers: must be"),
        (topology(stage("a", 6010), head=HEAD + 'layers = "auto"\n'), "nodes[0].layers: the head holds no decoder layers"),
        (topology(stage("a", 6010, extra="client_port = 7000\n")), "nodes[1].client_port: only the head has this port"),
        (topology(stage("a", 6010, extra="control_port = 7000\n")), "nodes[1].control_port: only the head has this port"),
        # speed and memory hints
        (topology(stage("a", 6010, extra="speed = 0\n")), "nodes[1].speed: must be positive"),
        (topology(stage("a", 6010, extra="speed = -2.0\n")), "nodes[1].speed: must be positive"),
        (topology(stage("a", 6010, extra='speed = "fast"\n')), "nodes[1].speed: must be int or float"),
        (topology(stage("a", 6010, extra="speed = nan\n")), "nodes[1].speed: must be positive"),
        (topology(stage("a", 6010, extra="memory_gb = 0\n")), "nodes[1].memory_gb: must be positive"),
        (topology(stage("a", 6010, extra="memory_gb = true\n")), "nodes[1].memory_gb: must be int or float"),
        (topology(stage("a", 6010), head=HEAD + "speed = 2.0\n"), "nodes[0].speed: only stages are given a share"),
        (topology(stage("a", 6010), head=HEAD + "memory_gb = 8\n"), "nodes[0].memory_gb: only stages are given a share"),
        # the HTTP gateway
        (topology(stage("a", 6010), rest="[http]\nport = 0\n"), "http.port: port 0 is outside"),
        (topology(stage("a", 6010), rest='[http]\napi_keys = "k"\n'), "http.api_keys: must be list"),
        (topology(stage("a", 6010), rest='[http]\napi_keys = ["k", ""]\n'), "http.api_keys: must be a list of non-empty strings"),
        (topology(stage("a", 6010), rest='[http]\nhost = "0.0.0.0"\n'),
         "http.host: serving on 0.0.0.0 (not loopback) without api_keys would let anyone"),
        (topology(stage("a", 6010), rest="[http]\nport = 6001\n"),
         "http.port: port 6001 on 127.0.0.1 is also nodes[0].client_port ('head')"),
        (topology(stage("http", 6010), rest="[http]\n"), "nodes[1].name: 'http' names the HTTP gateway when [http] is set"),
        # syntax
        ("[model\nsource=", "not valid TOML"),
    ],
)
def test_each_mistake_names_its_key(text, fragment):
    with pytest.raises(TopologyError, match=None) as error:
        parse_topology(text, "my.toml")
    message = str(error.value)
    assert message.startswith("my.toml: ") and fragment in message, message


@pytest.mark.parametrize(
    "layers, fragment",
    [
        (("[0, 10]", "[5, 30]"), "nodes[2].layers ('b'): overlaps the window of 'a'"),
        (("[0, 10]", "[12, 30]"), "layers [10, 11] belong to no stage (next to 'a' [0, 10] and 'b' [12, 30])"),
        (("[0, 10]", "[10, 40]"), "nodes[2].layers ('b'): [10, 40) goes beyond the model's 30 layers"),
        (("[20, 30]", "[0, 20]"), "ring (file) order, got 'a' (20, 30), 'b' (0, 20)"),
        (('"auto"', "[5, 10]"), "nodes[1].layers ('a'): its auto share of layers"),
        (("[0, 29]", '"auto"', '"auto"'), "2 auto stages (b, c) but only 1 unclaimed layers"),
    ],
)
def test_bad_layer_windows_name_the_nodes(layers, fragment):
    stages = [stage(name, 6010 + i, window) for i, (name, window) in enumerate(zip("abc", layers))]
    t = parse_topology(topology(*stages), "my.toml")
    with pytest.raises(TopologyError, match=None) as error:
        t.layer_windows(30)
    message = str(error.value)
    assert message.startswith("my.toml: nodes") and fragment in message, message


def test_more_auto_stages_than_layers_is_an_error():
    with pytest.raises(TopologyError, match="4 auto stages"):
        make_local_topology("smollm2-135m", 4).layer_windows(3)


def test_missing_topology_file_is_a_clear_error(tmp_path):
    with pytest.raises(TopologyError, match="nope.toml: cannot read"):
        load_topology(tmp_path / "nope.toml")


def test_syntax_error_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[model]\nsource = \n")
    with pytest.raises(TopologyError, match=r"broken\.toml: not valid TOML"):
        load_topology(path)
