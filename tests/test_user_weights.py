"""A user's own network, trained elsewhere, certified through a profile: weights files, key mapping, refusals."""
import argparse
import os
import textwrap

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from bench.cli.commands import main
from bench.profile.config import parse_profile
from bench.core.data import gather, load_split, select_examples
from bench.profile.preflight import check_inputs
from bench.core.registry import DATASETS
from bench.execution.training import fit
from defenses.convex.defense import WongKolter

EXAMPLES = 40
THRESHOLDS = [0.0, 0.02, 0.05, 0.1]
NETS_MODULE = "user_nets"  # NETS as a module on sys.path: the conftest fixture nets_folder
NETS = textwrap.dedent('''
    from torch import nn

    def small_conv(width=8):
        """conv 4x4/2 -> conv 4x4/2 -> FC 64 -> FC 10 for 28x28 digits (a user's own network)."""
        return nn.Sequential(nn.Conv2d(1, width, 4, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(2 * width * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))

    def with_tanh():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Tanh())

    def broken():
        raise RuntimeError("no GPU here")

    def not_a_module():
        return {"conv": 1}
''')
CERTIFY = 'eps = 0.1, bound = "crown_ibp", bisection_steps = 6'


@pytest.fixture(scope="module")
def trained(nets_folder):
    """(defense, model): the user's net after brief Wong-Kolter training with the project's convex loss."""
    spec = DATASETS.get("mnist5k")
    defense = WongKolter(spec, factory="user_nets:small_conv", norm="linf", eps=0.1, bound="crown_ibp",
                         bisection_steps=6, steps=120, batch_size=32, lr=2e-3)
    torch.manual_seed(0)
    model = defense.build_model()
    fit(defense, model, load_split("mnist5k", "train"), steps=120, seed=0, device=torch.device("cpu"), progress=False)
    defense.attach(model.eval())
    return defense, model


def in_memory_certified(defense) -> list[int]:
    """Certified counts at THRESHOLDS of the in-memory model on the run's fixed test subset."""
    test = load_split("mnist5k", "test")
    x, y = gather(test, select_examples(test, EXAMPLES, seed=0))
    pred, radius = defense.certify(x)
    return [int(((pred == y) & (radius >= t)).sum()) for t in THRESHOLDS]


def profile(params: str, label: str = "mine", defense: str = "wong_kolter") -> str:
    return f'''
[run]
examples = {EXAMPLES}
seed = 0
thresholds = {THRESHOLDS}
[defenses.{label}]
defense = "{defense}"
params = {{ {params} }}
'''


def run(tmp_path, text: str, *extra: str) -> int:
    path = tmp_path / "profiles" / "user.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return main(["run", str(path), "--results", str(tmp_path / "results"), "--quiet", "--threads", "1", *extra])


@pytest.mark.parametrize("layout", ["prefix", "mapping"])
def test_certified_accuracy_from_a_weights_file_equals_the_in_memory_model(trained, tmp_path, monkeypatch, layout):
    defense, model = trained
    expected = in_memory_certified(defense)
    assert expected[0] >= EXAMPLES // 2 and expected[-1] > 0  # trained: accurate and certifiably robust at 0.1
    state = model.state_dict()
    if layout == "prefix":  # saved from a DataParallel wrapper: every key starts with "module."
        saved, option = {"module." + k: v for k, v in state.items()}, 'weights_prefix = "module."'
    else:  # saved from the user's own class with named layers
        names = {"0": "conv1", "2": "conv2", "5": "fc1", "7": "fc2"}
        saved = {f"{names[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in state.items()}
        option = "weights_keys = { " + ", ".join(f'"{names[k.split(".")[0]]}.{k.split(".")[1]}" = "{k}"'
                                                  for k in state) + " }"
    (tmp_path / "profiles").mkdir()
    torch.save(saved, tmp_path / "profiles" / "mine.pt")
    monkeypatch.chdir(tmp_path / "results" if (tmp_path / "results").exists() else tmp_path.parent)
    # A relative weights path is taken from the profile's folder, not from the working directory.
    text = profile(f'factory = "user_nets:small_conv", weights = "mine.pt", {option}, steps = 0, {CERTIFY}')
    assert run(tmp_path, text) == 0
    frame = pd.read_csv(next((tmp_path / "results").glob("user-*/certified_accuracy.csv")))
    assert frame["n"].tolist() == [EXAMPLES] * len(THRESHOLDS)
    assert frame["certified"].tolist() == expected


def test_keys_that_do_not_fit_name_the_missing_and_unexpected_ones(trained, tmp_path, capsys):
    _, model = trained
    (tmp_path / "profiles").mkdir()
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "profiles" / "mine.pt")
    text = profile(f'factory = "user_nets:small_conv", weights = "mine.pt", steps = 0, {CERTIFY}')
    assert run(tmp_path, text) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str((tmp_path / "profiles" / "mine.pt").resolve()) in err
    assert "missing keys 0.weight, 0.bias" in err and "unexpected keys module.0.weight" in err
    assert not (tmp_path / "results").exists()  # nothing registered, no run folder


