"""A user's input normalization (`input_mean`, `input_std`): the network sees (x - mean) / std, everything else pixels.

Attacks, budgets, noise and certified radii stay in [0,1] pixel units because the normalization is
part of the model the defense holds, in front of the user's network: a `Normalize` layer, which
the convex bounds treat as the linear map it is (so certificates are about pixels too).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import nn

from bench.core.errors import ConfigError
from bench.core.models import Normalize

__all__ = ["NORMALIZATION_PARAMS", "NormalizedInput", "check_normalization"]

# The defense parameters that set it; unset (None) they stay out of a cell's parameters
# (bench.profile.params), so the parameters of every cell without them are what they were before.
NORMALIZATION_PARAMS = ("input_mean", "input_std")


class NormalizedInput(nn.Sequential):
    """[0,1] images (N, C, H, W) -> `network`((x - mean) / std): a Sequential of `normalize` then `network`.

    `network` is the user's network, what a `weights` file fills.
    """

    normalize: Normalize
    network: nn.Module

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__(OrderedDict(normalize=Normalize(mean, std), network=network))


def _values(name: str, value: Any, channels: int) -> tuple[float, ...]:
    """`value` (a number or one per channel) as a tuple of finite floats; ConfigError naming `name` otherwise."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                         for v in values):
        raise ConfigError(f"{name} must be a number or a list of numbers (one per channel), got {value!r}")
    if len(values) not in (1, channels):
        raise ConfigError(f"{name} has {len(values)} values but the images have {channels} channel(s); give one "
                          f"value per channel, or one for all")
    return tuple(float(v) for v in values)


def check_normalization(mean: Any, std: Any, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) checked for images of `channels` channels (mean 0 or std 1 where unset); None when both are unset."""
    if mean is None and std is None:
        return None
    means = (0.0,) if mean is None else _values("input_mean", mean, channels)
    stds = (1.0,) if std is None else _values("input_std", std, channels)
    if any(s <= 0 for s in stds):
        raise ConfigError(f"input_std must be positive (the pixels are divided by it), got {std!r}")
    return means, stds
