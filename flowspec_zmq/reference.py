"""The target model's own greedy decoding in one process: the ground truth every mode must match."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import DynamicCache

from .model_slices import load_full_model


@torch.inference_mode()
def reference_greedy(
    model_dir: Path,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
) -> list[int]:
    """Plain HF forward passes with a DynamicCache, argmax each step, stop at EOS (kept)."""
    model = load_full_model(model_dir, dtype)
    cache = DynamicCache(config=model.config)
    logits = model(torch.tensor([list(prompt_ids)]), past_key_values=cache).logits[0, -1]
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        token = int(logits.argmax())
        tokens.append(token)
        if token in eos_ids:
            break
        logits = model(torch.tensor([[token]]), past_key_values=cache).logits[0, -1]
    return tokens
