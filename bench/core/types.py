"""Core value types: ThreatModel (and the check of an attack's output against it), Cell (one unit of work) and
Record (one example's outcome)."""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from bench.core.errors import UserError

Norm = Literal["l1", "l2", "linf"]
NORMS: tuple[Norm, ...] = ("l1", "l2", "linf")  # the one list of norms: attacks, certificates, tables


@dataclass(frozen=True)
class ThreatModel:
    """An L1, L2 or L-inf ball of radius `eps` around x, intersected with the [0,1] pixel box."""

    norm: str
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; use one of {NORMS}")
        if not (self.eps >= 0):  # also rejects NaN
            raise ValueError(f"eps must be a non-negative number, got {self.eps!r}")

    def norm_of(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-example norm of a perturbation: (N, ...) -> (N,)."""
        flat = delta.flatten(1)
        if self.norm == "linf":
            return flat.abs().amax(dim=1)
        if self.norm == "l1":
            return flat.abs().sum(dim=1)
        return flat.norm(p=2, dim=1)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Project x_adv (N, C, H, W) into the eps-ball around x, then into [0, 1].

        For L1 this is the exact Euclidean projection onto the intersection of the ball and the
        box (`project_l1_box`): clipping after an L1-ball projection would waste budget on pixels
        that the box then cuts (Croce & Hein, ICCV 2021, Sec. 3.1).
        """
        delta = x_adv - x
        if self.norm == "l1":
            return add_towards_centre(x, l1_box_delta(delta, x, self.eps))
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = self.norm_of(delta).clamp_min(1e-12)
            factor = (self.eps / norms).clamp(max=1.0)
            delta = delta * factor.view(-1, *([1] * (delta.dim() - 1)))
        return (x + delta).clamp(0.0, 1.0)

    def random_init(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniformly random point of the ball around x (clipped to the box), same shape as x."""
        if self.norm == "linf":
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = (2 * noise - 1) * self.eps
        elif self.norm == "l1":
            # Uniform in the L1 ball: |delta| / eps is the first d coordinates of a uniform point of
            # the (d+1)-simplex (normalized exponentials), with independent random signs.
            d = x[0].numel()
            spacings = -torch.rand((x.shape[0], d + 1), generator=generator, device=x.device,
                                   dtype=x.dtype).clamp_min(1e-12).log()
            magnitude = spacings[:, :d] / spacings.sum(dim=1, keepdim=True)
            signs = torch.randint(0, 2, (x.shape[0], d), generator=generator, device=x.device).to(x.dtype) * 2 - 1
            delta = (self.eps * magnitude * signs).view_as(x)
        else:
            # Uniform in the L2 ball: a Gaussian direction scaled by U^(1/d).
            direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            dim = x[0].numel()
            u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
            delta = direction * (self.eps * u.pow(1.0 / dim)).view(-1, *([1] * (x.dim() - 1)))
        return (x + delta).clamp(0.0, 1.0)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
        """(N,) bool: x_adv lies in the ball (up to tol, relative for eps > 1) and in the [0,1] box."""
        # A float32 norm summed over thousands of pixels carries rounding of a few ulps of eps itself.
        in_ball = self.norm_of(x_adv - x) <= self.eps + tol * max(1.0, self.eps)
        flat = x_adv.flatten(1)
        in_box = (flat >= -tol).all(dim=1) & (flat <= 1 + tol).all(dim=1)
        return in_ball & in_box


def project_l1_box(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The exact Euclidean projection of delta (N, ...) onto {d : ||d||_1 <= eps, 0 <= x + d <= 1}.

    Same shape and dtype as delta; a last shrink towards 0 (which stays in the box) absorbs the rounding
    of the float64 solution (`l1_box_delta`) to delta's dtype.
    """
    result = l1_box_delta(delta, x, eps).to(delta.dtype).flatten(1)
    norms = result.abs().sum(dim=1)
    over = norms > eps
    if bool(over.any()):
        shrink = eps / norms[over] * (1 - 4 * torch.finfo(delta.dtype).eps)
        result[over] = result[over] * shrink[:, None]
    return result.view(delta.shape)


def l1_box_delta(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The projection of `project_l1_box`, solved and returned in float64, same shape as delta.

    The solution is soft-thresholding clipped to the box, d_i = sign(delta_i) min(max(|delta_i| -
    lam, 0), cap_i) with cap_i the room left in the box in delta_i's direction, and lam >= 0 the root
    of the piecewise-linear, non-increasing g(lam) = sum_i d_i(lam) = eps (lam = 0 when clipping
    alone fits). Its 2d breakpoints are sorted once, so the root is exact, not bisected (the
    ball-and-box projection of Croce & Hein, "Mind the box", ICCV 2021, Lemma 3.1).

    Args:
        delta: perturbations (N, ...); x: the centres (N, ...) in [0, 1]; eps: the L1 radius.
    """
    flat = delta.flatten(1).double()
    centre = x.flatten(1).double()
    cap = torch.where(flat > 0, 1 - centre, centre).clamp_min(0.0)
    size = flat.abs()
    clipped = torch.minimum(size, cap)
    rows = (clipped.sum(dim=1) > eps).nonzero().squeeze(1)
    if rows.numel():
        a, c = size[rows], cap[rows]
        # Coordinate i leaves its cap at lam = a_i - c_i (slope -1 from there) and reaches 0 at a_i (slope back to 0).
        points = torch.cat([a - c, a], dim=1)
        events = torch.cat([-torch.ones_like(a), torch.ones_like(a)], dim=1)
        points, order = points.sort(dim=1)
        slope = events.gather(1, order).cumsum(dim=1)  # g's slope just right of each breakpoint
        gaps = points.diff(dim=1)
        values = torch.cat([c.sum(dim=1, keepdim=True),
                            c.sum(dim=1, keepdim=True) + (slope[:, :-1] * gaps).cumsum(dim=1)], dim=1)
        # values[k] = g(points[k]), non-increasing from sum(c) > eps down to 0: the root lies after
        # the last breakpoint where g is still above eps.
        last = (values > eps).sum(dim=1, keepdim=True) - 1
        at, value, rate = points.gather(1, last), values.gather(1, last), slope.gather(1, last)
        lam = (at + (value - eps) / (-rate).clamp_min(1.0)).clamp_min(0.0)
        clipped[rows] = torch.minimum((a - lam).clamp_min(0.0), c)
    return (clipped * flat.sign()).view(delta.shape)


def add_towards_centre(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x + delta in x's dtype, rounded towards x so that |result - x| <= |delta| for every coordinate (N, ...).

    Rounding to nearest is not enough for L1: a soft-threshold shifts every perturbation by the same lam, so the
    rounding errors of x + delta share a sign wherever x shares a binade, and over the 268k pixels of an ImageNet
    image they add up to 1e-4 of eps and more (measured 2.7e-3 at eps 20), outside the ball. Rounding towards x
    keeps the ball and, since x + delta lies between x and a box face, the [0, 1] box too.
    """
    centre = x.double()
    rounded = (centre + delta.double()).to(x.dtype)
    away = (rounded.double() - centre).abs() > delta.double().abs()
    return torch.where(away, torch.nextafter(rounded, x), rounded)


class AttackOutputError(UserError, RuntimeError):
    """An attack returned something the harness cannot judge (another shape, NaN or inf, outside its ball or box)."""


def checked_attack_output(name: str, x_adv: Any, x: torch.Tensor, threat: ThreatModel,
                          finish: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """x_adv detached (then `finish`ed, e.g. the attack template's projection) once it is a point of `threat`
    around x: a tensor of x's shape (N, C, H, W), finite, in the eps-ball and the [0, 1] box.

    The one check of an attack's output: the attack template (attacks.template) runs it on what its
    algorithm returns and the runner on what every attack returns. Otherwise AttackOutputError, one line.
    """
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        shape = getattr(x_adv, "shape", type(x_adv).__name__)
        raise AttackOutputError(f"attack {name!r} returned {shape}, expected a tensor of shape {tuple(x.shape)}")
    x_adv = x_adv.detach()
    if finish is not None:
        x_adv = finish(x_adv)
    # A NaN or inf row is an error, never a failed attack: no projection can give it a meaning (a NaN
    # pixel is in no ball), and counting it as "attack failed" would report robustness that is only a
    # diverged step or a model whose logits are NaN. The run stops at the cell, keeping the cells before it.
    finite = torch.isfinite(x_adv.flatten(1)).all(dim=1)
    if not bool(finite.all()):
        raise AttackOutputError(f"attack {name!r} returned {int((~finite).sum())} example(s) with NaN or inf "
                                "pixels; check its step size and loss (and that the model's logits are finite)")
    inside = threat.contains(x_adv, x)
    if not bool(inside.all()):
        largest = float(threat.norm_of((x_adv - x)[~inside]).max())
        raise AttackOutputError(f"attack {name!r} returned {int((~inside).sum())} example(s) outside the "
                                f"{threat.norm} ball of eps={threat.eps} (largest norm {largest:.6g}) or the [0,1] "
                                "box; it must project its output")
    return x_adv


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed derived from any JSON-able parts (e.g. a run seed and a step, or a cell key)."""
    return int(hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:15], 16)


def canonical_json(value: Any) -> str:
    """Stable JSON text (sorted keys, no spaces) used for hashing configurations."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def cell_label(dataset: str, defense: str, attack: str, eps: float | None = None) -> str:
    """'dataset/defense/attack@eps' ('@eps' for a fixed budget only): how logs, checks and reports name a cell."""
    return f"{dataset}/{defense}/{attack}" + ("" if eps is None else f"@{eps:g}")


@dataclass(frozen=True)
class Cell:
    """One dataset x defense x attack (x eps) unit of work; its key names its results forever.

    `eps` is None for minimum-norm attacks (one run gives the whole accuracy-vs-L_attack curve)
    and for the clean/certification cell (attack "none").
    """

    dataset: str
    defense: str
    attack: str
    norm: str | None = None
    eps: float | None = None
    defense_params: dict[str, Any] = field(default_factory=dict)
    attack_params: dict[str, Any] = field(default_factory=dict)
    examples: int = 100
    seed: int = 0
    max_steps: int | None = None
    defense_label: str = ""
    attack_label: str = ""
    # Clean cells of certified defenses: certify only this nested stratified subset of the
    # examples and predict the rest (None: certify all of them).
    certify_examples: int | None = None
    # Most examples attacked (or certified) together: the profile's per-attack or per-dataset
    # `batch_size` (None: the run's). Like run.batch_size and the device, an execution setting,
    # not part of the configuration a key hashes (bench.core.subbatch may lower it to fit memory anyway).
    batch_size: int | None = None
    # Opt-in speed settings that change results (bench.profile.speed: {"autocast": "bf16", "channels_last": True});
    # empty (the exact float32 path) for every cell they do not apply to.
    speed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Labels default to the registry names; they name rows and columns of the tables.
        if not self.defense_label:
            object.__setattr__(self, "defense_label", self.defense)
        if not self.attack_label:
            object.__setattr__(self, "attack_label", self.attack)

    def label(self) -> str:
        """This cell's name in logs, checks and reports: 'dataset/defense_label/attack_label@eps' (see cell_label)."""
        return cell_label(self.dataset, self.defense_label, self.attack_label, self.eps)

    def threat(self) -> ThreatModel | None:
        """The threat model of a fixed-size attack (eps=inf for minimum-norm attacks)."""
        if self.norm is None:
            return None
        return ThreatModel(self.norm, math.inf if self.eps is None else self.eps)

    def defense_config(self) -> dict[str, Any]:
        """What determines the trained model: dataset, defense, its params, seed, step cap (and speed settings)."""
        config = {
            "dataset": self.dataset,
            "defense": self.defense,
            "defense_params": self.defense_params,
            "seed": self.seed,
            "max_steps": self.max_steps,
        }
        if self.speed:
            config["speed"] = dict(self.speed)  # bf16 / channels_last training gives other weights
        return config

    def config(self) -> dict[str, Any]:
        """The full configuration as plain data (certify_examples and speed only when set, so older keys stay;
        batch_size never: it is how the cell runs, not what it computes)."""
        config = asdict(self)
        if config["certify_examples"] is None:
            del config["certify_examples"]
        if not config["speed"]:
            del config["speed"]
        del config["batch_size"]
        return config


@dataclass(frozen=True)
class Record:
    """Outcome for one test example in one cell.

    `norm` is the perturbation size of x_adv (0 for the clean cell; inf when a minimum-norm
    attack found no adversarial example); `radius` is the certified radius of the prediction
    being judged (None for uncertified defenses).
    """

    index: int
    label: int
    clean_pred: int
    adv_pred: int
    norm: float
    radius: float | None
    seconds: float
    forward_passes: int
