"""Incremental detokenisation: committed token ids in, text deltas out, in bounded work per step.

Re-decoding the whole output at every step is quadratic, and its text can change behind what was
already sent (a byte-level or byte-fallback tokenizer shows half a character as U+FFFD until the
rest of its bytes arrive). As vLLM's incremental detokenizer does, decode only a short window:
the tokens of the last delta (the prefix, so the tokenizer sees the left context that decides
spaces and byte merges) plus the tokens since, and emit what the new ones added. Text that ends in
U+FFFD may be half a character: the few tokens that may hold it wait for the next ones (or for
`flush()` at the end), and the text before them goes out, so a run of characters that are each
split over several tokens does not hold everything back.

One difference from decoding the whole output remains, by design: a byte-fallback tokenizer (Gemma)
shows a run of byte tokens that ends in half a character as U+FFFD throughout, so an output cut off
mid-character decodes to U+FFFD where the stream has already sent that run's whole characters.
"""

from __future__ import annotations

from typing import Protocol, Sequence

REPLACEMENT = "\ufffd"  # what a tokenizer shows for bytes that are not (yet) a whole character
# Tokens that half a character can span: at most 3 of its (at most 4) UTF-8 bytes, a byte or more each.
HALF_CHARACTER_TOKENS = 3


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class TextStream:
    """Turns the ids committed so far into text deltas; concatenated (with `flush()`) they are
    `tokenizer.decode(ids, skip_special_tokens=True)`."""

    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window starts here: the tokens of the last delta
        self.read_offset = 0  # ids[:read_offset] have been sent as text
        self.window = 0  # tokens the latest call decoded: stays small however long the output

    def push(self, ids: Sequence[int]) -> str:
        """The text that `ids` complete (may be empty while a character is half decoded)."""
        self.ids.extend(ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back: at the end no later token can complete it."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        self.window = len(self.ids) - self.prefix_offset
        sent = self._decode(self.ids[self.prefix_offset : self.read_offset])
        for end in self._read_ends(final):
            text = self._decode(self.ids[self.prefix_offset : end])
            if len(text) <= len(sent):
                return ""  # nothing new yet (say, skipped special tokens): keep the window open
            if final or not text.endswith(REPLACEMENT):
                self.prefix_offset, self.read_offset = self.read_offset, end
                return text[len(sent) :]
        return ""

    def _read_ends(self, final: bool) -> range:
        """How far the text may go out: every id, or while the text may end in half a character,
        up to the few tokens before that could hold its bytes."""
        last = len(self.ids)
        held = 0 if final else HALF_CHARACTER_TOKENS
        return range(last, max(self.read_offset, last - held - 1), -1)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
