"""A user's own model plugs in through `user_model`: imported factory, safetensors or weights-only file."""
import argparse
import sys
import textwrap

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from bench.cli.commands import main
from bench.execution.keys import cell_key
from bench.profile.config import ConfigError, parse_profile
from bench.profile.preflight import check_inputs
from bench.core.data import gather, load_split, select_examples

MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    def build(hidden=16):
        torch.manual_seed(3)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
''')


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_models", None)
    import my_models

    model = my_models.build()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # weights that differ from the factory's own initialisation
    return tmp_path, model


def profile_text(weights: str) -> str:
    return f'''
[run]
examples = 30
seed = 0
[defenses.mine]
defense = "user_model"
params = {{ factory = "my_models:build", weights = "{weights}", factory_kwargs = {{ hidden = 16 }} }}
[attacks.pgd_linf]
eps = [0.0, 0.3]
params = {{ steps = 5 }}
'''


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_user_model_is_evaluated_with_its_weights(user_package, tmp_path, suffix, capsys):
    folder, model = user_package
    weights = folder / f"mine{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights)) if suffix == ".safetensors" else torch.save(state, weights)
    path = tmp_path / "user.toml"
    path.write_text(profile_text(str(weights)))
    assert main(["run", str(path), "--results", str(tmp_path / "r"), "--quiet"]) == 0
    frame = pd.read_csv(next((tmp_path / "r").glob("user-*/accuracy_under_attack.csv")))
    test = load_split("mnist5k", "test")
    x, y = gather(test, select_examples(test, 30, seed=0))
    expected = int((model(x).argmax(1) == y).sum())
    assert frame[frame.attack == "clean"].correct.item() == expected
    assert frame[(frame.attack == "pgd_linf") & (frame.eps == 0.0)].correct.item() == expected


def checked(text: str, folder):
    """Cells of a profile text after the run's input checks (weights resolved, hashed and loaded)."""
    path = folder / "u.toml"
    path.write_text(text)
    return check_inputs(parse_profile(text, "u"), argparse.Namespace(profile=str(path), data_root=None,
                                                                     download=False)).cells


def test_weights_hash_is_part_of_the_cell(user_package, tmp_path):
    folder, model = user_package
    weights = folder / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    first = checked(profile_text(str(weights)), tmp_path)[0]
    save_file({k: (2 * v).contiguous() for k, v in model.state_dict().items()}, str(weights))
    second = checked(profile_text(str(weights)), tmp_path)[0]
    assert first.defense_params["weights_sha256"] != second.defense_params["weights_sha256"]
    assert cell_key(first, {}) != cell_key(second, {})


@pytest.mark.parametrize("params, message", [
    ('factory = "my_models"', "must look like 'package.module:function'"),
    ('factory = "no_such_module:build"', "cannot import 'no_such_module'"),
    ('factory = "my_models:nothing"', "has no callable 'nothing'"),
    ('factory = "my_models:build", weights = "/no/such/file.safetensors"', "does not exist"),
])
def test_bad_user_model_params(user_package, tmp_path, params, message):
    text = profile_text("x").replace(
        'factory = "my_models:build", weights = "x", factory_kwargs = { hidden = 16 }', params)
    with pytest.raises(ConfigError, match=message):
        checked(text, tmp_path)


def test_user_model_takes_a_registered_arch_as_the_readme_says(tmp_path, capsys):
    """Issue 27: "every defense takes factory ... (or arch)" failed for user_model; neither is one line."""
    factory_line = 'factory = "my_models:build", weights = "x", factory_kwargs = { hidden = 16 }'
    text = profile_text("x").replace(factory_line, 'arch = "cnn_small", steps = 20')
    path = tmp_path / "arch.toml"
    path.write_text(text)
    assert main(["run", str(path), "--results", str(tmp_path / "r"), "--quiet"]) == 0
    frame = pd.read_csv(next((tmp_path / "r").glob("arch-*/accuracy_under_attack.csv")))
    assert frame[frame.attack == "clean"].n.item() == 30
    path.write_text(text.replace('arch = "cnn_small", ', ""))
    capsys.readouterr()
    assert main(["run", str(path), "--results", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "user_model needs factory" in err[0] and "or arch" in err[0]
