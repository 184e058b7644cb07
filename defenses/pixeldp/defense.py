"""The `pixeldp` defense: noise layer + sensitivity control in training, DP certificates at test time."""
from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.core.data import DatasetSpec
from bench.core.defense import Defense
from bench.core.errors import ConfigError
from bench.core.models import ImageClassifier
from bench.core.registry import DEFENSES
from defenses.pixeldp.bounds import BOUNDS, mean_bounds, vote_bounds
from defenses.pixeldp.certify import (CERTIFIERS, cohen_radius, pixeldp_gaussian_radius, pixeldp_laplace_radius,
                                      renyi_radius)
from defenses.pixeldp.noise import MECHANISMS, NoiseLayer, gaussian_sigma, laplace_scale, os_seeded_generator
from defenses.pixeldp.sampling import Samples, sample
from defenses.pixeldp.sensitivity import DividedConv2d, kernel_divisor, normalize_columns, parseval_step, \
    stem_sensitivity

PLACEMENTS = ("input", "stem")
STATISTICS = ("softmax", "votes")


def _noise_layer(model: nn.Module) -> NoiseLayer:
    """The NoiseLayer that `PixelDP.build_model` put in `model` (nn.Module attributes type as Tensor | Module)."""
    return cast(NoiseLayer, model.noise)


# Parameters that only change evaluation: models trained under other values are reused.
@DEFENSES.register("pixeldp", family="PixelDP", randomized=True, certified=True, certifier="pixeldp",
                   eval_params=("draws_certify", "draws_attack", "draws_predict", "eta", "certifier", "statistic",
                                "bound", "chunk_rows", "chunk_bytes"),
                   libraries=("scipy",))  # scipy.stats computes its certificates (Gaussian tails, Clopper-Pearson)
