"""Where nodes compute: a per-node `device` and `dtype` in the topology. This machine has no
accelerator, so the plumbing runs with `device = "cpu"` given explicitly (the real-process tests'
cluster, tests/conftest.py `ring2`, names it on every node; here an in-process ring): results leave
a stage in host memory, output stays the target's, and a device the host lacks is one clear error."""

from __future__ import annotations

import pytest
import torch

from flowspec_zmq.devices import DeviceUnavailable, available_device, is_device_name
from flowspec_zmq.draft import NgramDraft, TreeShape
from flowspec_zmq.launch import LocalCluster
from flowspec_zmq.model_slices import load_head_model, load_layer_window
from flowspec_zmq.profile_stage import main as profile_main
from flowspec_zmq.protocol import Segment
from flowspec_zmq.topology import TopologyError, local_topology_toml, parse_topology

from .conftest import PROMPTS, TEST_MODEL
from .inprocess import in_process_ring

TOPOLOGY = """
[model]
source = "smollm2-135m"
dtype = "float32"
[[nodes]]
name = "head"
role = "head"
host = "127.0.0.1"
port = 7000
client_port = 7001
control_port = 7002
device = "cpu"
[[nodes]]
name = "stage1"
role = "stage"
host = "127.0.0.1"
port = 7010
"""


def test_nodes_name_their_device_and_dtype():
    topology = parse_topology(TOPOLOGY + 'device = "cuda:1"\ndtype = "bfloat16"\n')
    head, stage = topology.nodes
    assert (head.device, head.dtype, topology.dtype_of(head)) == ("cpu", None, "float32")
    assert (stage.device, stage.dtype, topology.dtype_of(stage)) == ("cuda:1", "bfloat16", "bfloat16")
    with pytest.raises(TopologyError, match=r"nodes\[1\].device: must be cpu, cuda, cuda:N or mps, got 'gpu0'"):
        parse_topology(TOPOLOGY + 'device = "gpu0"\n')
    with pytest.raises(TopologyError, match=r"nodes\[1\].dtype: must be one of"):
        parse_topology(TOPOLOGY + 'dtype = "int4"\n')
    assert [is_device_name(n) for n in ("cpu", "cuda", "cuda:3", "mps", "cuda:x", "tpu")] == [True] * 4 + [False] * 2


def test_a_device_this_host_lacks_is_one_clear_error():
    assert available_device("stage1", "cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match=r"stage2: device cuda:1 is not available here \(torch sees 0 CUDA"):
            available_device("stage2", "cuda:1")


async def test_an_explicit_device_keeps_the_output_and_returns_host_memory(model_dir, tokenizer, reference):
    device = available_device("test", "cpu")
    head = load_head_model(model_dir, torch.float32, device)
    windows = [load_layer_window(model_dir, a, b, torch.float32, device=device) for a, b in ((0, 15), (15, 30))]
    ids = tokenizer(PROMPTS["code"])["input_ids"]
    async with in_process_ring(head, windows) as ring:
        stats = await ring.generate(ids, NgramDraft(), "flowspec", 12, TreeShape(depth=4, top_k=2, total_tokens=12, width=2))
        (out,) = ring.stages[0].handle(Segment(99, 1, True, (0, 1), (-1, -1), (0, 1), head.embed(ids[:2]).cpu()))
    assert stats.tokens == reference(PROMPTS["code"], 20)[:12]
    assert out.hidden.device.type == "cpu" and windows[0].new_cache().keys[0].device == device


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA devices")
def test_a_launch_stops_before_any_node_when_this_host_lacks_a_device(tmp_path):
    path = tmp_path / "topology.toml"
    path.write_text(local_topology_toml(TEST_MODEL, 2).replace('name = "stage2"\n', 'name = "stage2"\ndevice = "cuda:1"\n'))
    cluster = LocalCluster(path, log_dir=tmp_path / "logs")
    with pytest.raises(DeviceUnavailable, match=r"^stage2: device cuda:1 is not available here \(torch sees 0 CUDA"):
        cluster.start()
    assert not cluster.nodes and not (tmp_path / "logs").exists()  # refused once, not restarted node by node


def test_profile_checks_its_device_before_loading_anything(capsys):
    with pytest.raises(SystemExit) as exit_:
        profile_main([TEST_MODEL, "--device", "gpu0"])
    assert exit_.value.code == 2 and "--device must be cpu, cuda, cuda:N or mps, got 'gpu0'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match=r"^profile: device cuda is not available here"):
            profile_main([TEST_MODEL, "--device", "cuda"])
