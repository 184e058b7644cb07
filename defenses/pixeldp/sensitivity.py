"""Sensitivity of the pre-noise layer: Parseval / column-norm control and provable upper bounds."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from bench.core.precision import exact_float32


def coverage(conv: nn.Conv2d) -> tuple[int, int]:
    """(rows, cols): the most kernel taps of `conv` that can read one input pixel, ceil(k/stride) per axis."""
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1):
        raise ValueError("PixelDP's sensitivity bound needs a pre-noise conv with groups=1 and dilation=1")
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    return math.ceil(kh / sh), math.ceil(kw / sw)


# Sensitivity kinds "input norm -> noise norm": "l2" (L2->L2), "l1" (L1->L1) and "l1->l2".
KINDS = ("l2", "l1", "l1->l2")


def kernel_divisor(conv: nn.Conv2d, norm: str) -> float:
    """PixelDP's kernel rescaling: sqrt(ch*cw) (= ceil(k/s) for square kernels) when the noise
    norm is L2 ("l2", "l1->l2"), ch*cw for L1->L1."""
    ch, cw = coverage(conv)
    return float(ch * cw) if norm == "l1" else math.sqrt(ch * cw)


class DividedConv2d(nn.Conv2d):
    """A Conv2d whose kernel is divided by a constant in the forward pass (PixelDP, Lecuyer et al. 2019).

    The projection keeps the raw kernel (reshaped to [out, in*k*k]) near Parseval; dividing by the
    number of taps that can read a pixel then bounds the conv's operator norm by ~1. The weight
    keeps the name `weight`, so state dicts match a plain Conv2d.
    """

    def __init__(self, *args, divisor: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.divisor = float(divisor)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, divisor: float) -> DividedConv2d:
        """A DividedConv2d with the configuration and (copied) parameters of `conv`."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  bias=conv.bias is not None, padding_mode=conv.padding_mode, divisor=divisor)
        new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None and new.bias is not None:  # new has a bias exactly when conv has one
                new.bias.copy_(conv.bias)
        return new

    def effective_weight(self) -> torch.Tensor:
        """The kernel actually applied: weight / divisor (out, in, kh, kw)."""
        return self.weight / self.divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", divisor={self.divisor:g}"


def effective_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The kernel a (possibly divided) conv applies (out, in, kh, kw)."""
    return conv.effective_weight() if isinstance(conv, DividedConv2d) else conv.weight


@torch.no_grad()
def parseval_step(weight: torch.Tensor, beta: float = 3e-4, iters: int = 1) -> None:
    """In place: W <- (1 + beta) W - beta W W^T W on W reshaped to [out, in*k*k], `iters` times.

    One gradient step towards a Parseval tight frame (all singular values 1), as in Cisse et al.
    2017 and PixelDP's L2 sensitivity control; approximate, hence the measured bound below.
    """
    w = weight.view(weight.shape[0], -1)
    for _ in range(iters):
        # One fused addmm per iteration, with whichever Gram matrix is smaller: W (W^T W) or (W W^T) W.
        if w.shape[0] >= w.shape[1]:
            w.copy_(torch.addmm(w, w, w.T @ w, beta=1.0 + beta, alpha=-beta))
        else:
            w.copy_(torch.addmm(w, w @ w.T, w, beta=1.0 + beta, alpha=-beta))


@torch.no_grad()
def normalize_columns(weight: torch.Tensor, p: float = 1.0) -> None:
    """In place: scale each input column W[:, c, i, j] to unit Lp norm (PixelDP's L1 sensitivity control)."""
    norms = weight.norm(p=p, dim=0, keepdim=True).clamp_min(1e-12)
    weight.div_(norms)


def _input_scale(weight: torch.Tensor, std: torch.Tensor | None) -> torch.Tensor:
    """Fold a preceding (x - mean) / std into the kernel: input channel c is scaled by 1/std_c."""
    if std is None:
        return weight
    return weight / std.reshape(1, -1, 1, 1).to(weight)


@torch.no_grad()
def conv_l2_bound(conv: nn.Conv2d, std: torch.Tensor | None = None) -> float:
    """Provable upper bound of the L2->L2 operator norm of x -> conv((x - mean) / std), any input size.

    Each output position applies W_r = W reshaped [out, in*kh*kw] to one input patch, so
    ||conv x||^2 = sum_o ||W_r patch_o||^2 <= ||W_r||_2^2 * sum_o ||patch_o||^2, and every
    pixel lies in at most ceil(kh/sh) * ceil(kw/sw) patches (zero padding only removes terms):
    ||conv||_2 <= ||W_r||_2 * sqrt(ceil(kh/sh) ceil(kw/sw)). Computed in float64.
    """
    weight = _input_scale(effective_weight(conv).double(), std)
    ch, cw = coverage(conv)
    spectral = torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1), ord=2).item()
    return spectral * math.sqrt(ch * cw)


