"""PixelDP's noise layer: Gaussian (L2) and Laplace (L1) mechanisms, active in eval mode, caller-seeded."""
from __future__ import annotations

import math

import torch
from torch import nn

MECHANISMS = ("gaussian", "laplace")


def gaussian_sigma(L: float, eps: float = 1.0, delta: float = 0.05, sensitivity: float = 1.0) -> float:
    """Standard deviation of the Gaussian mechanism: Delta_2 * L * sqrt(2 ln(1.25/delta)) / eps.

    (eps, delta)-DP for L2 changes of size L of a function with L2 sensitivity Delta_2, for
    eps <= 1 (Dwork & Roth 2014, Thm. A.1; Lecuyer et al. 2019, Sec. III-B). 2.5373 * L for the
    defaults eps = 1, delta = 0.05.
    """
    _check_budget(L, eps, delta)
    return sensitivity * L * math.sqrt(2.0 * math.log(1.25 / delta)) / eps


def laplace_scale(L: float, eps: float = 1.0, sensitivity: float = 1.0) -> float:
    """Scale b of the Laplace mechanism: Delta_1 * L / eps ((eps, 0)-DP for L1 changes of size L)."""
    _check_budget(L, eps, 0.5)
    return sensitivity * L / eps


def _check_budget(L: float, eps: float, delta: float) -> None:
    if not (L > 0 and eps > 0 and 0 < delta < 1):
        raise ValueError(f"need L > 0, eps > 0 and 0 < delta < 1; got L={L}, eps={eps}, delta={delta}")


def os_seeded_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the operating system's entropy (non-reproducible noise)."""
    generator = torch.Generator(device=device)
    generator.seed()
    return generator


def noise_dtype(activations: torch.dtype) -> torch.dtype:
    """The dtype noise is drawn and added in: float32, or the activations' dtype when it is wider (float64).

    Never bf16 / fp16: their 8- or 11-bit mantissas would round the Gaussian's tails and the sum
    h + noise, and the DP guarantee is stated for the real-valued mechanism. The noisy activations
    stay in this dtype; a bf16 post-noise body rounds them only afterwards (post-processing).
    """
    return torch.promote_types(activations, torch.float32)


class NoiseLayer(nn.Module):
    """Adds one fresh draw of Gaussian or Laplace noise per row, in train AND eval mode.

    The noise comes from `self.generator` (a torch.Generator set by the caller, e.g. the
    defense's `attach`); without one, a generator seeded from the OS is created on first use.
    `multiplier` scales the noise (the original's training ramp; 1 at evaluation). The layer has
    no parameters or buffers, so it never changes a model's state dict.

    Args:
        mechanism: "gaussian" (scale = sigma) or "laplace" (scale = b).
        scale: sigma or b, in units of the activations the noise is added to.
    """

    def __init__(self, mechanism: str, scale: float):
        super().__init__()
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism {mechanism!r}; use one of {MECHANISMS}")
        if not scale > 0:
            raise ValueError(f"noise scale must be positive, got {scale}")
        self.mechanism = mechanism
        self.scale = float(scale)
        self.multiplier = 1.0
        self.generator: torch.Generator | None = None

    def extra_repr(self) -> str:
        return f"mechanism={self.mechanism}, scale={self.scale:.4g}"

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = os_seeded_generator(device)
        return self.generator

    def sample(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """A fresh noise tensor of `shape` on the device of `like`, in float32 or wider (`noise_dtype`)."""
        generator = self._generator_for(like.device)
        # A generator on another device draws there and the noise moves (never silently reseeds).
        device = generator.device
        dtype = noise_dtype(like.dtype)
        scale = self.scale * self.multiplier
        if self.mechanism == "gaussian":
            noise = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, scale, generator=generator)
        else:
            # Inverse CDF of Laplace(0, b): -b sign(u) ln(1 - 2|u|) for u uniform on (-1/2, 1/2).
            u = torch.rand(shape, device=device, dtype=dtype, generator=generator) - 0.5
            noise = -scale * u.sign() * torch.log1p(-2.0 * u.abs()).clamp_min(-1e4)
        return noise if noise.device == like.device else noise.to(like.device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (N, ...) with independent noise on every row (differentiable in h)."""
        # In place on the fresh noise tensor: one activation-sized allocation instead of two. The
        # sum is in the noise's dtype (float32 at least), whatever h's.
        return self.sample(h.shape, h).add_(h)

    def replicate(self, h: torch.Tensor, draws: int) -> torch.Tensor:
        """(N, ...) -> (draws * N, ...): `draws` noisy copies of each row, draw-major (row j*N + i).

        Noise is drawn straight into the output and h is added in place, which avoids a separate
        copy of h for the repetition (the certification hot loop). Image activations (N, C, H, W)
        come back channels_last: the noise is drawn in (draws, N, H, W, C) order (i.i.d., so the
        order changes no distribution) and oneDNN's convolutions read NHWC without a reorder
        (~5% faster certification of the paper's MNIST CNN on CPU).
        """
        if h.dim() != 4:
            out = self.sample(torch.Size((draws, *h.shape)), h)
            out.add_(h.unsqueeze(0))
            return out.view(draws * h.shape[0], *h.shape[1:])
        n, c, height, width = h.shape
        out = self.sample(torch.Size((draws, n, height, width, c)), h).permute(0, 1, 4, 2, 3)
        out.add_(h.contiguous(memory_format=torch.channels_last).unsqueeze(0))
        return out.flatten(0, 1)  # (draws * N, C, H, W), channels_last strides
