"""Stop strings: streamed text is cut before the first stop string, and nothing that could still
become one is sent early (a stop string may arrive split over several tokens)."""

from __future__ import annotations

from typing import Sequence


class StopScanner:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""  # received, not released: it may be the start of a stop string
        self.stopped = False

    def feed(self, delta: str) -> str:
        """The text that can be released now; sets `stopped` when a stop string appeared."""
        text = self.pending + delta
        cuts = [text.find(stop) for stop in self.stops if stop in text]
        if cuts:
            self.stopped, self.pending = True, ""
            return text[: min(cuts)]
        held = self._held_back(text)
        self.pending = text[len(text) - held :]
        return text[: len(text) - held]

    def flush(self) -> str:
        """Whatever was held back, once the output has ended without a stop string."""
        out, self.pending = self.pending, ""
        return out

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
