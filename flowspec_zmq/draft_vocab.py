"""Frequency-ranked draft vocabulary (FR-Spec, arXiv 2502.14856).

The draft's lm_head scores only the V most frequent target tokens; verification keeps the full
vocabulary, so output stays lossless while the draft's largest matrix shrinks by vocab / V. The
ranking is counted once, when a model is prepared, over text that is on every machine (Python's
own sources and docs: code and English prose) and stored beside the weights.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

log = logging.getLogger(__name__)

RANKING_FILE = "draft_vocab.json"
CORPUS_BYTES = 3 << 20  # ~3 MB of text: the top 32k ranks are stable well before this


def local_corpus(max_bytes: int = CORPUS_BYTES) -> Iterator[str]:
    """Text from the Python installation, in a fixed order so every machine counts the same."""
    library = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    files = sorted(p for p in library.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    # Every fourth file spreads the sample over the whole library, not just its first packages.
    taken = 0
    for path in files[::4]:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):  # an unreadable file just contributes nothing
            continue
        yield text
        taken += len(text)
        if taken >= max_bytes:
            return


def rank_tokens(tokenizer, texts: Iterator[str], always: Sequence[int] = ()) -> list[int]:
    """Every token id of the tokenizer, most frequent in `texts` first; `always` (EOS) lead."""
    counts: Counter[int] = Counter()
    for text in texts:
        counts.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    seen = [token for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    ranked = list(dict.fromkeys([*always, *seen, *range(len(tokenizer))]))
    return ranked


def build_ranking(model_dir: Path, tokenizer, eos_ids: Sequence[int]) -> list[int]:
    ranked = rank_tokens(tokenizer, local_corpus(), always=sorted(eos_ids))
    (model_dir / RANKING_FILE).write_text(json.dumps({"source": "python-library", "ranked": ranked}))
    return ranked


def load_ranking(model_dir: Path) -> list[int] | None:
    path = model_dir / RANKING_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())["ranked"]
