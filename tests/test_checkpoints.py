"""`flowspec prepare PATH`: local GGUF files and Hugging Face directories of the three offline
architectures become named cache entries that stages load; architectures the stage runner cannot
slice get an error that names them."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from flowspec_zmq import draft_vocab, prepare_models
from flowspec_zmq.checkpoints import CheckpointError
from flowspec_zmq.model_slices import load_head_model, load_layer_window, read_tensors
from flowspec_zmq.models import MARKER, prepare_path, resolve_model_dir
from flowspec_zmq.topology import make_local_topology

# The offline checkpoints' architectures with the settings that set them apart (from their
# config.json), shrunk to two small layers so that a random-weight copy converts in a second.
# Every copy borrows SmolLM2's tokenizer, hence its vocabulary size.
SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16,
             vocab_size=49152)
ARCHITECTURES = {
    "smollm2": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5,
                    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}),
    "gemma3": dict(model_type="gemma3_text", num_key_value_heads=1, tie_word_embeddings=True, sliding_window=512,
                   layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=256,
                   hidden_activation="gelu_pytorch_tanh",
                   rope_parameters={"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
                                    "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}),
    "qwen2.5": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6,
                    rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}),
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> Path:
    """An empty cache; the draft vocabulary is ranked over one line (its ranking has its own tests)."""
    monkeypatch.setenv("FLOWSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(draft_vocab, "local_corpus", lambda: iter(["def answer():\n    return 42\n"]))
    return tmp_path / "cache"


def tiny_checkpoint(folder: Path, architecture: str, tokenizer_dir: Path, max_shard_size: str | None = None):
    settings = ARCHITECTURES[architecture]
    config = AutoConfig.for_model(settings["model_type"], **SMALL, **{k: v for k, v in settings.items() if k != "model_type"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return model


@pytest.mark.parametrize(("architecture", "sharded"), [("smollm2", False), ("gemma3", False), ("qwen2.5", True)])
def test_a_model_directory_of_each_offline_architecture_becomes_a_named_model(
    cache, tmp_path, model_dir, architecture, sharded
):
    source = tmp_path / f"tiny-{architecture}"
    original = tiny_checkpoint(source, architecture, model_dir, max_shard_size="1MB" if sharded else None)
    assert (source / "model.safetensors.index.json").is_file() == sharded

    prepared = prepare_path(source, "tiny", progress=False)
    assert prepared == cache / "models" / "tiny" == resolve_model_dir("tiny")
    marker = json.loads((prepared / MARKER).read_text())
    assert marker["source"]["path"] == str(source) and (prepared / draft_vocab.RANKING_FILE).is_file()
    # The stage runner's view: a topology naming it splits its layers, stages and the head load it.
    topology = make_local_topology("tiny", 2)
    assert resolve_model_dir(topology.model.source) == prepared
    window = load_layer_window(prepared, 1, 2, torch.float32)
    assert load_head_model(prepared, torch.float32).num_layers == 2
    for name, tensor in original.model.layers[1].state_dict().items():
        assert torch.equal(window.layers[0].state_dict()[name], tensor), name


def two_layer_gguf(source: Path, target: Path) -> None:
    """A copy of a GGUF with only its first two layers: same metadata and tokenizer, same tensors."""
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(target, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer adds these itself
        value = 2 if field.name == f"{arch}.block_count" else field.contents()
        kind = field.types[0]
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    kept = [t for t in reader.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < 2]
    for tensor in kept:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in kept:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()


def test_a_gguf_file_is_dequantized_like_the_built_in_recipe(cache, tmp_path, model_dir):
    # SmolLM2's own GGUF (kept in the real cache by `flowspec prepare smollm2-135m`), cut to two layers.
    real_gguf = model_dir.parent.parent / "gguf" / json.loads((model_dir / MARKER).read_text())["gguf"]["file"]
    small = tmp_path / "SmolLM2-2-layers.gguf"
    two_layer_gguf(real_gguf, small)

    assert prepare_models.main([str(small)]) == 0  # named after the file
    prepared = resolve_model_dir("SmolLM2-2-layers")
    config = AutoConfig.from_pretrained(prepared)
    assert (config.model_type, config.num_hidden_layers) == ("llama", 2)
    assert getattr(config, "quantization_config", None) is None
    marker = json.loads((prepared / MARKER).read_text())
    assert marker["source"]["bytes"] == small.stat().st_size and len(marker["source"]["sha256"]) == 64
    # Dequantized exactly as the built-in recipe dequantized the whole file.
    layer = read_tensors(prepared, "model.layers.1.", torch.float32)
    assert layer.keys() == (want := read_tensors(model_dir, "model.layers.1.", torch.float32)).keys()
    assert all(torch.equal(layer[name], want[name]) for name in layer)
    text = "def fibonacci(n):"
    assert AutoTokenizer.from_pretrained(prepared)(text)["input_ids"] == AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]


def test_the_real_smollm2_directory_converts_to_identical_weights(cache, model_dir):
    prepared = prepare_path(model_dir, "smollm2-copy", progress=False)
    assert load_file(prepared / "model.safetensors").keys() == (want := load_file(model_dir / "model.safetensors")).keys()
    assert all(torch.equal(t, want[name]) for name, t in load_file(prepared / "model.safetensors").items())
    assert (prepared / "chat_template.jinja").read_text() == (model_dir / "chat_template.jinja").read_text()
    # Again from the same path: nothing to do; the same name for another checkpoint: refused.
    assert prepare_path(model_dir, "smollm2-copy", progress=False) == prepared
    with pytest.raises(CheckpointError, match="already prepared from"):
        prepare_path(prepared, "smollm2-copy", progress=False)


def fake_checkpoint(folder: Path, config: dict) -> Path:
    """config.json and an unreadable weights file: the architecture check comes before any weight."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize(("config", "named"), [
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, r"BertForMaskedLM \(model_type 'bert'\).*model\.layers"),
    ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True},
     r"T5ForConditionalGeneration \(model_type 't5'\) is not a decoder-only causal LM"),
    ({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}, r"MambaForCausalLM \(model_type 'mamba'\).*model\.layers"),
    ({"model_type": "no_such_arch"}, r"does not implement model_type 'no_such_arch'"),
])
def test_an_architecture_the_stage_runner_cannot_slice_is_named(cache, tmp_path, config, named):
    folder = fake_checkpoint(tmp_path / "unsupported", config)
    with pytest.raises(CheckpointError, match=named):
        prepare_path(folder, "unsupported", progress=False)
    assert not (cache / "models" / "unsupported").exists()


