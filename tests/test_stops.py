"""Stop strings in streamed text: cut before the first one, never release what could become one."""

from __future__ import annotations

import random

import pytest

from flowspec_zmq.stops import StopScanner


def stream(deltas: list[str], stops: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    out = ""
    for delta in deltas:
        out += scanner.feed(delta)
        if scanner.stopped:
            return out, True
    return out + scanner.flush(), False


@pytest.mark.parametrize("seed", range(50))
def test_any_split_of_the_text_gives_the_text_before_the_first_stop(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("ab\nc") for _ in range(rng.randint(0, 40)))
    stops = ["".join(rng.choice("ab\nc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    first = min((text.find(s) for s in stops if s in text), default=None)
    assert stream(deltas, stops) == ((text[:first], True) if first is not None else (text, False))


def test_a_possible_start_of_a_stop_string_is_held_back_until_it_is_decided():
    scanner = StopScanner(["\n\nUser:"])
    assert scanner.feed("Hello\n") == "Hello"
    assert scanner.feed("\nUs") == ""
    assert scanner.feed("ual") == "\n\nUsual"
    assert not scanner.stopped
