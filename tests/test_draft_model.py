"""A draft from another model (`draft = "model:NAME_OR_PATH"`): a smaller model sharing the target's
tokenizer, loaded on the head with its own weights and KV caches. The draft here is derived offline
from the target's checkpoint (its first 8 of 30 layers, saved as a model of its own); output stays
the target's, token for token. Other tokenizers and unknown models are refused with a clear error."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flowspec_zmq.models import resolve_model_dir
from flowspec_zmq.scheduler import RequestRejected
from flowspec_zmq.topology import DecodingConfig

from .conftest import PROMPTS
from .inprocess import in_process_ring

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def pruned_draft(tmp_path_factory, model_dir: Path) -> Path:
    """The target's first 8 layers with its embedding, norm and lm_head: a smaller model of the same
    family and tokenizer, saved as a model directory of its own."""
    folder = tmp_path_factory.mktemp("draft") / "smollm2-8-layers"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:8]
    model.config.num_hidden_layers = 8
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


async def generate(head, three_stages, drafts, model_dir, tokenizer, prompt: str, options: DecodingConfig):
    async with in_process_ring(head, three_stages) as ring:
        engine = ring.engine(model_dir, tokenizer, drafts=drafts)

        async def ignore(_: list[int]) -> None:
            pass

        return await engine.generate(tokenizer(prompt)["input_ids"], options, ignore)


@pytest.mark.parametrize("mode, prompt", [("flowspec", "code"), ("tree", "story")])
async def test_a_smaller_model_drafts_and_the_output_stays_the_targets(head, three_stages, drafts, model_dir, tokenizer,
                                                                       reference, pruned_draft, mode, prompt):
    options = DecodingConfig(mode=mode, draft=f"model:{pruned_draft}", max_new_tokens=NEW_TOKENS)
    stats = await generate(head, three_stages, drafts, model_dir, tokenizer, PROMPTS[prompt], options)
    assert stats.tokens == reference(PROMPTS[prompt], 20)[:NEW_TOKENS]
    assert stats.draft_steps > 0 and stats.rows_sent > len(stats.tokens)  # it really drafted


@pytest.mark.parametrize("draft, problem", [
    ("model:gemma3-270m", "another tokenizer than the target"),
    ("model:/nonexistent/draft", "neither a known model"),
])
async def test_a_draft_without_the_targets_tokenizer_is_refused(head, three_stages, drafts, model_dir, tokenizer,
                                                                draft, problem):
    if draft == "model:gemma3-270m":
        resolve_model_dir("gemma3-270m")  # prepared by tools/install.sh beside the test model
    options = replace(DecodingConfig(max_new_tokens=4), draft=draft)
    with pytest.raises(RequestRejected, match=problem):
        await generate(head, three_stages, drafts, model_dir, tokenizer, PROMPTS["code"], options)
