"""Local checkpoints: a GGUF file or a Hugging Face model directory, read offline, and whether the
stage runner can slice its architecture.

The stage runner (model_slices) builds the transformers model of the architecture on the meta
device and takes `model.layers[i]` and `model.rotary_emb` for a stage, `model.embed_tokens`,
`model.norm` and `lm_head` for the head; its tree KV cache knows full and sliding-window attention.
`check_sliceable` asks exactly that of a config before any weight is read, and `check_stage_loads`
loads a real layer window from the converted files before they count as prepared.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

SLICED_MODULES = ("model.embed_tokens", "model.layers", "model.rotary_emb", "model.norm", "lm_head")
ATTENTION_KINDS = frozenset({"full_attention", "sliding_attention"})  # what the tree KV cache handles
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # one file, or the index of shards


class CheckpointError(ValueError):
    """A path that cannot be prepared: not a checkpoint, or an architecture the stage runner cannot slice."""


@contextmanager
def offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the duration: a conversion must never reach for the hub."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == b"GGUF"


def read_config(path: Path) -> PretrainedConfig:
    """The transformers config of a .gguf file or a model directory (config.json beside safetensors)."""
    if path.is_file():
        if not is_gguf(path):
            raise CheckpointError(f"{path}: not a GGUF file; give a .gguf file or a Hugging Face model directory")
        model_type, load = None, lambda: AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json, so not a Hugging Face model directory")
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            raise CheckpointError(f"{path}: no {' or '.join(WEIGHT_FILES)} (safetensors weights are needed)")
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        load = lambda: AutoConfig.from_pretrained(path)
    else:
        raise CheckpointError(f"{path}: no such file or directory")
    try:
        with offline():
            return load()
    except (ValueError, KeyError) as exc:  # transformers' ways of saying it does not know the architecture
        what = f"model_type {model_type!r}" if model_type else "this GGUF's architecture"
        raise CheckpointError(f"{path}: transformers {transformers.__version__} does not implement {what}: "
                              f"{str(exc).splitlines()[0]}") from None


def architecture(config: PretrainedConfig) -> str:
    """How errors name an architecture: its model class and model_type."""
    return f"{(config.architectures or [type(config).__name__])[0]} (model_type {config.model_type!r})"


def _submodule(model: torch.nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        model = getattr(model, part, None)
    return model


def check_sliceable(config: PretrainedConfig) -> None:
    """Raise CheckpointError, naming the architecture, unless the stage runner can slice it."""
    name = architecture(config)
    if config.is_encoder_decoder or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise CheckpointError(f"{name} is not a decoder-only causal LM in transformers; the stage runner slices only those")
    with torch.device("meta"):  # the modules without their weights: instant at any size
        skeleton = AutoModelForCausalLM.from_config(config)
    missing = [path for path in SLICED_MODULES if _submodule(skeleton, path) is None]
    if missing:
        raise CheckpointError(f"{name}: transformers' {type(skeleton).__name__} has no {', '.join(missing)}; "
                              f"the stage runner slices models built of {', '.join(SLICED_MODULES)}")
    kinds = set(getattr(config, "layer_types", None) or ()) - ATTENTION_KINDS
    if kinds:
        raise CheckpointError(f"{name} has {', '.join(sorted(kinds))} layers; the stage runner's KV cache handles "
                              f"only {' and '.join(sorted(ATTENTION_KINDS))}")


def dequantize_gguf(gguf: Path, config: PretrainedConfig | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF as a float32 transformers model, and its tokenizer. A config read already spares
    one more pass over the file's metadata (seconds for a large vocabulary)."""
    with offline():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config, dtype=torch.float32)
    # The weights are plain float32 now, but the model still carries the GGUF quantizer and its
    # config flag: save_pretrained refuses "gguf-quantized" models, and a saved flag would make
    # later loads look for a quantizer that no longer applies.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def load_checkpoint(path: Path, config: PretrainedConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A checkpoint as a transformers model and its tokenizer: a GGUF dequantized to float32, a
    directory's safetensors (one file or shards) in their own dtype."""
    if path.is_file():
        return dequantize_gguf(path, config)
    with offline():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype="auto", use_safetensors=True)
    return model, tokenizer


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def provenance(path: Path) -> dict[str, Any]:
    """What the prepared marker records of a local checkpoint."""
    if path.is_file():
        return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256(path)}
    return {"path": str(path), "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}


def check_stage_loads(directory: Path, config: PretrainedConfig) -> None:
    """Load the first layer window from converted files as a stage would: a checkpoint whose saved
    tensor names differ from its modules' fails here, not on a stage later."""
    from .model_slices import load_layer_window

    try:
        load_layer_window(directory, 0, 1, torch.float32)
    except (RuntimeError, KeyError) as exc:  # strict loading names the missing or unexpected tensors
        raise CheckpointError(f"{architecture(config)}: a stage cannot load its layers from the converted files: "
                              f"{str(exc).splitlines()[0]}") from None
