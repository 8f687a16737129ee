"""Prepare offline models: `python -m tools.prepare_models [NAME ...]` (also `flowspec prepare`)."""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from flowspec_zmq.models import MODELS, is_prepared, prepare

DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", choices=[[], *MODELS], help=f"default: {' '.join(DEFAULT_MODELS)}")
    names = parser.parse_args(argv).models or list(DEFAULT_MODELS)
    console = Console(stderr=True)
    for name in names:
        if is_prepared(name):
            console.print(f"[green]✓[/] {name} is prepared")
            continue
        started = time.perf_counter()
        with console.status(f"{name}: starting") as status:
            path = prepare(name, say=lambda step: status.update(f"{name}: {step} ({time.perf_counter() - started:.0f} s)"))
        console.print(f"[green]✓[/] {name} prepared in {time.perf_counter() - started:.0f} s: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
