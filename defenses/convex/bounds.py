"""Bound propagation for sequential ReLU networks: IBP, Wong-Kolter (= Fast-Lin), CROWN and CROWN-IBP."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.models import ImageClassifier, Normalize

METHODS = ("ibp", "wong", "crown", "crown_ibp")
# Elements of one chunk of an identity specification (N x rows x layer size); bounds the memory
# of intermediate-bound passes (2**23 float32 = 32 MiB).
CHUNK_ELEMENTS = 2 ** 23
_TINY = 1e-12  # guards u - l and square roots against 0 (only ever loosens a bound)


class BoundError(ValueError):
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

    def back(self, a: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
        """The transposed convolution applied to every row of a (N, S, C', H', W') -> (N, S, C, H, W)."""
        n, s = a.shape[:2]
        out_h, out_w = a.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        # output_padding recovers input sizes that the strided forward conv rounded down.
        pad = tuple(int(in_shape[1 + i]) - ((o - 1) * self.stride[i] - 2 * self.padding[i]
                                             + self.dilation[i] * (k - 1) + 1)
                    for i, (o, k) in enumerate(((out_h, kh), (out_w, kw))))
        flat = F.conv_transpose2d(a.reshape(n * s, *a.shape[2:]), self.weight, None, self.stride, self.padding,
                                  pad, self.groups, self.dilation)
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

    Accepts `bench.models.ImageClassifier` (normalize -> stem -> noise -> body; the noise slot
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
# The input set: L-inf ball intersected with the [0,1] box, or an L2 ball.
# ---------------------------------------------------------------------------------------------

class InputSet:
    """{x' : ||x' - x|| <= eps} (intersected with [0,1] for L-inf), per-example eps (N,).

    For L2 the box is dropped (a superset, so the bounds stay sound).
    """

    def __init__(self, x: torch.Tensor, norm: str, eps: torch.Tensor):
        if norm not in ("linf", "l2"):
            raise BoundError(f"unknown norm {norm!r}; use 'linf' or 'l2'")
        self.x, self.norm, self.eps = x, norm, eps
        view = eps.view(-1, *([1] * (x.dim() - 1)))
        if norm == "linf":
            low, high = (x - view).clamp_min(0.0), (x + view).clamp_max(1.0)
            self.mid, self.rad = (low + high) / 2, (high - low) / 2

    def lower(self, a: torch.Tensor) -> torch.Tensor:
        """min over the set of a . x' for coefficients a (N, S, *x.shape[1:]) -> (N, S)."""
        a = a.flatten(2)
        if self.norm == "linf":
            return (torch.einsum("nsd,nd->ns", a, self.mid.flatten(1))
                    - torch.einsum("nsd,nd->ns", a.abs(), self.rad.flatten(1)))
        # Dual norm of L2 is L2: min a.x' = a.x - eps ||a||_2.
        dual = a.square().sum(-1).clamp_min(_TINY).sqrt()
        return torch.einsum("nsd,nd->ns", a, self.x.flatten(1)) - self.eps[:, None] * dual


def _interval_lower(a: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """min of a . h over the box low <= h <= high; a (N, S, *shape), low/high (N, *shape) -> (N, S)."""
    mid, rad = ((low + high) / 2).flatten(1), ((high - low) / 2).flatten(1)
    a = a.flatten(2)
    return torch.einsum("nsd,nd->ns", a, mid) - torch.einsum("nsd,nd->ns", a.abs(), rad)


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


def _backward(layers: list, shapes: list, a: torch.Tensor, pre: dict[int, tuple[torch.Tensor, torch.Tensor]],
              method: str, stop: int, inputs: InputSet, upper: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lower (and upper) bounds of a . output(layers[stop:]) for coefficients a (N, S, *out_shape).

    The ReLU relaxations come from `pre`; the last layer reached is concretized against the input
    set (stop = 0) or against the interval of the ReLU output that feeds layers[stop]. An upper
    bound is minus the lower bound of -a; with Wong-Kolter's equal slopes both share one pass.
    """
    def concretize(coef):
        if stop == 0:
            return inputs.lower(coef)
        low, high = pre[stop - 1]
        return _interval_lower(coef, low.clamp_min(0), high.clamp_min(0))

    if method == "wong":
        coef, bias = a, a.new_zeros(a.shape[:2])
        icpt_lo, icpt_hi = bias, bias
        for i in range(len(layers) - 1, stop - 1, -1):
            layer = layers[i]
            if isinstance(layer, ReLU):
                slope, icpt, _ = (t.unsqueeze(1) for t in _relu_lines(*pre[i], method))
                # Negative coefficients take the upper line's intercept in a lower bound, positive
                # ones in an upper bound; the slope is the same either way.
                icpt_lo = icpt_lo + (coef.clamp_max(0) * icpt).flatten(2).sum(-1)
                if upper:
                    icpt_hi = icpt_hi + (coef.clamp_min(0) * icpt).flatten(2).sum(-1)
                coef = coef * slope
            else:
                bias = bias + layer.bias_term(coef)
                coef = layer.back(coef, shapes[i])
        lower = concretize(coef) + bias + icpt_lo
        return lower, (-concretize(-coef) + bias + icpt_hi) if upper else None

    def lower_pass(coef):
        bias = coef.new_zeros(coef.shape[:2])
        for i in range(len(layers) - 1, stop - 1, -1):
            layer = layers[i]
            if isinstance(layer, ReLU):
                up_slope, up_icpt, lo_slope = (t.unsqueeze(1) for t in _relu_lines(*pre[i], method))
                # Positive coefficients take the lower line, negative ones the upper line.
                negative = coef.clamp_max(0)
                bias = bias + (negative * up_icpt).flatten(2).sum(-1)
                coef = coef.clamp_min(0) * lo_slope + negative * up_slope
            else:
                bias = bias + layer.bias_term(coef)
                coef = layer.back(coef, shapes[i])
        return concretize(coef) + bias

    return lower_pass(a), (-lower_pass(-a) if upper else None)


def _identity_bounds(layers: list, shapes: list, k: int, pre: dict, method: str,
                     inputs: InputSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(l, u) of the input of layer k (a ReLU), by backward passes of the identity, chunked."""
    n = inputs.x.shape[0]
    shape = shapes[k]
    size = int(torch.Size(shape).numel())
    widest = max(int(torch.Size(s).numel()) for s in shapes[:k + 1])
    rows = max(1, CHUNK_ELEMENTS // max(1, n * widest))
    eye = torch.eye(size, dtype=inputs.x.dtype, device=inputs.x.device)
    lows, highs = [], []
    for start in range(0, size, rows):
        part = eye[start:start + rows]
        a = part.view(1, -1, *shape).expand(n, -1, *shape)
        low, high = _backward(layers[:k], shapes, a, pre, method, 0, inputs, upper=True)
        assert high is not None  # upper=True
        lows.append(low)
        highs.append(high)
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


def intermediate_bounds(layers: list, x: torch.Tensor, *, norm: str, eps, method: str):
    """Pre-activation bounds {ReLU index: (l, u)} of `method` and the per-layer input shapes.

    Wong / CROWN compute them layer by layer with the same relaxation (the first ReLU's inputs,
    after at most one dense layer, come exactly from interval arithmetic); IBP and CROWN-IBP use
    interval bounds.
    """
    if method not in METHODS:
        raise BoundError(f"unknown bound method {method!r}; use one of {METHODS}")
    _check_context(x, layers)
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0]).contiguous()
    if not bool((eps >= 0).all()):
        raise BoundError("eps must be non-negative")
    inputs = InputSet(x, norm, eps)
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


def spec_lower_bounds(model_or_layers, x: torch.Tensor, spec: torch.Tensor, *, norm: str, eps,
                      method: str = "crown") -> torch.Tensor:
    """Lower bounds of spec @ logits over the threat ball around each x.

    Args:
        model_or_layers: a sequential ReLU network ([0,1] images -> logits) or its `linearize` list.
        x: centers (N, C, H, W), float32 or float64.
        spec: specification matrices (N, S, K); row s bounds sum_k spec[n, s, k] * logit_k.
        norm: 'linf' (ball intersected with [0,1]) or 'l2'.
        eps: a radius, or per-example radii (N,).
        method: 'ibp', 'wong' (Wong & Kolter 2018 dual = Fast-Lin), 'crown' (Zhang et al. 2018),
            or 'crown_ibp' (Zhang et al. 2020: IBP intermediate bounds, one CROWN pass).

    Returns:
        (N, S) lower bounds, differentiable in the model's parameters.
    """
    layers = model_or_layers if isinstance(model_or_layers, list) else linearize(model_or_layers)
    pre, shapes, inputs = intermediate_bounds(layers, x, norm=norm, eps=eps, method=method)
    spec = spec.to(x.dtype)
    if method == "ibp":
        relus = [i for i, layer in enumerate(layers) if isinstance(layer, ReLU)]
        stop = relus[-1] + 1 if relus else 0
        lower, _ = _backward(layers, shapes, spec, pre, method, stop, inputs, upper=False)
        return lower
    lower, _ = _backward(layers, shapes, spec, pre, "wong" if method == "wong" else "crown", 0, inputs, upper=False)
    return lower


def margin_spec(y: torch.Tensor, classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K, K) rows e_y - e_j, so that spec @ logits = z_y - z_j (row j = y is zero)."""
    eye = torch.eye(classes, dtype=dtype, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def margin_lower_bounds(model_or_layers, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps,
                        method: str = "crown", classes: int | None = None) -> torch.Tensor:
    """(N, K) lower bounds J of z_y - z_j over the ball (J[:, y] = 0); certified iff J_j > 0 for j != y."""
    layers = model_or_layers if isinstance(model_or_layers, list) else linearize(model_or_layers)
    if classes is None:
        _, logits = _input_shapes(layers, x)
        classes = logits.shape[1]
    return spec_lower_bounds(layers, x, margin_spec(y, classes, x.dtype), norm=norm, eps=eps, method=method)


def certified(model_or_layers, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps,
              method: str = "crown") -> torch.Tensor:
    """(N,) bool: every margin z_y - z_j (j != y) is provably positive over the ball."""
    with torch.no_grad():
        bounds = margin_lower_bounds(model_or_layers, x, y, norm=norm, eps=eps, method=method)
        bounds = bounds.scatter(1, y[:, None], float("inf"))
        return (bounds > 0).all(dim=1)