def bad_files(folder, model):
    """name -> (file written in folder, params, expected message fragment)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(folder / "pwned"),))

    torch.save({"0.weight": Payload()}, folder / "pickle.pt")
    torch.save([state["0.weight"]], folder / "list.pt")
    torch.save({k: v for k, v in state.items() if k != "7.bias"}, folder / "partial.pt")
    torch.save({k: (v[:1] if k == "5.weight" else v) for k, v in state.items()}, folder / "shapes.pt")
    torch.save({}, folder / "empty_dict.pt")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "truncated.pt").write_bytes((folder / "partial.pt").read_bytes()[:200])
    save_file(state, str(folder / "ok.safetensors"))
    (folder / "truncated.safetensors").write_bytes((folder / "ok.safetensors").read_bytes()[:100])
    torch.save({"epoch": 3, "state_dict": state}, folder / "checkpoint.pt")
    import user_nets

    torch.save(user_nets.with_tanh().state_dict(), folder / "tanh.pt")
    user = 'factory = "user_nets:small_conv", steps = 0, '
    return {
        "pickle": (user + 'weights = "pickle.pt"', "pickled Python objects (posix.system)"),
        "list": (user + 'weights = "list.pt"', "holds a list, not a state dict"),
        "partial": (user + 'weights = "partial.pt"', "missing keys 7.bias, unexpected keys none"),
        "shapes": (user + 'weights = "shapes.pt"', "shape mismatch (file vs model) for 5.weight (1, 784) vs (64, 784)"),
        "empty_dict": (user + 'weights = "empty_dict.pt"', "holds an empty state dict"),
        "empty": (user + 'weights = "empty.pt"', "is empty"),
        "truncated": (user + 'weights = "truncated.pt"', "corrupt, truncated or not a checkpoint"),
        "truncated_safetensors": (user + 'weights = "truncated.safetensors"', "corrupt, truncated or not a checkpoint"),
        "nested": (user + 'weights = "checkpoint.pt"', "set weights_entry = 'state_dict'"),
        "missing": (user + 'weights = "nowhere/mine.pt"', "does not exist"),
        "folder": (user + 'weights = "."', "(it is a folder)"),
        "raises": ('factory = "user_nets:broken", steps = 0, weights = "ok.safetensors"',
                   "factory 'user_nets:broken' raised RuntimeError: no GPU here"),
        "not_module": ('factory = "user_nets:not_a_module", steps = 0, weights = "ok.safetensors"',
                       "returned dict, not a torch.nn.Module"),
        "no_weights": ('factory = "user_nets:small_conv", steps = 0', "steps = 0 and no weights"),
        "no_training": ("steps = 0", "steps = 0 and no weights"),
        "unsupported": ('factory = "user_nets:with_tanh", steps = 0, weights = "tanh.pt"',
                        "convex bounds cannot certify this model: unsupported layer Tanh"),
    }


@pytest.mark.parametrize("case", ["pickle", "list", "partial", "shapes", "empty_dict", "empty", "truncated",
                                  "truncated_safetensors", "nested", "missing", "folder", "raises", "not_module",
                                  "no_weights", "no_training", "unsupported"])
def test_bad_weights_and_factories_are_one_line_before_anything_is_written(nets_folder, trained, tmp_path, capsys,
                                                                           case):
    folder = tmp_path / "profiles"
    folder.mkdir()
    params, fragment = bad_files(folder, trained[1])[case]
    assert run(tmp_path, profile(params + f", {CERTIFY}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert fragment in err, err
    assert "weights_only=False" not in err and "Traceback" not in err
    if "weights =" in params and case not in ("raises", "not_module", "unsupported"):
        name = params.split('weights = "')[1].split('"')[0]
        assert str((folder / name).resolve()) in err  # the message names the resolved path
    assert not (tmp_path / "results").exists()
    assert not (folder / "pwned").exists()  # the pickle's payload never ran


def test_weights_entry_picks_the_state_dict_of_a_training_checkpoint(trained, tmp_path):
    folder = tmp_path / "profiles"
    folder.mkdir()
    bad_files(folder, trained[1])
    text = profile(f'factory = "user_nets:small_conv", steps = 0, weights = "checkpoint.pt", '
                   f'weights_entry = "state_dict", {CERTIFY}')
    (folder / "user.toml").write_text(text)
    cells = check_inputs(parse_profile(text, "user"), argparse.Namespace(
        profile=str(folder / "user.toml"), data_root=None, download=False)).cells
    assert cells[0].defense_params["weights"] == str((folder / "checkpoint.pt").resolve())
    assert len(cells[0].defense_params["weights_sha256"]) == 64


def test_evaluation_needs_only_the_test_split(tmp_path, nets_folder, trained):
    """MNIST's test files alone are enough to evaluate a model given as weights; training needs the train files."""
    from dataset_files import write_mnist

    data = tmp_path / "data"
    write_mnist(data)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (data / "MNIST" / "raw" / name).unlink()
    folder = tmp_path / "profiles"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in trained[1].state_dict().items()}, str(folder / "mine.safetensors"))
    text = profile(f'factory = "user_nets:small_conv", weights = "mine.safetensors", steps = 0, {CERTIFY}')
    text = text.replace("[run]", '[run]\ndatasets = ["mnist"]')
    assert run(tmp_path, text, "--data-root", str(data), "--examples", "20") == 0
    frame = pd.read_csv(next((tmp_path / "results").glob("user-*/certified_accuracy.csv")))
    assert frame["n"].tolist() == [20] * len(THRESHOLDS)


def test_training_without_the_train_split_fails_before_anything_is_written(tmp_path, capsys):
    from dataset_files import write_mnist

    data = tmp_path / "data"
    write_mnist(data)
    (data / "MNIST" / "raw" / "train-labels-idx1-ubyte").unlink()
    text = ('[run]\ndatasets = ["mnist"]\nexamples = 20\nseed = 0\n'
            '[defenses.undefended]\nparams = { arch = "cnn_small", steps = 5 }\n')
    assert run(tmp_path, text, "--data-root", str(data)) == 2
    err = capsys.readouterr().err
    assert "(train split) not found" in err and "train-labels-idx1-ubyte" in err
    assert not (tmp_path / "results").exists()
