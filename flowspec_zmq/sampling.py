"""The target's choice of the next token: argmax, or one exact sample with temperature/top-k/top-p.

Lossless speculative sampling with deterministic (top-k) drafts needs just one fresh sample from the
target at each visited node: descend into the child holding it, or stop with it (see DESIGN.md).
Each draw uses a generator seeded by (seed, position of the token being drawn). A verification walk
visits one node per position, so its draws stay independent, and every mode draws the same number
at the same position: with a fixed seed all modes produce the same sampled text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Rows of logits -> the sampling distribution after temperature, top-k and top-p."""
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def pick_tokens(logits: torch.Tensor, next_positions: Sequence[int], params: SamplingParams) -> list[int]:
    """One token per row; `next_positions[i]` is the position the row's token will occupy."""
    if params.greedy:
        return logits.argmax(dim=-1).tolist()
    # Draws happen on the CPU (its generators, seeded per position), whatever device computed the
    # logits: the same seed draws the same tokens on every head.
    probs = filtered_probs(logits.cpu(), params)
    picks = []
    for row, position in zip(probs, next_positions):
        generator = torch.Generator().manual_seed(params.seed * 1_000_003 + position)
        picks.append(int(torch.multinomial(row, 1, generator=generator)))
    return picks
