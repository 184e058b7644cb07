"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): Gaussian noise on the input, CERTIFY with abstention."""
from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import beta, binomtest, norm
from torch import nn

from bench.core.data import DatasetSpec
from bench.core.defense import Defense
from bench.core.registry import DEFENSES
from bench.core.subbatch import rows_within
from defenses.pixeldp.noise import NoiseLayer, os_seeded_generator

ABSTAIN = -1  # the label of an abstention: never equal to a true label, so it counts as wrong everywhere


class SmoothedClassifier(nn.Module):
    """x (N, C, H, W) in [0,1] -> logits of body(x + N(0, sigma^2 I)): one noise draw per row, fresh each call.

    The base classifier is `body` (its forward passes are the ones counted); `pre_noise` is the
    identity, so Monte Carlo helpers that replicate only the noisy part apply unchanged.
    """

    def __init__(self, base: nn.Module, sigma: float):
        super().__init__()
        self.noise = NoiseLayer("gaussian", sigma)
        self.body = base

    def pre_noise(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def post_noise(self, h: torch.Tensor) -> torch.Tensor:
        return self.body(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.noise(x))


@torch.no_grad()
def class_counts(model: SmoothedClassifier, x: torch.Tensor, draws: int, classes: int,
                 chunk_rows: int = 2048, chunk_bytes: int | None = None) -> np.ndarray:
    """(N, K) int64: how often the base classifier's argmax is each class over `draws` noisy copies of each image.

    A forward holds `rows` noisy images: at most `chunk_rows`, and at most `chunk_bytes` at the
    measured cost of one (bench.core.subbatch.rows_within; None: half the free memory on CUDA, no
    bound elsewhere). Noise order (so that an independent implementation can replay the
    generator): images in blocks of max(1, rows // draws); per block, draws in pieces of
    min(draws, rows) per image, each piece one (block, piece, C, H, W) draw from the noise layer's generator.
    """
    n = x.shape[0]
    rows = rows_within(model.body, x, chunk_rows, chunk_bytes)
    block = max(1, rows // draws)
    piece = max(1, min(draws, rows))
    counts = torch.zeros(n, classes, dtype=torch.int64, device=x.device)
    for start in range(0, n, block):
        xb = x[start:start + block]
        b = xb.shape[0]
        for done in range(0, draws, piece):
            d = min(piece, draws - done)
            noisy = model.noise.sample(torch.Size((b, d, *xb.shape[1:])), xb).add_(xb.unsqueeze(1))
            labels = model.body(noisy.view(b * d, *xb.shape[1:])).argmax(dim=1).view(b, d)
            counts[start:start + b].scatter_add_(1, labels, torch.ones_like(labels))
    return counts.cpu().numpy()


def lower_confidence_bound(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """(N,) one-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion (0 for 0 successes)."""
    successes = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(alpha, successes, trials - successes + 1)
    return np.where(successes > 0, bound, 0.0)


def certify_from_counts(select: np.ndarray, estimate: np.ndarray, draws: int, sigma: float,
                        alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Cohen et al.'s CERTIFY: (pred (N,), L2 radius (N,)) from selection and estimation counts (N, K) of `draws` draws.

    The top class of the selection draws is the guess; p_A is the (1 - alpha) lower bound of its
    frequency among the estimation draws; below 1/2 the classifier abstains (pred -1, radius 0),
    else the radius is sigma * Phi^-1(p_A) (Cohen et al. 2019, Theorem 1 and Algorithm CERTIFY).
    With probability at least 1 - alpha, a returned label is the smoothed classifier's prediction
    everywhere within the radius.
    """
    guess = np.asarray(select).argmax(axis=1)
    p_a = lower_confidence_bound(np.asarray(estimate)[np.arange(len(guess)), guess], draws, alpha)
    certified = p_a >= 0.5
    radius = np.where(certified, sigma * norm.ppf(np.clip(p_a, 0.5, 1.0)), 0.0)
    return np.where(certified, guess, ABSTAIN), radius


def predict_from_counts(counts: np.ndarray, alpha: float) -> np.ndarray:
    """Cohen et al.'s PREDICT: the top class when a two-sided binomial test of top vs runner-up rejects at alpha,
    else -1."""
    order = np.argsort(-counts, axis=1, kind="stable")
    rows = np.arange(len(counts))
    top, second = counts[rows, order[:, 0]], counts[rows, order[:, 1]]
    keep = np.array([binomtest(int(a), int(a + b), 0.5).pvalue <= alpha if a + b > 0 else False
                     for a, b in zip(top, second, strict=True)], dtype=bool)
    return np.where(keep, order[:, 0], ABSTAIN)


@DEFENSES.register("randomized_smoothing", family="randomized smoothing", randomized=True, certified=True,
                   certified_norm="l2", certifier="cohen",
                   eval_params=("draws_select", "draws_certify", "draws_attack", "draws_predict", "alpha",
                                "chunk_rows", "chunk_bytes"),
                   libraries=("scipy",))  # scipy.stats computes its certificates (binomtest, beta, norm)
class RandomizedSmoothing(Defense):
    """Randomized smoothing (Cohen et al., ICML 2019): the most likely class of f(x + N(0, sigma^2 I)), certified in L2.

    Certifies any base classifier: a registered arch, or your own (`factory`, `weights`, steps = 0).
    With steps > 0 the base classifier is trained with Gaussian noise augmentation at `sigma`.
    `certify` runs CERTIFY (`draws_select` = n0 draws pick the class, `draws_certify` = n draws
    bound its probability, Clopper-Pearson at `alpha`); an abstention is label -1 (always wrong).
    `judge` certifies adversarial inputs the same way with `draws_attack` fresh draws, and
    `predict` is PREDICT with `draws_predict` draws. All noise comes from the defense's generator.

    Args:
        spec: the dataset.
        sigma: standard deviation of the Gaussian noise in [0,1]-pixel units (Cohen: 0.12 - 1.0).
        draws_select: n0, draws that choose the class to certify (Cohen: 100).
        draws_certify: n, draws that bound its probability (Cohen: 100,000).
        draws_attack: n for the certificate of an adversarial input (robust precision).
        draws_predict: draws of PREDICT.
        alpha: failure probability of each certificate (and PREDICT's test level; Cohen: 0.001).
        chunk_rows: most noisy images per base-classifier forward pass.
        chunk_bytes: most bytes of activations per base-classifier forward pass, at the measured
            cost of an image (None: half the free memory on CUDA, no bound elsewhere).
        **params: Defense's architecture, weights and training arguments.
    """

    @staticmethod
    def certified_norm(params: dict) -> str:
        """Gaussian smoothing certifies L2 radii."""
        return "l2"

    def __init__(self, spec: DatasetSpec, *, sigma: float = 0.25, draws_select: int = 100, draws_certify: int = 10000,
                 draws_attack: int = 1000, draws_predict: int = 100, alpha: float = 0.001, chunk_rows: int = 2048,
                 chunk_bytes: int | None = None, **params: Any):
        super().__init__(spec, **params)
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if min(draws_select, draws_certify, draws_attack, draws_predict, chunk_rows) < 1 or not (
                chunk_bytes is None or chunk_bytes >= 1):
            raise ValueError("draws_select, draws_certify, draws_attack, draws_predict, chunk_rows and chunk_bytes "
                             "must be >= 1")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.sigma, self.alpha = float(sigma), float(alpha)
        self.draws_select, self.draws_certify = int(draws_select), int(draws_certify)
        self.draws_attack, self.draws_predict, self.chunk_rows = int(draws_attack), int(draws_predict), int(chunk_rows)
        self.chunk_bytes = None if chunk_bytes is None else int(chunk_bytes)

    def build_model(self) -> nn.Module:
        """The base classifier behind a Gaussian noise layer on the input."""
        return SmoothedClassifier(super().build_model(), self.sigma)

    def weights_target(self, model: nn.Module) -> nn.Module:
        """A weights file holds the base classifier (as Cohen et al.'s released models do)."""
        return cast(SmoothedClassifier, model).body

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """Cross-entropy of the base classifier on one Gaussian draw per example (Cohen et al., Sec. 4)."""
        return F.cross_entropy(model(x), y)

    def attach(self, model: nn.Module, generator: torch.Generator | None = None) -> None:
        """Adopt the model; every noise draw (certify, judge, predict, attacks) comes from `generator`."""
        device = next(model.parameters()).device
        generator = generator if generator is not None else os_seeded_generator(device)
        super().attach(model, generator)
        noise = cast(SmoothedClassifier, model).noise
        noise.generator = generator
        noise.multiplier = 1.0

    def counts(self, x: torch.Tensor, draws: int) -> np.ndarray:
        """(N, K) base-classifier votes over `draws` fresh noise draws per image of x (N, C, H, W)."""
        return class_counts(cast(SmoothedClassifier, self.attached_model()), x, draws, self.spec.classes,
                            self.chunk_rows, self.chunk_bytes)

    def _certify(self, x: torch.Tensor, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
        select = self.counts(x, self.draws_select)
        estimate = self.counts(x, draws)
        pred, radius = certify_from_counts(select, estimate, draws, self.sigma, self.alpha)
        return torch.as_tensor(pred, device=x.device), torch.as_tensor(radius, device=x.device)

    def certify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred (N,), L2 radius (N,)): CERTIFY with n0 = draws_select, n = draws_certify; pred -1 = abstain."""
        return self._certify(x, self.draws_certify)

    def judge(self, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred (N,), radius (N,)) of adversarial inputs by CERTIFY with n = draws_attack fresh draws."""
        return self._certify(x_adv, self.draws_attack)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) labels by PREDICT with `draws_predict` fresh draws; -1 where the test abstains."""
        return torch.as_tensor(predict_from_counts(self.counts(x, self.draws_predict), self.alpha), device=x.device)
