"""Shared fixtures: tiny models, synthetic data, and a quickly trained CNN on the embedded MNIST."""
from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

from bench.core.data import gather, load_split, select_examples
from defenses.undefended import Undefended
from bench.profile.plugins import load_plugins
from bench.core.registry import DATASETS
from bench.execution.training import fit

# Built-ins and installed plugins (the test env installs tests/plugin_pkg), as the CLI loads them:
# the registries are the same in every test whatever ran first, and contract tests cover the plugin.
load_plugins()
torch.set_num_threads(1)  # two xdist workers share two CPU cores


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped (with the reason) where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def same_global_rng():
    """Every test starts from the same global RNG state, whatever ran before it in its xdist worker."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


class TinyLinear(nn.Module):
    """A linear classifier on flattened 1x8x8 images: (N, 1, 8, 8) -> (N, classes)."""

    def __init__(self, classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def nets_folder(request, tmp_path_factory):
    """A folder holding the test module's NETS source as the module NETS_MODULE, on sys.path (and freshly
    imported) while the test module runs: a user's own network file."""
    name = request.module.NETS_MODULE
    folder = tmp_path_factory.mktemp(name)
    (folder / f"{name}.py").write_text(request.module.NETS)
    sys.path.insert(0, str(folder))
    sys.modules.pop(name, None)
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop(name, None)


@pytest.fixture
def tiny_model() -> nn.Module:
    return TinyLinear().eval()


@pytest.fixture
def synthetic_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Eight random 1x8x8 images in [0,1] and labels in {0,1,2}."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


@pytest.fixture(scope="session")
def mnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    """200 stratified mnist5k test images (200, 1, 28, 28) and labels."""
    test = load_split("mnist5k", "test")
    return gather(test, select_examples(test, 200, seed=0))


@pytest.fixture(scope="session")
def trained_cnn() -> nn.Module:
    """cnn_small trained for 300 steps on mnist5k (~97% clean accuracy), eval mode."""
    defense = Undefended(DATASETS.get("mnist5k"), arch="cnn_small", steps=300, batch_size=64, lr=1e-3)
    # Session fixtures are built before the autouse seeding: seed the initial weights here, or they would
    # depend on which tests the xdist worker ran first.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = defense.build_model()
    fit(defense, model, load_split("mnist5k", "train"), steps=300, seed=0, device=torch.device("cpu"),
        progress=False)
    return model.eval()
