"""Slices of a Hugging Face causal LM: a window of decoder layers, and the head's embedding + lm_head.

A stage materialises only its own layers, reading just their tensors from the safetensors files, so
its memory follows its slice. The layers are the model's own HF modules; only the KV cache
(TreeKVCache) and the attention masks (built from tree parents) are ours.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable, Sequence

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .kv_cache import LayerShape, TreeKVCache

transformers.logging.set_verbosity_error()  # the partial loads below are intentional


def load_config(model_dir: Path) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = "sdpa"
    return config


@cache
def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def read_tensors(model_dir: Path, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with `prefix`, with the prefix stripped."""
    tensors: dict[str, torch.Tensor] = {}
    files = _tensor_files(model_dir)
    for file in sorted({f for name, f in files.items() if name.startswith(prefix)}):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    tensors[name[len(prefix) :]] = f.get_tensor(name).to(dtype)
    return tensors


def _layer_types(config: PretrainedConfig) -> list[str]:
    return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


@dataclass(frozen=True)
class WindowPart:
    """One request's rows in a forward pass: prefill rows (`commit`) or draft-tree nodes."""

    cache: TreeKVCache
    commit: bool
    node_ids: Sequence[int]
    parents: Sequence[int]
    positions: Sequence[int]


@dataclass(frozen=True)
class PartPlan:
    part: WindowPart
    positions: torch.Tensor
    masks: dict[str, torch.Tensor]  # attention type -> [rows, the request's keys]
    tree_rows: torch.Tensor | None  # the new tree rows' ancestor rows, kept by the cache after the forward


class LayerWindow(nn.Module):
    """Decoder layers [first, last) of a model, run over tree segments with a TreeKVCache."""

    def __init__(self, config: PretrainedConfig, layers: Sequence[nn.Module], first: int, rotary: nn.Module):
        super().__init__()
        self.config = config
        self.first = first
        self.layers = nn.ModuleList(layers)
        self.rotary = rotary
        self.layer_types = _layer_types(config)[first : first + len(layers)]
        self.sliding_window: int | None = getattr(config, "sliding_window", None)
        # Gemma-3 keeps one rotary table per attention type; Llama/Qwen have a single one.
        self.rotary_per_type = "layer_type" in inspect.signature(rotary.forward).parameters
        first_weight = next(self.layers.parameters(), None)
        self.dtype = first_weight.dtype if first_weight is not None else torch.float32
        self.device = first_weight.device if first_weight is not None else torch.device("cpu")

    @property
    def last(self) -> int:
        return self.first + len(self.layers)

    def new_cache(self) -> TreeKVCache:
        head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        shape = LayerShape(self.config.num_key_value_heads, head_dim)
        return TreeKVCache(self.first, [shape] * len(self.layers), self.dtype, device=self.device)

    def plan(self, part: WindowPart) -> PartPlan:
        """Check one request's rows against its cache and build its attention masks; a part that
        does not fit its cache fails here, before any forward pass runs."""
        n = len(part.node_ids)
        cache = part.cache
        positions = torch.tensor(part.positions, dtype=torch.long)
        prefix = torch.ones(n, cache.committed, dtype=torch.bool)
        if part.commit:
            cache.check_commit(n)
            tree_rows = None
            own = torch.ones(n, n, dtype=torch.bool).tril()
            key_positions = torch.cat([torch.arange(cache.committed), positions])
        else:
            tree_rows = cache.tree_rows_for(part.node_ids, part.parents, part.positions)
            own = tree_rows
            key_positions = torch.cat(
                [torch.arange(cache.committed), torch.tensor(cache.node_positions, dtype=torch.long), positions]
            )
        full = torch.cat([prefix, own], dim=1)
        masks = {"full_attention": full}
        if "sliding_attention" in self.layer_types:
            within = (positions[:, None] - key_positions[None, :]) < self.sliding_window
            masks["sliding_attention"] = full & within
        return PartPlan(part, positions, masks, tree_rows)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: TreeKVCache,
        commit: bool,
        node_ids: Sequence[int],
        parents: Sequence[int],
        positions: Sequence[int],
    ) -> torch.Tensor:
        """Run one request's rows [n, d] through the window; their K/V join the cache."""
        return self.run(hidden, [self.plan(WindowPart(cache, commit, node_ids, parents, positions))])

    @torch.inference_mode()
    def run(self, hidden: torch.Tensor, plans: Sequence[PartPlan]) -> torch.Tensor:
        """One forward pass over the rows of several requests, packed in plan order: projections
        and MLP run over all rows at once (on a CPU their cost is reading the weights, whatever the
        rows), attention runs per request over its own cache (PackedCaches)."""
        for plan in plans:
            plan.part.cache.reserve(len(plan.part.node_ids))
        # Rows arrive in host memory (from the wire); masks are built there with the tree bookkeeping.
        x = hidden.to(self.device, self.dtype)[None]
        position_ids = torch.cat([p.positions for p in plans]).to(self.device)[None]
        masks = [{t: m.to(self.device)[None, None] for t, m in p.masks.items()} for p in plans]
        if self.rotary_per_type:
            rotations = {t: self.rotary(x, position_ids, t) for t in set(self.layer_types)}
        else:
            shared = self.rotary(x, position_ids)
            rotations = {t: shared for t in set(self.layer_types)}
        packed = PackedCaches(plans, masks, self.first, self.layer_types) if len(plans) > 1 else None
        for layer, layer_type in zip(self.layers, self.layer_types):
            if packed is None:
                x = layer(x, attention_mask=masks[0][layer_type], position_embeddings=rotations[layer_type],
                          position_ids=position_ids, past_key_values=plans[0].part.cache)
            else:
                x = layer(x, attention_mask=None, position_embeddings=rotations[layer_type], position_ids=position_ids,
                          past_key_values=packed, packed=packed)
        for plan in plans:
            part = plan.part
            if part.commit:
                part.cache.append_committed(len(part.node_ids))
            else:
                part.cache.add_tree_rows(part.node_ids, part.positions, plan.tree_rows)
        return x[0]


