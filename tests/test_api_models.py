"""`pixeldp_bench.run(models=...)`: in-memory networks evaluated like the same network from factory + weights files."""
import copy
import runpy
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import pixeldp_bench
from bench.profile.config import ConfigError
from bench.core.data import gather, load_split, select_examples
from bench.reporting.table_registry import tables

NETS = textwrap.dedent('''
    from torch import nn

    def mlp(hidden=16):
        return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
''')
NETS_MODULE = "api_nets"  # NETS as a module on sys.path: the conftest fixture nets_folder
CERTIFY = {"eps": 0.05, "bound": "crown_ibp", "bisection_steps": 4, "steps": 0}
ATTACKS = {"pgd_linf": {"eps": [0.05], "params": {"steps": 3, "random_start": False}}}


@pytest.fixture(scope="module")
def nets(nets_folder):
    """The folder of the module `api_nets` (on sys.path), and a network it builds, with weights of its own."""
    import api_nets

    torch.manual_seed(1)
    return nets_folder, api_nets.mlp()


def profile(params: dict, certify: bool = True) -> dict:
    defenses = {"mine": {"defense": "user_model", "params": params}}
    if certify:
        defenses["certified"] = {"defense": "wong_kolter", "params": params | CERTIFY}
    return {"run": {"datasets": ["mnist5k"], "examples": 12, "seed": 0}, "defenses": defenses, "attacks": ATTACKS}


def run(results: Path, prof: dict, **kwargs):
    return pixeldp_bench.run(prof, results=results, device="cpu", quiet=True, **kwargs)


@pytest.fixture(scope="module")
def memory_run(nets, tmp_path_factory):
    _, model = nets
    return run(tmp_path_factory.mktemp("results"), profile({"model": "net"}), models={"net": model})


def test_tables_are_the_csv_files(memory_run):
    for name, table in tables():
        path = memory_run.folder / f"{table.stem}.csv"
        if path.exists():
            assert memory_run.tables[name].to_csv(index=False, float_format="%.6g") == path.read_text(), name
    assert set(memory_run.records["defense_label"]) == {"mine", "certified"}
    assert (memory_run.records["radius"].dropna() > 0).any()  # the convex bounds certified something


def test_records_equal_the_same_network_from_files(nets, memory_run, tmp_path):
    folder, model = nets
    weights = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    files = run(tmp_path / "results", profile({"factory": "api_nets:mlp", "weights": str(weights), "steps": 0}))
    columns = [c for c in memory_run.records.columns if c != "seconds"]
    pd.testing.assert_frame_equal(files.records[columns], memory_run.records[columns])


def test_a_changed_weight_recomputes_and_a_copy_reuses(nets, tmp_path, capsys):
    _, model = nets
    prof = profile({"model": "net"}, certify=False)
    first = pixeldp_bench.run(prof, results=tmp_path, device="cpu", progress=False, models={"net": model})
    twin = copy.deepcopy(model)
    pixeldp_bench.run(prof, results=tmp_path, device="cpu", progress=False, models={"net": twin})
    assert "0 cell(s) computed, 2 reused" in capsys.readouterr().out
    with torch.no_grad():
        twin[1].weight[0, 0] += 1.0
    changed = pixeldp_bench.run(prof, results=tmp_path, device="cpu", progress=False, models={"net": twin})
    assert "2 cell(s) computed, 0 reused" in capsys.readouterr().out
    assert len(list((tmp_path / "models" / "memory").glob("*.safetensors"))) == 2
    assert not first.records["seconds"].equals(changed.records["seconds"])


def test_the_same_network_keys_the_same_cells_in_every_results_folder(nets, tmp_path):
    """Its code and weights hash key its cells and seed their draws, never the folder its weights are saved in."""
    _, model = nets
    prof = profile({"model": "net"}, certify=False)
    prof["attacks"] = {"pgd_linf": {"eps": [0.05], "params": {"steps": 3}}}  # random starts: seeded by the config
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[1].weight[0, 0] += 1.0
    runs = [run(tmp_path / folder, prof, models={"net": net}) for folder, net in (("a", model), ("b", model),
                                                                                   ("c", changed))]
    keys = [[key for key, _ in r.store.run_cells(r.run_id)] for r in runs]
    assert len(keys[0]) == 2 and keys[0] == keys[1] and not set(keys[0]) & set(keys[2])
    columns = [c for c in runs[0].records.columns if c != "seconds"]
    pd.testing.assert_frame_equal(runs[0].records[columns], runs[1].records[columns])


