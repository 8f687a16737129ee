"""Edge profiles for benchmarks: one device's per-layer speed for an emulated model, and its links.

A profile file (flowspec_zmq/profiles/*.toml) describes a device running a bigger model than the one this
machine computes with:

    [device]
    name = "Jetson Orin NX 16GB, 7B fp16"
    model_layers = 32              # layers of the emulated model
    fixed_ms_per_layer = 6.2       # per forward pass, whatever the rows
    per_token_ms_per_layer = 0.10  # per row of the forward pass
    [link]                         # optional: every hop
    bandwidth_mbps = 150
    delay_ms = 3

A stage holding k of the real model's L layers is paced as k/L of the emulated model, so the
emulated pipeline keeps the real split's balance (or imbalance) across stages; a stage emulating a
slower device (speed 0.5) takes twice as long for the same layers.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from .emulation import DeviceProfile, LinkProfile

PROFILES = Path(str(files(__package__) / "profiles"))
DEFAULT_PROFILE = PROFILES / "jetson_orin_7b.toml"


class ProfileError(ValueError):
    """A profile file that cannot be used as written."""


@dataclass(frozen=True)
class EdgeProfile:
    name: str
    model_layers: int
    fixed_ms_per_layer: float
    per_token_ms_per_layer: float
    link: LinkProfile | None = None

    def stage(self, layers: int, of: int, speed: float = 1.0) -> DeviceProfile:
        """The pacing of a stage that holds `layers` of the real model's `of` layers, on a device
        `speed` times as fast as this profile's (0.5: every layer takes twice as long)."""
        emulated = self.model_layers * layers / of / speed
        return DeviceProfile(emulated * self.fixed_ms_per_layer, emulated * self.per_token_ms_per_layer)


def load_edge_profile(path: Path | str) -> EdgeProfile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read the profile: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    device = data.get("device")
    if not isinstance(device, dict):
        raise ProfileError(f"{path}: needs a [device] table")

    def number(table: dict, where: str, key: str, positive: bool = True) -> float:
        value = table.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
            raise ProfileError(f"{path}: {where}.{key}: must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
        return float(value)

    layers = number(device, "device", "model_layers")
    if layers != int(layers):
        raise ProfileError(f"{path}: device.model_layers: must be a whole number, got {layers}")
    link = None
    if "link" in data:
        link = LinkProfile(number(data["link"], "link", "bandwidth_mbps", False), number(data["link"], "link", "delay_ms", False))
    return EdgeProfile(
        name=str(device.get("name", path.stem)),
        model_layers=int(layers),
        fixed_ms_per_layer=number(device, "device", "fixed_ms_per_layer"),
        per_token_ms_per_layer=number(device, "device", "per_token_ms_per_layer"),
        link=link,
    )