class PackedCaches:
    """Several requests in one forward pass. The HF attention modules hand every row's new keys and
    values to `update`, which writes each request's rows into its own cache; attention then runs
    once per request, its rows against its own cache and mask only (`packed_attention`), so
    requests never see each other and no cache is copied or attended to in vain."""

    def __init__(self, plans: Sequence[PartPlan], masks: Sequence[dict[str, torch.Tensor]], first_layer: int,
                 layer_types: Sequence[str]) -> None:
        self.plans = plans
        self.masks = masks  # per request: attention type -> [1, 1, rows, keys] on the window's device
        self.first_layer = first_layer
        self.layer_types = layer_types
        self.current: list[tuple[torch.Tensor, torch.Tensor]] = []  # this layer's keys and values, per request

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.current, start = [], 0
        for plan in self.plans:
            rows = len(plan.part.node_ids)
            self.current.append(plan.part.cache.update(key[:, :, start : start + rows], value[:, :, start : start + rows],
                                                       layer_idx))
            start += rows
        return key, value  # attention reads `current` instead

    def attend(self, module: nn.Module, query: torch.Tensor, scaling: float | None) -> tuple[torch.Tensor, None]:
        layer_type = self.layer_types[module.layer_idx - self.first_layer]
        outputs, start = [], 0
        for plan, masks, (keys, values) in zip(self.plans, self.masks, self.current):
            rows = len(plan.part.node_ids)
            output, _ = sdpa_attention_forward(module, query[:, :, start : start + rows], keys, values,
                                               masks[layer_type], scaling=scaling)
            outputs.append(output)
            start += rows
        return torch.cat(outputs, dim=1), None


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     packed: PackedCaches | None = None, **kwargs):
    """SDPA, or per-request SDPA when the forward carries several requests."""
    if packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    return packed.attend(module, query, scaling)


PACKED_ATTENTION = "flowspec_packed"
AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def _skeleton(config: PretrainedConfig) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_layer_window(
    model_dir: Path, first: int, last: int, dtype: torch.dtype, transform: Callable[[nn.Module], nn.Module] | None = None,
    device: torch.device | str = "cpu",
) -> LayerWindow:
    """Materialise decoder layers [first, last) from the safetensors files on `device`, nothing
    else; each layer passes through `transform` (e.g. quantization) as soon as it is read."""
    config = load_config(model_dir)
    config._attn_implementation = PACKED_ATTENTION  # plain SDPA unless a forward carries several requests
    if not 0 <= first < last <= config.num_hidden_layers:
        raise ValueError(f"layer window [{first}, {last}) is outside the model's {config.num_hidden_layers} layers")
    skeleton = _skeleton(config)
    layers = []
    for i in range(first, last):
        layer = skeleton.model.layers[i]
        weights = read_tensors(model_dir, f"model.layers.{i}.", dtype)
        layer.load_state_dict(weights, strict=True, assign=True)
        layer = layer.eval().to(device)
        layers.append(transform(layer) if transform else layer)
    rotary = type(skeleton.model.rotary_emb)(config=config).to(device)  # its tables are buffers
    window = LayerWindow(config, layers, first, rotary)
    leftovers = [name for name, t in window.named_buffers() if t.is_meta]
    if leftovers:
        raise RuntimeError(f"layer window left tensors unloaded: {leftovers}")
    return window


LOGIT_BLOCK = 1024  # vocabulary rows per block of the head's lm_head: 2.6 MB of float32 at d=640


class HeadModel(nn.Module):
    """What the head keeps of the target: token embedding, final norm, lm_head."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.num_layers = num_layers  # of the whole target, which the head does not hold
        self.embed_tokens = model.model.embed_tokens
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.softcap: float | None = getattr(model.config, "final_logit_softcapping", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @torch.inference_mode()
    def embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Token ids -> embedding rows [n, d] on the head's device."""
        return self.embed_tokens(torch.tensor([list(token_ids)], dtype=torch.long, device=self.device))[0]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [n, d] (from anywhere) -> float32 logits [n, vocab] on the head's device."""
        normed = self.norm(hidden.to(self.device, self.dtype))
        weight = self.lm_head.weight
        if self.lm_head.bias is not None or normed.shape[0] == 1:
            logits = self.lm_head(normed).float()
        else:
            # For a few rows a CPU GEMM over a 100k+ vocabulary re-reads the matrix; blocks that stay
            # in cache read it once (1.6-1.8x faster here for 4-48 rows). Same dot products, exact.
            logits = torch.empty(normed.shape[0], weight.shape[0], dtype=normed.dtype, device=self.device)
            for start in range(0, weight.shape[0], LOGIT_BLOCK):
                torch.mm(normed, weight[start : start + LOGIT_BLOCK].t(), out=logits[:, start : start + LOGIT_BLOCK])
            logits = logits.float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def load_head_model(model_dir: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> HeadModel:
    # Zero decoder layers: transformers loads embedding, norm and (tied) lm_head and skips the rest.
    config = load_config(model_dir)
    num_layers = config.num_hidden_layers
    config.num_hidden_layers = 0
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = []
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype)
    return HeadModel(model.eval().to(device), num_layers)


def load_full_model(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    """The whole target in one process: the reference the tests compare every mode against."""
    config = load_config(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype).eval()