@pytest.mark.parametrize("params, models, message", [
    ({"model": "other"}, {"net": None}, "models['net'] is a NoneType, not a torch.nn.Module"),
    ({"model": "other"}, {}, "the profile uses model 'other', which models= does not hold"),
    ({"model": "other"}, None, "pass models={'other': your_module}"),
    ({"factory": "memory:other"}, None, "the profile uses model 'other', which models= does not hold"),
    ({"arch": "cnn_small", "steps": 0, "weights": None}, {"net": torch.nn.Linear(1, 1)}, "is used by no defense"),
])
def test_bad_models_are_one_config_error_line(params, models, message, tmp_path):
    params = {k: v for k, v in params.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        run(tmp_path, profile(params, certify=False), models=models)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not list(tmp_path.glob("profile-*"))  # refused before any run folder


def test_a_toml_profile_names_it_as_a_memory_factory(nets, memory_run, tmp_path):
    text = textwrap.dedent('''
        [run]
        datasets = ["mnist5k"]
        examples = 12
        seed = 0
        [defenses.mine]
        defense = "user_model"
        params = { factory = "memory:net" }
        [attacks.pgd_linf]
        eps = [0.05]
        params = { steps = 3, random_start = false }
    ''')
    (tmp_path / "mine.toml").write_text(text)
    routed = pixeldp_bench.run(tmp_path / "mine.toml", results=tmp_path / "results", device="cpu", quiet=True,
                               models={"net": nets[1]})
    expected = memory_run.records[memory_run.records["defense_label"] == "mine"].reset_index(drop=True)
    columns = [c for c in expected.columns if c not in ("seconds", "radius")]  # radius: None vs NaN, both absent
    pd.testing.assert_frame_equal(routed.records[columns], expected[columns])
    assert routed.records["radius"].isna().all() and expected["radius"].isna().all()


def test_the_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELDP_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["evaluate_a_model.py"])
    runpy.run_path(str(Path(__file__).parent.parent / "examples" / "evaluate_a_model.py"), run_name="__main__")
    assert list(tmp_path.glob("profile-*/accuracy_under_attack.csv"))


def test_evaluate_matches_the_profile_route(nets, tmp_path):
    _, model = nets
    prof = profile({"model": "net"}, certify=False)
    # Random starts: seeded by the configuration.
    prof["attacks"] = {"pgd_linf": {"eps": [0.05], "params": {"steps": 3}}}
    routed = run(tmp_path, prof, models={"net": model})
    test = load_split("mnist5k", "test")
    indices = select_examples(test, 12, seed=0)
    x, y = gather(test, indices)
    frame = pixeldp_bench.evaluate(model, x, y, attacks={"pgd_linf": {"steps": 3}}, eps=0.05, device="cpu",
                                   results=tmp_path)
    assert len(frame) == 2 * 12 and list(frame.columns) == list(routed.records.columns)
    assert frame["index"].tolist() == list(range(12)) * 2
    expected = routed.records.assign(index=frame["index"], defense_label=frame["defense_label"])
    columns = [c for c in frame.columns if c != "seconds"]
    pd.testing.assert_frame_equal(frame[columns], expected[columns])


@pytest.mark.parametrize("x, y, message", [
    (torch.rand(2, 784), torch.zeros(2, dtype=torch.long), "x must be a non-empty batch of images (N, C, H, W)"),
    (torch.full((2, 1, 28, 28), float("nan")), torch.zeros(2, dtype=torch.long), "x holds NaN"),
    (torch.rand(2, 1, 28, 28) * 255, torch.zeros(2, dtype=torch.long), "x must lie in [0, 1]"),
    (torch.rand(2, 1, 28, 28), torch.zeros(3, dtype=torch.long), "y must be integer labels of shape (2,)"),
    (torch.rand(2, 1, 28, 28), torch.zeros(2), "y must be integer labels"),
    (torch.rand(2, 1, 5, 5), torch.zeros(2, dtype=torch.long), "no registered dataset has images of shape"),
])
def test_evaluate_refuses_bad_inputs_in_one_line(nets, x, y, message, tmp_path):
    with pytest.raises(pixeldp_bench.UserError) as caught:
        pixeldp_bench.evaluate(nets[1], x, y, device="cpu", results=tmp_path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_code_digest_covers_the_class_source_and_the_structure():
    from pixeldp_bench.memory import model_code

    class Doubled(torch.nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.fc = torch.nn.Linear(784, width)

        def forward(self, x):
            return 2 * self.fc(x.flatten(1))

    class Tripled(Doubled):
        def forward(self, x):
            return 3 * self.fc(x.flatten(1))

    assert model_code(Doubled()) == model_code(copy.deepcopy(Doubled()))
    assert len({model_code(Doubled()), model_code(Doubled(width=5)), model_code(Tripled())}) == 3


def test_evaluate_checks_the_defense_like_the_run_route(nets, tmp_path):
    """A network the defense cannot use (no conv stem for PixelDP's noise): the run route's one line, no traceback."""
    x, y = torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ConfigError) as caught:
        pixeldp_bench.evaluate(nets[1], x, y, defense="pixeldp", defense_params={"steps": 0}, device="cpu",
                               results=tmp_path)
    assert "[defenses.model] on mnist5k: the model cannot be used" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_saving_weights_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """The model folder is made by the atomic writer too: ENOSPC there is the writer's one line, no raw OSError."""
    import errno

    from bench.core.atomic import OutputWriteError
    from pixeldp_bench.memory import save_weights

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "mkdir", full)
    with pytest.raises(OutputWriteError) as caught:
        save_weights(torch.nn.Linear(2, 2), tmp_path / "models" / "memory")
    assert "No space left on device" in str(caught.value) and "free disk space" in str(caught.value)
    assert "\n" not in str(caught.value) and not (tmp_path / "models").exists()
