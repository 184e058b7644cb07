"""A quickly trained PixelDP cnn_small on mnist5k, shared (trained once per session) by the PixelDP tests."""
from __future__ import annotations

import copy
import functools

import torch

from bench.core.data import load_split
from bench.core.registry import DATASETS
from bench.execution.training import fit
from defenses.pixeldp.defense import PixelDP

TRAIN_STEPS = 300


@functools.cache
def trained_weights(L: float = 0.3, steps: int = TRAIN_STEPS) -> torch.nn.Module:
    """cnn_small trained with PixelDP noise (L, eps=1, delta=0.05) for `steps` steps, seeded."""
    torch.manual_seed(0)
    defense = PixelDP(DATASETS.get("mnist5k"), L=L, arch="cnn_small", steps=steps, batch_size=64, lr=1e-3)
    model = defense.build_model()
    fit(defense, model, load_split("mnist5k", "train"), steps=steps, seed=0, device=torch.device("cpu"),
        progress=False)
    return model.eval()


def attached(L: float = 0.3, seed: int = 0, **params) -> PixelDP:
    """A PixelDP defense holding a private copy of the trained model, its noise seeded with `seed`."""
    defense = PixelDP(DATASETS.get("mnist5k"), L=L, arch="cnn_small", **params)
    defense.attach(copy.deepcopy(trained_weights(L)), torch.Generator().manual_seed(seed))
    return defense
