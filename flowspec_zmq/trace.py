"""Optional timeline trace: every node's compute and send intervals, one JSON line each.

Off unless FLOWSPEC_TRACE names a folder; then each node appends to FOLDER/NODE.jsonl records
{"node", "what", "req", "seq", "rows", "start", "end"} with wall-clock seconds, so the benchmark can
draw one Gantt chart of all nodes on a machine.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class Tracer:
    def __init__(self, node: str, folder: Path | None) -> None:
        self.node = node
        self.file = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.file = open(folder / f"{node}.jsonl", "a", buffering=1)

    @property
    def enabled(self) -> bool:
        return self.file is not None

    @contextmanager
    def span(self, what: str, request_id: int = -1, seq: int = -1, rows: int = 0) -> Iterator[None]:
        if self.file is None:
            yield
            return
        start = time.time()
        try:
            yield
        finally:
            record = {"node": self.node, "what": what, "req": request_id, "seq": seq, "rows": rows,
                      "start": start, "end": time.time()}
            self.file.write(json.dumps(record) + "\n")


def tracer_from_env(node: str) -> Tracer:
    folder = os.environ.get("FLOWSPEC_TRACE")
    return Tracer(node, Path(folder) if folder else None)
