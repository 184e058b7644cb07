"""Opt-in GPU speed settings: bf16 autocast and channels_last for post-noise bodies, cuDNN autotuning.

`autocast` and `channels_last` change the numbers a cell computes (bf16 rounding; other
convolution kernels), so they are part of its key (`Cell.speed`) and of its model's cache key.
They touch only what no guarantee depends on: the post-noise body of a noisy model (PixelDP) or
the whole forward of a model without noise (undefended, Madry), in training, in attacks' forward
passes and in Monte Carlo sampling. Never PixelDP's stem, its noise or its sensitivity bound
(bench.core.models.ImageClassifier runs those in IEEE float32), never a deterministic certified
defense (its bounds certify the float32 network), and never an attack's own arithmetic: logits
come back in float32 and perturbations are float32 tensors.

`cudnn_benchmark` only picks among cuDNN's algorithms for the same float32 (or bf16) function, so
it changes results at the rounding level, like running on another GPU: it is a run option, not
part of any key (the device is not part of a key either).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.core.errors import UserError
from bench.core.registry import DefenseInfo
from bench.core.models import ImageClassifier

__all__ = ["AUTOCAST_DTYPES", "SpeedError", "speed_settings", "speed_applies", "cell_speed", "apply_speed",
           "check_device", "configure_backends"]

# Autocast dtypes a profile may ask for; "none" (the default) keeps the exact float32 path.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16}
AUTOCAST_CHOICES = ("none", *AUTOCAST_DTYPES)


class SpeedError(UserError, ValueError):
    """A speed setting that is malformed or cannot run on the chosen device; the message says the fix."""


def speed_settings(autocast: Any = "none", channels_last: Any = False) -> dict[str, Any]:
    """The validated `Cell.speed` table: only settings that differ from the exact path are kept.

    Raises SpeedError for an unknown autocast name or a channels_last that is not a boolean.
    """
    if not isinstance(autocast, str) or autocast not in AUTOCAST_CHOICES:
        raise SpeedError(f"autocast must be one of {', '.join(repr(c) for c in AUTOCAST_CHOICES)}, got {autocast!r}")
    if not isinstance(channels_last, bool):
        raise SpeedError(f"channels_last must be true or false, got {channels_last!r}")
    speed: dict[str, Any] = {}
    if autocast != "none":
        speed["autocast"] = autocast
    if channels_last:
        speed["channels_last"] = True
    return speed


def speed_applies(info: DefenseInfo) -> bool:
    """Whether the speed settings may touch a defense's model: not for deterministic certified defenses.

    Their certificates (e.g. convex bounds) are about the float32 network, and their predictions
    must be that network's; a randomized certified defense (PixelDP) is covered by keeping its
    stem and noise exact, since its certificate is about the expectation over noise of whatever
    post-noise function is evaluated.
    """
    return info.randomized or not info.certified


def cell_speed(info: DefenseInfo, speed: dict[str, Any]) -> dict[str, Any]:
    """The speed settings a cell of this defense carries (and is keyed by): {} where they do not apply."""
    return dict(speed) if speed and speed_applies(info) else {}


def apply_speed(model: nn.Module, speed: dict[str, Any]) -> bool:
    """Switch a model's body to the settings of `speed` (in place); False when the model cannot take them.

    Only bench.core.models.ImageClassifier models (the registry's architectures) expose the noise split
    the settings need, directly or as the `body` behind a wrapper's input noise (randomized
    smoothing's base classifier, all of it post-noise); a user's own network (a `factory`) stays exact.
    """
    if not speed:
        return True
    if not isinstance(model, ImageClassifier):
        base = getattr(model, "body", None)
        return isinstance(base, ImageClassifier) and not base.has_noise() and apply_speed(base, speed)
    model.body_autocast = AUTOCAST_DTYPES[speed["autocast"]] if "autocast" in speed else None
    model.body_channels_last = bool(speed.get("channels_last", False))
    if model.body_channels_last:
        # The body's 4-d weights in NHWC too, so convolutions read and write NHWC without reorders
        # (a model without noise runs whole). Checkpoints are written contiguous (bench.execution.cache).
        (model if not model.has_noise() else model.body).to(memory_format=torch.channels_last)
    return True


def check_device(speed: dict[str, Any], device: torch.device) -> None:
    """Refuse bf16 autocast off CUDA: on CPUs it is slow without AMX and would key CPU results as bf16 ones."""
    if "autocast" in speed and device.type != "cuda":
        raise SpeedError(f"autocast = {speed['autocast']!r} runs on CUDA devices only (this run is on {device}); "
                         "drop run.autocast / --autocast, or run with --device cuda")


def configure_backends(device: torch.device, cudnn_benchmark: bool) -> None:
    """Process-wide backend switches for a run on `device`: cuDNN autotuning when asked for, on CUDA."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
