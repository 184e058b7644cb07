"""Bound propagation for sequential ReLU networks: IBP, Wong-Kolter (= Fast-Lin), CROWN and CROWN-IBP."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.errors import UserError
from bench.core.models import ImageClassifier, Normalize
from bench.core.precision import exact_float32

METHODS = ("ibp", "wong", "crown", "crown_ibp")
# Bytes of the widest coefficient tensor of one chunk of an identity specification (N x rows x
# layer size); bounds the memory of intermediate-bound passes without cutting them into many small ops.
CHUNK_BYTES = 2 ** 28
_TINY = 1e-12  # guards u - l and square roots against 0 (only ever loosens a bound)


class BoundError(UserError, ValueError):
    """A network, dtype or context the bound code cannot handle soundly."""


# ---------------------------------------------------------------------------------------------
# Layer list: the network flattened into affine maps, ReLUs and reshapes.
# ---------------------------------------------------------------------------------------------

class Linear:
    """y = x W^T + b on (N, in) -> (N, out)."""

    dense = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward_abs(self, r: torch.Tensor) -> torch.Tensor:
        """|W| r: how an interval radius grows."""
        return F.linear(r, self.weight.abs())

    def forward_sq(self, s: torch.Tensor) -> torch.Tensor:
        """W^2 s: squared L2 norms of the rows of W diag(sqrt(s))."""
        return F.linear(s, self.weight.square())

    def back(self, a: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
        """Coefficients (N, S, out) on the output -> (N, S, in) on the input (a W)."""
        return a.matmul(self.weight)

    def bias_term(self, a: torch.Tensor) -> torch.Tensor:
        """(N, S): a . b."""
        if self.bias is None:
            return a.new_zeros(a.shape[:2])
        return a.matmul(self.bias)


class Conv:
    """A 2-D convolution (N, C, H, W) -> (N, C', H', W')."""

    dense = True

    def __init__(self, module: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise BoundError("only zero padding given as integers is supported")
        self.weight, self.bias = weight, bias
        self.stride, self.padding = module.stride, module.padding
        self.dilation, self.groups = module.dilation, module.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward_abs(self, r: torch.Tensor) -> torch.Tensor:
        return F.conv2d(r, self.weight.abs(), None, self.stride, self.padding, self.dilation, self.groups)

    def forward_sq(self, s: torch.Tensor) -> torch.Tensor:
        return F.conv2d(s, self.weight.square(), None, self.stride, self.padding, self.dilation, self.groups)

    def transpose(self, a: torch.Tensor, in_hw: Sequence[int], padding: Sequence[int]) -> torch.Tensor:
        """The transposed convolution of a batch a (M, C', H', W') onto inputs of size in_hw -> (M, C, *in_hw)."""
        kh, kw = self.weight.shape[-2:]
        if self.groups == 1 and self.weight.shape[1] == 1:
            # One input channel (an image stem): oneDNN's deconvolution is slow there; a GEMM and one
            # col2im over the whole batch (as channels of a single image) are not.
            cols = torch.matmul(self.weight.flatten(1).t(), a.flatten(2))
            flat = F.fold(cols.reshape(1, -1, cols.shape[-1]), tuple(in_hw), (kh, kw), self.dilation,
                          tuple(padding), self.stride)
            return flat.view(a.shape[0], 1, *in_hw)
        # output_padding recovers input sizes that the strided forward conv rounded down.
        extra = tuple(int(in_hw[i]) - ((a.shape[2 + i] - 1) * self.stride[i] - 2 * padding[i]
                                       + self.dilation[i] * (k - 1) + 1) for i, k in enumerate((kh, kw)))
        # oneDNN's deconvolution runs ~3x faster on channels-last inputs.
        flat = F.conv_transpose2d(a.contiguous(memory_format=torch.channels_last), self.weight, None, self.stride,
                                  tuple(padding), extra, self.groups, self.dilation)
        return flat.contiguous()

    def back(self, a: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
        """The transposed convolution applied to every row of a (N, S, C', H', W') -> (N, S, C, H, W)."""
        n, s = a.shape[:2]
        flat = self.transpose(a.reshape(n * s, *a.shape[2:]), in_shape[1:], self.padding)
        return flat.reshape(n, s, *in_shape)

    def bias_term(self, a: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return a.new_zeros(a.shape[:2])
        return torch.einsum("nschw,c->ns", a, self.bias)


class ChannelAffine:
    """y = x * scale + shift per channel (Normalize, or a batch norm without a preceding layer)."""

    dense = False

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        self.scale, self.shift = scale, shift  # shaped to broadcast against (N, C, ...) from dim 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift

    def forward_abs(self, r: torch.Tensor) -> torch.Tensor:
        return r * self.scale.abs()

    def scale_diag(self, s: torch.Tensor) -> torch.Tensor:
        return s * self.scale

    def back(self, a: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
        return a * self.scale

    def bias_term(self, a: torch.Tensor) -> torch.Tensor:
        return (a * self.shift).flatten(2).sum(-1)


class Flatten:
    """(N, C, H, W) -> (N, C*H*W)."""

    dense = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    forward_abs = forward

    def scale_diag(self, s: torch.Tensor) -> torch.Tensor:
        return s.flatten(1)

    def back(self, a: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
        return a.reshape(*a.shape[:2], *in_shape)

    def bias_term(self, a: torch.Tensor) -> torch.Tensor:
        return a.new_zeros(a.shape[:2])


class ReLU:
    """The only nonlinearity; relaxed with the triangle's upper line and a selectable lower line."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)


def _fold_batchnorm(layer, bn: nn.modules.batchnorm._BatchNorm):
    """Fold an eval-mode batch norm into the preceding Linear / Conv (or make it a ChannelAffine)."""
    if bn.training:
        raise BoundError("batch norm must be in eval mode (running statistics) to be folded for certification")
    if bn.running_var is None or bn.running_mean is None:
        raise BoundError("batch norm without running statistics (track_running_stats=False) cannot be folded "
                         "for certification")
    scale = bn.running_var.add(bn.eps).rsqrt()
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    if isinstance(layer, (Linear, Conv)):
        view = (-1,) + (1,) * (layer.weight.dim() - 1)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
        layer.weight = layer.weight * scale.view(view)
        layer.bias = bias * scale + shift
        return layer
    view = (-1, 1, 1) if isinstance(bn, nn.BatchNorm2d) else (-1,)
    return ChannelAffine(scale.view(view), shift.view(view))


def _flatten(module: nn.Flatten) -> Flatten:
    if module.start_dim != 1 or module.end_dim != -1:
        raise BoundError("only nn.Flatten(start_dim=1, end_dim=-1) is supported")
    return Flatten()


def _normalize(module: Normalize) -> ChannelAffine:
    std = module.std.reshape(-1, 1, 1)
    return ChannelAffine(1.0 / std, -module.mean.reshape(-1, 1, 1) / std)


def _dropout(module: nn.Dropout) -> None:
    if module.training:
        raise BoundError("unsupported layer Dropout in training mode; bounds handle eval-mode Dropout")
    return None


# Leaf modules in the order they are matched (isinstance), each to its bound layer (None: the identity).
_LEAVES: tuple[tuple[type | tuple[type, ...], Any], ...] = (
    (nn.Linear, lambda m: Linear(m.weight, m.bias)),
    (nn.Conv2d, lambda m: Conv(m, m.weight, m.bias)),
    (nn.ReLU, lambda m: ReLU()),
    (nn.Flatten, _flatten),
    (Normalize, _normalize),
    (nn.Identity, lambda m: None),
    (nn.Dropout, _dropout),
)


def _children(module: nn.Module) -> list[nn.Module] | None:
    """The parts of a container (ImageClassifier, nn.Sequential) in forward order; None for a leaf."""
    if isinstance(module, ImageClassifier):
        if not isinstance(module.noise, nn.Identity):
            raise BoundError("the model's noise layer is not the identity; a randomized network has no "
                             "deterministic bound")
        return [module.normalize, module.stem, module.noise, module.body]
    if isinstance(module, nn.Sequential):
        return list(module)
    return None


def _add_leaf(module: nn.Module, layers: list) -> None:
    """Append the bound layer of one leaf module to `layers` (BatchNorm folds into the layer before it)."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        previous = layers.pop() if layers and isinstance(layers[-1], (Linear, Conv)) else None
        layers.append(_fold_batchnorm(previous, module))
        return
    for kind, convert in _LEAVES:
        if isinstance(module, kind):
            layer = convert(module)
            if layer is not None:
                layers.append(layer)
            return
    raise BoundError(f"unsupported layer {type(module).__name__}; bounds handle Linear, Conv2d, ReLU, "
                     "Flatten, Normalize, BatchNorm (folded) and Identity")


def linearize(model: nn.Module) -> list:
    """Flatten a model into a list of Linear / Conv / ChannelAffine / Flatten / ReLU layers.

    Accepts `bench.core.models.ImageClassifier` (normalize -> stem -> noise -> body; the noise slot
    must be the identity: a random layer has no deterministic bound) and nested nn.Sequential of
    Linear, Conv2d, ReLU, Flatten, Normalize, BatchNorm (folded), Identity and eval-mode Dropout.
    The layers hold the model's parameters, so bounds are differentiable (certified training).
    """
    layers: list = []

    def visit(module: nn.Module) -> None:
        children = _children(module)
        if children is None:
            _add_leaf(module, layers)
        else:
            for child in children:
                visit(child)

    visit(model)
    return layers


# ---------------------------------------------------------------------------------------------
# The input set: L-inf ball intersected with the [0,1] box (or not), or an L2 ball.
# ---------------------------------------------------------------------------------------------

class InputSet:
    """{x' : ||x' - x|| <= eps} (intersected with [0,1] for L-inf when `box`), per-example eps (N,).

    For L2 the box is dropped (a superset, so the bounds stay sound). `box=False` keeps the plain
    L-inf ball, the set of Wong & Kolter's published robust errors (their `bounded_input=False`).
    """

    def __init__(self, x: torch.Tensor, norm: str, eps: torch.Tensor, box: bool = True):
        if norm not in ("linf", "l2"):
            raise BoundError(f"unknown norm {norm!r}; use 'linf' or 'l2'")
        self.x, self.norm, self.eps = x, norm, eps
        view = eps.view(-1, *([1] * (x.dim() - 1)))
        if norm == "linf":
            low, high = x - view, x + view
            if box:
                low, high = low.clamp_min(0.0), high.clamp_max(1.0)
            self.mid, self.rad = (low + high) / 2, (high - low) / 2


# ---------------------------------------------------------------------------------------------
# Interval bound propagation (Gowal et al. 2018).
# ---------------------------------------------------------------------------------------------

def interval_bounds(layers: list, inputs: InputSet) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], tuple]:
    """IBP: pre-activation bounds {ReLU index: (l, u)} and the interval of the output.

    For L2, the ball is carried exactly through leading diagonal layers (Normalize) and the first
    dense layer (radius eps * row norm), then as a box.
    """
    pre: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    n = inputs.x.shape[0]
    if inputs.norm == "linf":
        mid, rad = inputs.mid, inputs.rad
        diag = None
    else:
        mid, rad = inputs.x, None
        diag = torch.ones_like(inputs.x[:1])  # composite diagonal scale since the input
    for i, layer in enumerate(layers):
        if diag is not None and not isinstance(layer, ReLU):
            if layer.dense:
                norms = layer.forward_sq(diag.square()).clamp_min(_TINY).sqrt()
                mid, rad = layer.forward(mid), inputs.eps.view(n, *([1] * (norms.dim() - 1))) * norms
                diag = None
            else:
                mid, diag = layer.forward(mid), layer.scale_diag(diag)
            continue
        if diag is not None:  # a ReLU before any dense layer: enclose the L2 ball in its box
            rad = inputs.eps.view(n, *([1] * (diag.dim() - 1))) * diag.abs()
            diag = None
        if isinstance(layer, ReLU):
            assert rad is not None  # diag is None here, and rad is set whenever diag is (Linf: from the start)
            low, high = mid - rad, mid + rad
            pre[i] = (low, high)
            low, high = low.clamp_min(0), high.clamp_min(0)
            mid, rad = (low + high) / 2, (high - low) / 2
        else:
            mid, rad = layer.forward(mid), layer.forward_abs(rad)
    if diag is not None:
        rad = inputs.eps.view(n, *([1] * (diag.dim() - 1))) * diag.abs()
    assert rad is not None  # set above when diag was still carried, else earlier
    return pre, (mid - rad, mid + rad)


# ---------------------------------------------------------------------------------------------
# Linear relaxation, propagated backwards (Wong & Kolter 2018 / Fast-Lin / CROWN).
#
# The coefficients of a backward pass (rows = specifications) live in one of two layouts: dense,
# (N, S, *layer shape), or patches for identity specifications of a convolution's output, where
# each output position only sees a window of every earlier layer (the "patches" of Xu et al. 2020,
# auto_LiRPA). Both give the same sums; patches skip the zeros outside the receptive field, which
# on the Wong-Kolter MNIST net cuts the second layer's bounds from ~630 to ~7 MFLOP per image.
# ---------------------------------------------------------------------------------------------

def _relu_lines(low: torch.Tensor, high: torch.Tensor, method: str):
    """Per-neuron (upper slope, upper intercept, lower slope) of the ReLU relaxation.

    Unstable neurons (l < 0 < u) get the triangle's upper line u/(u-l) (z - l); the lower line is
    d z with d = u/(u-l) for Wong-Kolter / Fast-Lin and 1[u > -l] for CROWN.
    """
    active = low >= 0
    unstable = (low < 0) & (high > 0)
    slope = high.clamp_min(0) / (high - low).clamp_min(_TINY)
    up_slope = torch.where(active, torch.ones_like(slope), torch.where(unstable, slope, torch.zeros_like(slope)))
    up_icpt = torch.where(unstable, -slope * low, torch.zeros_like(slope))
    if method == "wong":
        lo_slope = up_slope
    else:
        adaptive = (high > -low).to(slope.dtype)
        lo_slope = torch.where(active, torch.ones_like(slope), torch.where(unstable, adaptive, torch.zeros_like(slope)))
    return up_slope, up_icpt, lo_slope


class _DenseCoef:
    """Coefficients t (B, S, *shape) on one layer's values (B = N, or 1 when shared by the batch)."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def like(self, m: torch.Tensor) -> torch.Tensor:
        """A per-example map m (N or 1, *shape) laid out to broadcast against t."""
        return m.unsqueeze(1)

    def with_t(self, t: torch.Tensor, clean: bool | None = None) -> _DenseCoef:
        return _DenseCoef(t)

    def dot(self, m: torch.Tensor) -> torch.Tensor:
        """(N, S): sum over the layer of t * m, for a map m (N or 1, *shape)."""
        t, m = self.t.flatten(2), m.flatten(1)
        if t.shape[0] == 1:  # shared rows: one GEMM instead of N broadcast copies
            return torch.matmul(m, t[0].t())
        return torch.matmul(t, m.unsqueeze(-1)).squeeze(-1)

    def norm_sq(self) -> torch.Tensor:
        """(B, S): squared L2 norm of each row."""
        return self.t.flatten(2).square().sum(-1)

    def through(self, layer, in_shape: Sequence[int]) -> tuple[torch.Tensor, _DenseCoef]:
        """(a . bias of layer, coefficients on the layer's input)."""
        return layer.bias_term(self.t), _DenseCoef(layer.back(self.t, in_shape))


class _Window:
    """Where output position (p, q) of the specification layer looks in an earlier layer.

    Rows p*stride - offset ... + size - 1 (likewise columns); positions outside the layer are the
    convolutions' zero padding and carry no value.
    """

    def __init__(self, size, stride, offset):
        self.size, self.stride, self.offset = tuple(size), tuple(stride), tuple(offset)

    def through(self, conv: Conv) -> _Window:
        """The window on a convolution's input that its window on the output covers."""
        kernel = conv.weight.shape[-2:]
        return _Window([(s - 1) * st + d * (k - 1) + 1 for s, st, d, k in
                        zip(self.size, conv.stride, conv.dilation, kernel, strict=True)],
                       [a * b for a, b in zip(self.stride, conv.stride, strict=True)],
                       [o * st + p for o, st, p in zip(self.offset, conv.stride, conv.padding, strict=True)])


class _PatchCoef:
    """Coefficients t (B, L, S, C, Kh, Kw) of identity specifications on a conv output (S channels, L positions).

    Row (s, l) is neuron s at position l of the specification layer; its coefficients on an earlier
    layer with values of shape `shape` (C, H, W) are nonzero only in `window` at position l.
    `locs` picks the positions of this chunk; `clean` says the coefficients on padding positions are
    known to be zero (padding carries no value, so they must not reach an earlier layer).
    """

    def __init__(self, t: torch.Tensor, window: _Window, shape: Sequence[int], out_hw: Sequence[int], locs: slice,
                 clean: bool):
        self.t, self.window, self.shape, self.out_hw = t, window, tuple(shape), tuple(out_hw)
        self.locs, self.clean = locs, clean

    def like(self, m: torch.Tensor) -> torch.Tensor:
        """(B', L, 1, C, Kh, Kw): the window of a map m (B', C, H, W) at every position, zero outside m."""
        (kh, kw), (sh, sw), (oh, ow) = self.window.size, self.window.stride, self.window.offset
        out_h, out_w = self.out_hw
        height, width = m.shape[-2:]
        bottom = max(0, (out_h - 1) * sh + kh - oh - height)
        right = max(0, (out_w - 1) * sw + kw - ow - width)
        views = F.pad(m, (ow, right, oh, bottom)).unfold(2, kh, sh).unfold(3, kw, sw)[:, :, :out_h, :out_w]
        return views.permute(0, 2, 3, 1, 4, 5).flatten(1, 2)[:, self.locs].unsqueeze(2)

    def with_t(self, t: torch.Tensor, clean: bool | None = None) -> _PatchCoef:
        """The same layout holding t; clean=True when t was multiplied by a map laid out by `like`."""
        return _PatchCoef(t, self.window, self.shape, self.out_hw, self.locs, self.clean if clean is None else clean)

    @staticmethod
    def _rows(values: torch.Tensor) -> torch.Tensor:
        """(B, L, S) per-row values -> (B, S * L), rows in the specification layer's (C, H, W) order."""
        return values.transpose(1, 2).flatten(1)

    def dot(self, m: torch.Tensor) -> torch.Tensor:
        windows = self.like(m).flatten(2)  # (B', L, C*Kh*Kw)
        t = self.t.flatten(3)  # (B, L or 1, S, C*Kh*Kw)
        if t.shape[0] == 1:  # coefficients shared by the batch: one GEMM per position
            return self._rows(torch.einsum("lsd,nld->nls", t[0].expand(windows.shape[1], -1, -1), windows))
        return self._rows(torch.matmul(t, windows.unsqueeze(-1)).squeeze(-1))

    def norm_sq(self) -> torch.Tensor:
        return self._rows(self.masked().t.flatten(3).square().sum(-1))

    def masked(self) -> _PatchCoef:
        """The same coefficients with those on padding positions zeroed."""
        if self.clean:
            return self
        valid = self.like(self.t.new_ones(1, *self.shape))
        return _PatchCoef(self.t * valid, self.window, self.shape, self.out_hw, self.locs, True)

    def through(self, layer, in_shape: Sequence[int]) -> tuple[torch.Tensor, _PatchCoef]:
        if isinstance(layer, ChannelAffine):
            shift = layer.shift.expand(self.shape).unsqueeze(0)  # zero on padding, which has no shift
            return self.dot(shift), _PatchCoef(self.t * layer.scale, self.window, in_shape, self.out_hw,
                                               self.locs, self.clean)
        assert isinstance(layer, Conv)
        coef = self.masked()
        bias = (coef.dot(layer.bias.view(1, -1, 1, 1).expand(1, *self.shape)) if layer.bias is not None
                else coef.t.new_zeros(()))
        batch, positions, rows, channels, kh, kw = coef.t.shape
        window = self.window.through(layer)
        flat = layer.transpose(coef.t.reshape(batch * positions * rows, channels, kh, kw), window.size, (0, 0))
        return bias, _PatchCoef(flat.view(batch, positions, rows, *flat.shape[1:]), window, in_shape, self.out_hw,
                                self.locs, False)


def _patch_windows(layers: list, shapes: list, k: int) -> list[_Window] | None:
    """Windows on the inputs of layers[k-1], ..., layers[0] for patches of layer k's input, or None.

    None when patches do not apply (a non-convolutional layer before k, or a layer k-1 that is not a
    convolution) or would hold more numbers than the dense identity (receptive fields wider than the maps).
    """
    if k == 0 or not isinstance(layers[k - 1], Conv):
        return None
    window, windows = _Window((1, 1), (1, 1), (0, 0)), []
    patch_size = dense_size = 0
    for i in range(k - 1, -1, -1):
        layer = layers[i]
        if isinstance(layer, Conv):
            window = window.through(layer)
        elif not isinstance(layer, (ReLU, ChannelAffine)):
            return None
        windows.append(window)
        channels, height, width = shapes[i]
        patch_size += channels * window.size[0] * window.size[1]
        dense_size += channels * height * width
    return windows if patch_size <= dense_size else None


def _lines(pre: dict, i: int, method: str, cache: dict):
    """_relu_lines of ReLU i, computed once per bound computation."""
    if i not in cache:
        low, high = pre[i]
        cache[i] = _relu_lines(low, high, method)
    return cache[i]


def _backward(layers: list, shapes: list, coef, pre: dict[int, tuple[torch.Tensor, torch.Tensor]],
              method: str, stop: int, inputs: InputSet, upper: bool,
              lines: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lower (and upper) bounds of coef . output(layers[stop:]) for coefficients coef (_DenseCoef / _PatchCoef).

    The ReLU relaxations come from `pre`; the last layer reached is concretized against the input
    set (stop = 0) or against the interval of the ReLU output that feeds layers[stop]. An upper
    bound is minus the lower bound of -coef; with Wong-Kolter's equal slopes both share one pass.
    Returns (N, rows) tensors.
    """
    lines = {} if lines is None else lines

    def concretize(coef):
        """(lower, upper) of coef . h over the input set (stop = 0) or the box of ReLU outputs."""
        if stop == 0 and inputs.norm == "l2":
            center = coef.dot(inputs.x)
            dual = coef.norm_sq().clamp_min(_TINY).sqrt() * inputs.eps[:, None]
            return center - dual, center + dual
        if stop == 0:
            mid, rad = inputs.mid, inputs.rad
        else:
            low, high = (t.clamp_min(0) for t in pre[stop - 1])
            mid, rad = (low + high) / 2, (high - low) / 2
        center, spread = coef.dot(mid), coef.with_t(coef.t.abs()).dot(rad)
        return center - spread, center + spread

    if method == "wong":
        bias = icpt_lo = icpt_hi = 0.0
        for i in range(len(layers) - 1, stop - 1, -1):
            layer = layers[i]
            if isinstance(layer, ReLU):
                slope, icpt, _ = _lines(pre, i, method, lines)
                # Negative coefficients take the upper line's intercept in a lower bound, positive
                # ones in an upper bound; the slope is the same either way.
                negative = coef.with_t(coef.t.clamp_max(0)).dot(icpt)
                icpt_lo = icpt_lo + negative
                if upper:
                    icpt_hi = icpt_hi + coef.dot(icpt) - negative
                coef = coef.with_t(coef.t * coef.like(slope), clean=True)
            else:
                term, coef = coef.through(layer, shapes[i])
                bias = bias + term
        low, high = concretize(coef)
        return low + bias + icpt_lo, (high + bias + icpt_hi) if upper else None

    def lower_pass(coef):
        bias = 0.0
        for i in range(len(layers) - 1, stop - 1, -1):
            layer = layers[i]
            if isinstance(layer, ReLU):
                up_slope, up_icpt, lo_slope = _lines(pre, i, method, lines)
                # Positive coefficients take the lower line, negative ones the upper line.
                negative = coef.t.clamp_max(0)
                bias = bias + coef.with_t(negative).dot(up_icpt)
                mixed = coef.t.clamp_min(0) * coef.like(lo_slope) + negative * coef.like(up_slope)
                coef = coef.with_t(mixed, clean=True)
            else:
                term, coef = coef.through(layer, shapes[i])
                bias = bias + term
        return concretize(coef)[0] + bias

    return lower_pass(coef), (-lower_pass(coef.with_t(-coef.t)) if upper else None)


def _upper(bounds: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """The upper bound of a _backward(..., upper=True) result."""
    assert bounds[1] is not None  # upper=True
    return bounds[1]


def _identity_bounds(layers: list, shapes: list, k: int, pre: dict, method: str,
                     inputs: InputSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(l, u) of the input of layer k (a ReLU), by backward passes of the identity.

    Convolutional prefixes use patches; the rest the dense identity. Rows are chunked so that the
    widest coefficient tensor of a chunk stays under CHUNK_BYTES (one chunk for the Wong-Kolter
    MNIST net at batch 50, so training is not bound by the number of operations).
    """
    n = inputs.x.shape[0]
    shape = shapes[k]
    size = int(torch.Size(shape).numel())
    itemsize = inputs.x.element_size()
    lines: dict = {}
    windows = _patch_windows(layers, shapes, k)
    if windows is not None:
        channels, out_h, out_w = shape
        positions = out_h * out_w
        widest = max(int(shapes[k - 1 - j][0]) * w.size[0] * w.size[1] for j, w in enumerate(windows))
        per_position = max(1, n * channels * widest * itemsize)
        step = max(1, min(positions, CHUNK_BYTES // per_position))
        eye = torch.eye(channels, dtype=inputs.x.dtype, device=inputs.x.device).view(1, 1, channels, channels, 1, 1)
        start_window = _Window((1, 1), (1, 1), (0, 0))
        # The identity is the same at every position (one row block broadcast over positions and examples
        # until the first ReLU), so the first transposed convolution runs once, not N x positions times.
        chunks = [_PatchCoef(eye, start_window, shape, (out_h, out_w), slice(begin, begin + step), True)
                  for begin in range(0, positions, step)]
        parts = [_backward(layers[:k], shapes, coef, pre, method, 0, inputs, True, lines) for coef in chunks]
        # Each chunk's rows are (channel, position); reassemble the positions of every channel.
        low = torch.cat([part[0].view(n, channels, -1) for part in parts], 2)
        high = torch.cat([_upper(part).view(n, channels, -1) for part in parts], 2)
        return low.view(n, *shape), high.view(n, *shape)
    widest = max(int(torch.Size(s).numel()) for s in shapes[:k + 1])
    rows = max(1, CHUNK_BYTES // max(1, n * widest * itemsize))
    eye = torch.eye(size, dtype=inputs.x.dtype, device=inputs.x.device)
    lows, highs = [], []
    for begin in range(0, size, rows):
        part = eye[begin:begin + rows]
        coef = _DenseCoef(part.view(1, -1, *shape))
        bounds = _backward(layers[:k], shapes, coef, pre, method, 0, inputs, True, lines)
        lows.append(bounds[0])
        highs.append(_upper(bounds))
    return torch.cat(lows, 1).view(n, *shape), torch.cat(highs, 1).view(n, *shape)


def _check_context(x: torch.Tensor, layers: list) -> None:
    """Soundness rules: float32/float64 tensors only, and never under autocast."""
    for device_type in {"cpu", "cuda", x.device.type}:
        if torch.is_autocast_enabled(device_type):
            raise BoundError("bounds must not run under autocast: reduced precision breaks soundness; "
                             "leave the autocast context first")
    if x.dtype not in (torch.float32, torch.float64):
        raise BoundError(f"bounds need float32 or float64 inputs, got {x.dtype}")
    for layer in layers:
        for t in (getattr(layer, "weight", None), getattr(layer, "scale", None)):
            if t is not None and t.dtype != x.dtype:
                raise BoundError(f"the model's dtype {t.dtype} differs from the input's {x.dtype}; "
                                 "use float32 or float64 for both")


def _input_shapes(layers: list, x: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Per-layer input shapes (without batch) and the logits at x."""
    shapes = []
    with torch.no_grad():
        h = x[:1]
        for layer in layers:
            shapes.append(tuple(h.shape[1:]))
            h = layer.forward(h)
    return shapes, h


@exact_float32()
def intermediate_bounds(layers: list, x: torch.Tensor, *, norm: str, eps, method: str, box: bool = True):
    """Pre-activation bounds {ReLU index: (l, u)} of `method` and the per-layer input shapes.

    Wong / CROWN compute them layer by layer with the same relaxation (the first ReLU's inputs,
    after at most one dense layer, come exactly from interval arithmetic); IBP and CROWN-IBP use
    interval bounds. `box` intersects an L-inf ball with [0, 1] (InputSet).
    """
    if method not in METHODS:
        raise BoundError(f"unknown bound method {method!r}; use one of {METHODS}")
    _check_context(x, layers)
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0]).contiguous()
    if not bool((eps >= 0).all()):
        raise BoundError("eps must be non-negative")
    inputs = InputSet(x, norm, eps, box)
    shapes, _ = _input_shapes(layers, x)
    interval_pre, _ = interval_bounds(layers, inputs)
    if method in ("ibp", "crown_ibp"):
        return interval_pre, shapes, inputs
    pre: dict = {}
    dense_seen = 0
    for k, layer in enumerate(layers):
        if isinstance(layer, ReLU):
            # Interval arithmetic is exact through one dense layer after diagonal ones.
            pre[k] = interval_pre[k] if dense_seen <= 1 and not pre else _identity_bounds(
                layers, shapes, k, pre, method, inputs)
        elif getattr(layer, "dense", False):
            dense_seen += 1
    return pre, shapes, inputs


@exact_float32()
def spec_lower_bounds(model_or_layers, x: torch.Tensor, spec: torch.Tensor, *, norm: str, eps,
                      method: str = "crown", box: bool = True) -> torch.Tensor:
    """Lower bounds of spec @ logits over the threat ball around each x.

    Args:
        model_or_layers: a sequential ReLU network ([0,1] images -> logits) or its `linearize` list.
        x: centers (N, C, H, W), float32 or float64.
        spec: specification matrices (N, S, K); row s bounds sum_k spec[n, s, k] * logit_k.
        norm: 'linf' (the ball, intersected with [0,1] when `box`) or 'l2'.
        eps: a radius, or per-example radii (N,).
        method: 'ibp', 'wong' (Wong & Kolter 2018 dual = Fast-Lin), 'crown' (Zhang et al. 2018),
            or 'crown_ibp' (Zhang et al. 2020: IBP intermediate bounds, one CROWN pass).
        box: intersect an L-inf ball with the [0,1] pixel box (False: the plain ball, which Wong &
            Kolter 2018 report; it contains the box's set, so it certifies at most as much).

    Returns:
        (N, S) lower bounds, differentiable in the model's parameters.
    """
    layers = model_or_layers if isinstance(model_or_layers, list) else linearize(model_or_layers)
    pre, shapes, inputs = intermediate_bounds(layers, x, norm=norm, eps=eps, method=method, box=box)
    spec = spec.to(x.dtype)
    if method == "ibp":
        relus = [i for i, layer in enumerate(layers) if isinstance(layer, ReLU)]
        stop = relus[-1] + 1 if relus else 0
        lower, _ = _backward(layers, shapes, _DenseCoef(spec), pre, method, stop, inputs, upper=False)
        return lower
    lower, _ = _backward(layers, shapes, _DenseCoef(spec), pre, "wong" if method == "wong" else "crown", 0, inputs,
                         upper=False)
    return lower


def margin_spec(y: torch.Tensor, classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K, K) rows e_y - e_j, so that spec @ logits = z_y - z_j (row j = y is zero)."""
    eye = torch.eye(classes, dtype=dtype, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def margin_lower_bounds(model_or_layers, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps,
                        method: str = "crown", classes: int | None = None, box: bool = True) -> torch.Tensor:
    """(N, K) lower bounds J of z_y - z_j over the ball (J[:, y] = 0); certified iff J_j > 0 for j != y.

    `box` as in `spec_lower_bounds`: False bounds the plain L-inf ball (Wong & Kolter 2018's published set).
    """
    layers = model_or_layers if isinstance(model_or_layers, list) else linearize(model_or_layers)
    if classes is None:
        _, logits = _input_shapes(layers, x)
        classes = logits.shape[1]
    return spec_lower_bounds(layers, x, margin_spec(y, classes, x.dtype), norm=norm, eps=eps, method=method,
                             box=box)


def certified(model_or_layers, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps,
              method: str = "crown", box: bool = True) -> torch.Tensor:
    """(N,) bool: every margin z_y - z_j (j != y) is provably positive over the ball (and box, if `box`)."""
    with torch.no_grad():
        bounds = margin_lower_bounds(model_or_layers, x, y, norm=norm, eps=eps, method=method, box=box)
        bounds = bounds.scatter(1, y[:, None], float("inf"))
        return (bounds > 0).all(dim=1)
