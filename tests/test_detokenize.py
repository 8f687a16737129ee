"""TextStream with the real SmolLM2 (byte-level BPE) and Gemma-3 (SentencePiece with byte fallback)
tokenizers: the deltas add up to the full decode, never show half a character, and each push
decodes a window that does not grow with the output."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from flowspec_zmq.detokenize import HALF_CHARACTER_TOKENS, REPLACEMENT, TextStream
from flowspec_zmq.models import resolve_model_dir

TEXTS = [
    "The capital of France is Paris.",
    "naïve café, Øresund, São Paulo, Ærøskøbing, e\u0301 (a combining accent), ﬁne ligatures",
    "Emoji: 🦜🦀🦜 👩‍👩‍👧‍👦 🇫🇷🇯🇵 👍🏽 — then text again ✨",
    "中文的句子，还有日本語のひらがなとカタカナ，한국어 문장도 있습니다。",
    "Rare 4-byte letters: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕋𝕖𝕩𝕥 𐍈 𓂀",
    "line one\n  indented after a newline\n\n\tand a tab\n \n   three spaces",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'
    "    return fibonacci(n - 1) + fibonacci(n - 2)  # ≈ φⁿ/√5\n",
    "Math ∀x∈ℝ: x² ≥ 0, and “quotes” ‘inside’ … «guillemets» ¿qué? ¡sí!",
    "مرحبا بالعالم and שלום עולם mixed with Ελληνικά and Кириллица",
    "   leading spaces, trailing spaces   ",
]


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(resolve_model_dir(request.param))


def chunks(ids: list[int], rng: random.Random | None) -> list[list[int]]:
    """One id at a time, or random chunks of 1-8 ids (as verifications commit them)."""
    out, i = [], 0
    while i < len(ids):
        size = rng.randint(1, 8) if rng else 1
        out.append(ids[i : i + size])
        i += size
    return out


def stream_text(tokenizer, ids: list[int], rng: random.Random | None) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer)
    deltas = [stream.push(chunk) for chunk in chunks(ids, rng)]
    deltas.append(stream.flush())
    assert stream.ids == ids
    return deltas, stream


def check(tokenizer, ids: list[int], rng: random.Random | None) -> None:
    deltas, _ = stream_text(tokenizer, ids, rng)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == full
    if REPLACEMENT not in full:
        assert not any(REPLACEMENT in delta for delta in deltas), deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_deltas_add_up_to_the_full_decode(tokenizer, text: str, seed: int | None) -> None:
    ids = tokenizer(text)["input_ids"]  # with the tokenizer's own special tokens (Gemma's <bos>)
    check(tokenizer, ids, random.Random(seed) if seed is not None else None)


def test_special_tokens_are_skipped_anywhere(tokenizer) -> None:
    special = [tokenizer.eos_token_id, tokenizer.bos_token_id]
    ids = []
    for i, text in enumerate(TEXTS[:5]):
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + special[: 1 + i % 2]
    for seed in (None, 3, 4):
        check(tokenizer, ids, random.Random(seed) if seed is not None else None)


def test_half_a_character_waits_and_is_flushed_at_the_end(tokenizer) -> None:
    ids = tokenizer("ok 𝔘", add_special_tokens=False)["input_ids"]
    # Both tokenizers split this letter's 4 bytes over tokens: without the last it stays half decoded.
    cut = ids[:-1]
    full = tokenizer.decode(cut, skip_special_tokens=True)
    assert full.endswith(REPLACEMENT)
    stream = TextStream(tokenizer)
    pushed = "".join(stream.push([i]) for i in cut)
    assert REPLACEMENT not in pushed
    assert pushed + stream.flush() == full
    assert stream.flush() == ""  # nothing twice


def test_each_push_decodes_a_small_window_of_a_long_output(tokenizer) -> None:
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 2000:
        text += " ".join(TEXTS) + "\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:2000]
    for rng in (None, random.Random(5)):
        stream = TextStream(tokenizer)
        windows, deltas = [], []
        for chunk in chunks(ids, rng):
            deltas.append(stream.push(chunk))
            windows.append(stream.window)
        deltas.append(stream.flush())
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
        # The last delta's tokens and the new ones, each with at most a half character held back.
        biggest_push = 1 if rng is None else 8
        assert max(windows) <= 2 * (biggest_push + HALF_CHARACTER_TOKENS), max(windows)