def test_the_command_reports_an_unsupported_architecture_in_one_line(cache, tmp_path, capsys):
    folder = fake_checkpoint(tmp_path / "bert", {"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    assert prepare_models.main([str(folder)]) == 1
    assert "BertForMaskedLM (model_type 'bert')" in capsys.readouterr().err


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p, "no such file or directory"),
    (lambda p: (p.mkdir(), p)[1], "no config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{}"), p)[2], "no model.safetensors or model.safetensors.index.json"),
    (lambda p: (p.write_text("hello"), p)[1], "not a GGUF file"),
])
def test_a_path_that_is_no_checkpoint_says_what_is_missing(cache, tmp_path, make, message):
    with pytest.raises(CheckpointError, match=message):
        prepare_path(make(tmp_path / "thing"), "thing", progress=False)


@pytest.mark.parametrize(("argv", "message"), [
    (["{dir}", "--name", "smollm2-135m"], "is a built-in model"),
    (["{dir}", "--name", "../escape"], "use letters, digits"),
])
def test_names_that_are_not_ours_to_give_are_refused(cache, tmp_path, capsys, argv, message):
    assert prepare_models.main([a.format(dir=tmp_path) for a in argv]) == 1
    assert message in capsys.readouterr().err


def test_name_goes_with_exactly_one_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        prepare_models.main([str(tmp_path), str(tmp_path), "--name", "x"])
    assert exit_.value.code == 2 and "exactly one path" in capsys.readouterr().err
