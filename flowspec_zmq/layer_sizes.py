"""What the layer split needs from a model: the size of a decoder layer, read from the safetensors
headers (no tensor is loaded), so that a stage's memory_gb can be checked against its layers."""

from __future__ import annotations

import math
import re
from pathlib import Path

from safetensors import safe_open

from .model_slices import load_config
from .topology import Topology

LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.")  # the names a stage loads (model_slices.load_layer_window)


def layer_parameters(model_dir: Path) -> int:
    """Parameters of the model's largest decoder layer: the split counts every layer as this big."""
    per_layer: dict[int, int] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                if match := LAYER_TENSOR.match(name):
                    layer = int(match[1])
                    per_layer[layer] = per_layer.get(layer, 0) + math.prod(f.get_slice(name).get_shape())
    if not per_layer:
        raise ValueError(f"{model_dir}: no model.layers.N.* tensors in its safetensors files")
    return max(per_layer.values())


def model_windows(topology: Topology, model_dir: Path) -> dict[str, tuple[int, int]]:
    """The topology's layer windows over this model, every stage's memory_gb checked."""
    return topology.layer_windows(load_config(model_dir).num_hidden_layers, layer_parameters(model_dir))