@torch.no_grad()
def conv_l1_bound(conv: nn.Conv2d, std: torch.Tensor | None = None) -> float:
    """Provable upper bound of the L1->L1 operator norm of x -> conv((x - mean) / std), any input size.

    The L1->L1 norm of a linear map is its largest column L1 norm. The column of input pixel
    (c, y, x) holds W[:, c, i, j] for taps with i = y + pad mod sh and j = x + pad mod sw (one tap
    per output position reading it), so it is at most the largest sum of ||W[:, c, i, j]||_1 over
    a residue class of taps (exact away from the borders). Computed in float64.
    """
    weight = _input_scale(effective_weight(conv).double(), std)
    sh, sw = conv.stride
    column = weight.abs().sum(dim=0)  # (in, kh, kw): L1 norm of every input column
    best = 0.0
    for ri in range(min(sh, column.shape[1])):
        for rj in range(min(sw, column.shape[2])):
            best = max(best, column[:, ri::sh, rj::sw].sum(dim=(1, 2)).max().item())
    return best


@torch.no_grad()
def conv_l1_l2_bound(conv: nn.Conv2d, std: torch.Tensor | None = None) -> float:
    """Provable upper bound of the L1->L2 operator norm of x -> conv((x - mean) / std), any input size.

    The L1->L2 norm of a linear map is its largest column L2 norm; the column of input pixel
    (c, y, x) stacks W[:, c, i, j] over one residue class of taps (i, j) mod the stride, so its L2
    norm is at most the largest sqrt(sum ||W[:, c, i, j]||_2^2) over such a class (exact away from
    the borders). Computed in float64.
    """
    weight = _input_scale(effective_weight(conv).double(), std)
    sh, sw = conv.stride
    squared = weight.pow(2).sum(dim=0)  # (in, kh, kw): squared L2 norm of every input column
    best = 0.0
    for ri in range(min(sh, squared.shape[1])):
        for rj in range(min(sw, squared.shape[2])):
            best = max(best, squared[:, ri::sh, rj::sw].sum(dim=(1, 2)).max().item())
    return math.sqrt(best)


def operator_norm_estimate(fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], *, iters: int = 100,
                           generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> float:
    """Power-iteration estimate (a LOWER bound) of the L2->L2 operator norm of an affine map.

    fn maps (1, *shape) -> (1, ...); its linear part x -> fn(x) - fn(0) is iterated through
    v <- A^T A v with the adjoint from autograd. Used to test that the upper bounds hold.
    """
    zero = torch.zeros(1, *shape, device=device)
    offset = fn(zero).detach()
    v = torch.randn(1, *shape, generator=generator).to(device)
    estimate = 0.0
    for _ in range(iters):
        v = (v / v.norm()).requires_grad_(True)
        out = fn(v) - offset
        estimate = out.norm().item()
        v, = torch.autograd.grad(0.5 * out.pow(2).sum(), v)
    return estimate


def pre_noise_std(model: nn.Module) -> torch.Tensor | None:
    """Per-channel std of the model's Normalize layer (None when it has none)."""
    normalize = getattr(model, "normalize", None)
    return getattr(normalize, "std", None)


def stem_sensitivity(model: nn.Module, norm: str) -> float:
    """Upper bound of the sensitivity of normalize -> stem ("l2": L2->L2, "l1": L1->L1, "l1->l2")."""
    stem = model.stem
    if not isinstance(stem, nn.Conv2d):
        raise TypeError(f"PixelDP's stem placement needs a Conv2d stem, got {type(stem).__name__}")
    bounds = {"l2": conv_l2_bound, "l1": conv_l1_bound, "l1->l2": conv_l1_l2_bound}
    if norm not in bounds:
        raise ValueError(f"unknown sensitivity kind {norm!r}; use one of {KINDS}")
    # float64 already; the guard also keeps any float32 step of a future bound out of TF32.
    with exact_float32():
        return bounds[norm](stem, pre_noise_std(model))

