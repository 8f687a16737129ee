"""Where a node computes: `device = "cpu" | "cuda" | "cuda:N" | "mps"` in its [[nodes]] entry.

Layers, KV caches and the head's models live on the node's device; tensors cross the wire from
host memory, so a segment moves to the device when it arrives and back when it leaves.
"""

from __future__ import annotations

import re

import torch

DEVICE_FORM = re.compile(r"cpu|cuda(:\d+)?|mps")


class DeviceUnavailable(RuntimeError):
    """A node names a device its host does not have."""


def is_device_name(name: str) -> bool:
    return DEVICE_FORM.fullmatch(name) is not None


def available_device(node: str, name: str) -> torch.device:
    """The torch device `name`, or one clear error when this host has no such device."""
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise DeviceUnavailable(f"{node}: device {name} is not available here (torch sees {count} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable(f"{node}: device mps is not available here (no Apple GPU, or torch built without MPS)")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a clock read after it measures them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