class PixelDP(Defense):
    """PixelDP (Lecuyer et al., IEEE S&P 2019): a DP noise layer makes predictions certifiably robust.

    Training adds one noise draw per example after the pre-noise layer and keeps that layer's
    sensitivity near 1 (Parseval projection for L2, column normalization for L1). At test time the
    expected softmax (or vote) is estimated from many draws, and the prediction is certified at
    the largest radius meeting the DP robustness condition, divided by a provable upper bound of
    the pre-noise layer's measured sensitivity (computed in `attach`).

    Placement "stem" (default; the paper's noise_after=1) puts the noise after the first conv,
    which becomes a DividedConv2d (kernel / ceil(k/stride)). Placement "input" puts the noise on
    the [0,1] image itself, before the model's normalization and stem, so the pre-noise map is
    the identity (sensitivity exactly 1) and the whole network is post-noise.

    Args:
        spec: the dataset.
        L: construction bound (input-space radius the noise is calibrated for).
        eps, delta: the DP budget the noise is calibrated for (eps <= 1 for the Gaussian mechanism).
        mechanism: "gaussian" (L2 radii by default) or "laplace" (L1 radii).
        attack_norm: the input norm of the radii: "l2" (Gaussian only: L2->L2 sensitivity,
            Parseval control) or "l1" (L1->L1 with Laplace, L1->L2 with Gaussian noise: unit
            L1 / L2 input columns). Default: "l2" for Gaussian, "l1" for Laplace.
        placement: "stem" or "input" (see above).
        draws_certify / draws_attack / draws_predict: noise draws for `certify`, `judge`, `predict`.
        eta: failure probability of each example's certificate (Bonferroni over the classes).
        certifier: "pixeldp" (the paper), "cohen" (Cohen et al. 2019) or "renyi" (Li et al. 2019).
        statistic: "softmax" (expected scores, Hoeffding / Bernstein) or "votes" (Clopper-Pearson).
        bound: "hoeffding", "bernstein" or "auto" (the tighter per entry, eta split between them).
        noise_ramp_steps: steps over which the training noise ramps from `noise_ramp_start` x to
            full (the original's ramp); 0 trains at full noise from the start.
        parseval_beta, parseval_iters: the Parseval projection after every optimizer step (beta =
            3e-4 as in the original, repeated `parseval_iters` times: with Adam fewer repeats let
            the measured sensitivity drift well above 1, which shrinks every radius).
        orthogonal_init: start the stem kernel at a Parseval frame (all singular values 1).
        chunk_rows: most rows per post-noise forward pass.
        chunk_bytes: most bytes of activations per post-noise forward pass (a memory bound sized
            by the measured cost of a row); None: half the free memory on CUDA, CPU_BLOCK_BYTES of
            noised activations (cache-sized) on CPU.
        **train: Defense's architecture and training arguments (arch, steps, lr, ...).
    """

    @staticmethod
    def certified_norm(params: dict) -> str:
        """The radii's input norm: `attack_norm`, else L2 for Gaussian and L1 for Laplace noise."""
        return params.get("attack_norm") or ("l1" if params.get("mechanism") == "laplace" else "l2")

    def __init__(self, spec: DatasetSpec, *, L: float = 0.1, eps: float = 1.0, delta: float = 0.05,
                 mechanism: str = "gaussian", attack_norm: str | None = None, placement: str = "stem",
                 draws_certify: int = 2000, draws_attack: int = 300, draws_predict: int = 25, eta: float = 0.05,
                 certifier: str = "pixeldp", statistic: str = "softmax", bound: str = "auto", noise_ramp_steps: int = 0,
                 noise_ramp_start: float = 0.1, parseval_beta: float = 3e-4, parseval_iters: int = 20,
                 orthogonal_init: bool = True, chunk_rows: int = 2048, chunk_bytes: int | None = None, **train: Any):
        super().__init__(spec, **train)
        if self.input_normalization is not None:
            # The noise is calibrated to the pre-noise layer's sensitivity, which a wrapper in front would change.
            raise ConfigError("pixeldp does not take input_mean / input_std; build the normalization into your "
                              "ImageClassifier's `normalize` layer (bench.core.models.Normalize), which its "
                              "sensitivity bound accounts for")
        for name, value, allowed in (("mechanism", mechanism, MECHANISMS), ("placement", placement, PLACEMENTS),
                                     ("certifier", certifier, CERTIFIERS), ("statistic", statistic, STATISTICS),
                                     ("bound", bound, BOUNDS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; use one of {allowed}")
        attack_norm = attack_norm or ("l2" if mechanism == "gaussian" else "l1")
        if attack_norm not in ("l1", "l2") or (mechanism == "laplace" and attack_norm != "l1"):
            raise ValueError(f"attack_norm {attack_norm!r} does not fit {mechanism} noise: Gaussian noise "
                             "certifies 'l2' or 'l1' radii, Laplace noise 'l1' radii")
        if mechanism == "laplace" and certifier != "pixeldp":
            raise ValueError(f"certifier {certifier!r} needs Gaussian noise; Laplace noise is certified by 'pixeldp'")
        if mechanism == "gaussian" and eps > 1:
            raise ValueError(f"the Gaussian mechanism's bound needs eps <= 1, got {eps}")
        bytes_ok = chunk_bytes is None or chunk_bytes >= 1
        if min(draws_certify, draws_attack, draws_predict, chunk_rows) < 1 or not bytes_ok or noise_ramp_steps < 0:
            raise ValueError("draws, chunk_rows and chunk_bytes must be >= 1 and noise_ramp_steps >= 0")
        if not 0 < eta < 1 or not 0 < noise_ramp_start <= 1 or parseval_beta < 0 or parseval_iters < 0:
            raise ValueError("need 0 < eta < 1, 0 < noise_ramp_start <= 1, parseval_beta >= 0, parseval_iters >= 0")
        self.L, self.eps, self.delta = float(L), float(eps), float(delta)
        self.mechanism, self.placement = mechanism, placement
        self.norm = attack_norm
        # Sensitivity kind: input norm -> noise norm (Gaussian noise is calibrated in L2).
        self.kind = {("gaussian", "l2"): "l2", ("gaussian", "l1"): "l1->l2", ("laplace", "l1"): "l1"}[
            (mechanism, attack_norm)]
        # Noise calibrated for a pre-noise layer of sensitivity 1 (the construction's target).
        self.sigma = gaussian_sigma(L, eps, delta) if mechanism == "gaussian" else laplace_scale(L, eps)
        self.draws_certify, self.draws_attack, self.draws_predict = draws_certify, draws_attack, draws_predict
        self.eta, self.certifier, self.statistic, self.bound = float(eta), certifier, statistic, bound
        self.noise_ramp_steps, self.noise_ramp_start = int(noise_ramp_steps), float(noise_ramp_start)
        self.parseval_beta, self.parseval_iters = float(parseval_beta), int(parseval_iters)
        self.orthogonal_init = bool(orthogonal_init)
        self.chunk_rows = int(chunk_rows)
        self.chunk_bytes = None if chunk_bytes is None else int(chunk_bytes)
        self.sensitivity: float | None = None

    # ----------------------------------------------------------------- model and training
    def build_model(self) -> nn.Module:
        """The architecture with the noise layer in place (and the stem rescaled for "stem")."""
        model = cast(ImageClassifier, super().build_model())  # normalize -> stem -> noise -> body
        if self.placement == "stem":
            stem = model.stem
            if not isinstance(stem, nn.Conv2d):
                raise TypeError(f"placement 'stem' needs a Conv2d stem, {self.arch} has {type(stem).__name__}")
            model.stem = DividedConv2d.from_conv(stem, kernel_divisor(stem, self.kind))
            if self.orthogonal_init:
                with torch.no_grad():
                    nn.init.orthogonal_(model.stem.weight)
            self._control(model)
        else:
            # Noise on the image: everything, normalization included, is post-noise.
            model.body = nn.Sequential(model.normalize, model.stem, model.body)
            model.normalize, model.stem = nn.Identity(), nn.Identity()
        model.noise = NoiseLayer(self.mechanism, self.sigma)
        return model

    def _control(self, model: nn.Module) -> None:
        """Sensitivity control of the stem: Parseval step (L2->L2) or unit-L1 / unit-L2 columns (L1->L1 / L1->L2)."""
        weight = cast(DividedConv2d, model.stem).weight
        if self.kind == "l2":
            parseval_step(weight, self.parseval_beta, self.parseval_iters)
        else:
            normalize_columns(weight, p=1 if self.kind == "l1" else 2)

    def noise_multiplier(self, step: int) -> float:
        """Training noise multiplier: ramps linearly from noise_ramp_start to 1 over noise_ramp_steps."""
        if self.noise_ramp_steps == 0 or step >= self.noise_ramp_steps:
            return 1.0
        return self.noise_ramp_start + (1.0 - self.noise_ramp_start) * step / self.noise_ramp_steps

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """Cross-entropy with one noise draw per example (the noise layer is part of the forward)."""
        _noise_layer(model).multiplier = self.noise_multiplier(step)
        return F.cross_entropy(model(x), y)

    def after_step(self, model: nn.Module) -> None:
        if self.placement == "stem":
            self._control(model)

    # ----------------------------------------------------------------- evaluation
    def attach(self, model: nn.Module, generator: torch.Generator | None = None) -> None:
        """Adopt the trained model; `generator` drives all test-time noise; measures the sensitivity."""
        device = next(model.parameters()).device
        generator = generator if generator is not None else os_seeded_generator(device)
        super().attach(model, generator)
        noise = _noise_layer(model)
        noise.generator = generator
        noise.multiplier = 1.0
        self.sensitivity = self.measure_sensitivity(model)

    def measure_sensitivity(self, model: nn.Module) -> float:
        """Provable upper bound of the pre-noise map's sensitivity (L2->L2, L1->L1 or L1->L2)."""
        if self.placement == "input":
            return 1.0  # identity pre-noise map; ||v||_2 <= ||v||_1 covers L1->L2 too
        return stem_sensitivity(model, self.kind)

    def samples(self, x: torch.Tensor, draws: int) -> Samples:
        """Monte Carlo statistics of `draws` fresh noise draws per image of x (N, C, H, W)."""
        return sample(self.attached_model(), x, draws, chunk_rows=self.chunk_rows, chunk_bytes=self.chunk_bytes)

    def _scores(self, samples: Samples) -> np.ndarray:
        return samples.mean if self.statistic == "softmax" else samples.counts / samples.draws

    def prediction(self, samples: Samples) -> np.ndarray:
        """(N,) argmax of the expected softmax (or of the votes)."""
        return self._scores(samples).argmax(axis=1)

    def bounds(self, samples: Samples, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p_lb of the predicted class (N,), max over the other classes of p_ub (N,)).

        Scores sum to 1, so no other class can exceed 1 - p_lb: p_ub is capped there.
        """
        if self.statistic == "softmax":
            lower, upper = mean_bounds(samples.mean, samples.variance, samples.draws, self.eta, self.bound)
        else:
            lower, upper = vote_bounds(samples.counts, samples.draws, self.eta)
        rows = np.arange(len(pred))
        others = upper.copy()
        others[rows, pred] = -np.inf
        p_lb = lower[rows, pred]
        return p_lb, np.minimum(others.max(axis=1), 1.0 - p_lb)

    def radii(self, samples: Samples, certifier: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(pred (N,), input-space radius (N,)) of one certifier on given samples; radius 0 = not certified."""
        certifier = certifier or self.certifier
        pred = self.prediction(samples)
        p_lb, p_ub = self.bounds(samples, pred)
        if self.mechanism == "laplace":
            if certifier != "pixeldp":
                raise ValueError(f"certifier {certifier!r} needs Gaussian noise")
            radius = pixeldp_laplace_radius(p_lb, p_ub, L=self.L, eps=self.eps)
        elif certifier == "pixeldp":
            radius = pixeldp_gaussian_radius(p_lb, p_ub, L=self.L, eps=self.eps, delta=self.delta)
        elif certifier == "cohen":
            radius = cohen_radius(p_lb, sigma=self.sigma)
        elif certifier == "renyi":
            radius = renyi_radius(p_lb, p_ub, sigma=self.sigma)
        else:
            raise ValueError(f"unknown certifier {certifier!r}; use one of {CERTIFIERS}")
        # The noise is calibrated for sensitivity 1: an input change r moves the noised
        # activations by at most sensitivity * r.
        return pred, radius / self.sensitivity

    def _certified(self, x: torch.Tensor, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
        pred, radius = self.radii(self.samples(x, draws))
        return torch.as_tensor(pred, device=x.device), torch.as_tensor(radius, device=x.device)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) labels from `draws_predict` fresh draws per image."""
        return torch.as_tensor(self.prediction(self.samples(x, self.draws_predict)), device=x.device)

    def certify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred (N,), certified radius (N,), input units, 0 when not robust) from `draws_certify` draws."""
        return self._certified(x, self.draws_certify)

    def judge(self, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred (N,), radius (N,)) of adversarial inputs from `draws_attack` fresh draws (robust precision)."""
        return self._certified(x_adv, self.draws_attack)

    def certify_all(self, x: torch.Tensor, draws: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(pred (N,), {certifier: radius (N,)}) of every applicable certifier on the SAME draws."""
        samples = self.samples(x, draws or self.draws_certify)
        names = CERTIFIERS if self.mechanism == "gaussian" else ("pixeldp",)
        results = {name: self.radii(samples, name) for name in names}
        pred = results[names[0]][0]
        return (torch.as_tensor(pred, device=x.device),
                {name: torch.as_tensor(r, device=x.device) for name, (_, r) in results.items()})
