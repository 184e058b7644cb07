"""The `paper` and `mnist` profiles: paper hyperparameters, and the whole grid runs on tiny real-format files."""
from __future__ import annotations

import tomllib
from importlib import resources

import pytest
from dataset_files import write_all_tiny, write_inception_weights

from bench.cli.commands import STORE_NAME, main
from bench.profile.config import ConfigError, load_profile, parse_profile
from bench.core.registry import ATTACKS, DEFENSES, MODELS
from bench.execution.store import Store


def _raw(name: str) -> dict:
    return tomllib.loads((resources.files("bench.profile") / "shipped" / f"{name}.toml").read_text())


def _unregistered(raw: dict) -> list[str]:
    """Defense, attack and architecture names a profile uses that nobody has registered."""
    missing = []
    for label, entry in raw.get("defenses", {}).items():
        missing += [entry.get("defense", label)] if entry.get("defense", label) not in DEFENSES else []
        for params in [entry.get("params", {})] + list(entry.get("dataset_params", {}).values()):
            missing += [params["arch"]] if "arch" in params and params["arch"] not in MODELS else []
    for label, entry in raw.get("attacks", {}).items():
        missing += [entry.get("attack", label)] if entry.get("attack", label) not in ATTACKS else []
    return missing


def _assert_registered(name: str) -> None:
    """A shipped profile naming an unregistered (e.g. renamed) defense, attack or architecture is a failure."""
    missing = _unregistered(_raw(name))
    assert not missing, f"profile {name!r} uses names nobody registers: {', '.join(sorted(set(missing)))}"


@pytest.mark.parametrize("name", ["mnist", "paper"])
def test_profile_resolves_with_paper_hyperparameters(name):
    _assert_registered(name)
    profile = load_profile(name)
    clean = {(c.dataset, c.defense_label): c.defense_params for c in profile.cells if c.attack == "none"}
    pixeldp = clean[("mnist", "pixeldp" if name == "paper" else "pixeldp_L0.1")]
    assert pixeldp["arch"] == "mnist_cnn" and pixeldp["steps"] == 40000 and pixeldp["milestones"] == [30000]
    assert pixeldp["L"] == 0.1 and pixeldp["draws_certify"] == 2000 and pixeldp["parseval_iters"] == 10
    madry = clean[("mnist", "madry")]
    assert madry["eps"] == 0.3 and madry["attack_steps"] == 40
    assert madry["steps"] == 100000 and madry["batch_size"] == 50
    if name == "paper":
        assert {c.dataset for c in profile.cells} == {"mnist", "svhn", "cifar10", "cifar100", "imagenet"}
        assert clean[("cifar10", "pixeldp")]["arch"] == "wide_resnet"
        assert clean[("cifar100", "undefended")]["milestones"] == [40000, 50000, 60000]
        assert clean[("imagenet", "pixeldp")]["arch"] == "inception_v3_autoencoder"
        assert clean[("imagenet", "pixeldp")]["draws_certify"] == 100
        assert clean[("imagenet", "undefended")] | {} == {**clean[("imagenet", "undefended")], "steps": 0}
        pgd = {(c.dataset, c.eps) for c in profile.cells if c.attack == "pgd_linf"}
        assert pgd == {("mnist", 0.1), ("mnist", 0.2), ("mnist", 0.3), ("cifar10", 0.01), ("cifar10", 0.03),
                       ("cifar10", 0.06)}


def test_caps_shrink_steps_and_draws_everywhere():
    _assert_registered("paper")
    profile = load_profile("paper", max_steps=1, max_draws=2, examples=4)
    for cell in profile.cells:
        for params in (cell.defense_params, cell.attack_params):
            for key, value in params.items():
                if key == "steps" or key.endswith("_steps"):
                    assert value <= 1, (key, value)
                if key == "draws" or key.startswith("draws_"):
                    assert value is None or value <= 2, (key, value)  # None: follow `draws` (capped)
    with pytest.raises(ConfigError, match="max-draws"):
        load_profile("paper", max_draws=0)


def test_dataset_params_and_eps_tables_are_validated():
    text = ('[run]\ndatasets = ["mnist5k"]\n[defenses.undefended]\nparams = { steps = 5 }\n'
            '[defenses.undefended.dataset_params]\nmnist5k = { steps = 7 }\n'
            '[attacks.pgd_linf]\neps = { mnist5k = [0.1, 0.2] }\n')
    profile = parse_profile(text, "t")
    assert [c.defense_params["steps"] for c in profile.cells] == [7, 7, 7]
    assert [c.eps for c in profile.cells if c.attack == "pgd_linf"] == [0.1, 0.2]
    with pytest.raises(KeyError, match="unknown dataset 'nope'"):
        parse_profile(text.replace("mnist5k = { steps", "nope = { steps"), "t")


# The grid in three parts that pytest-xdist can run side by side (the whole took 8 min on one worker);
# together they cover every dataset, model, defense and attack of the paper profile.
PAPER_PARTS = {
    ("mnist", "svhn"): {("mnist", "mnist_cnn"), ("mnist", "madry_mnist_cnn"), ("svhn", "wide_resnet")},
    ("cifar10", "cifar100"): {("cifar10", "wide_resnet"), ("cifar100", "wide_resnet")},
    ("imagenet",): {("imagenet", "inception_v3"), ("imagenet", "inception_v3_autoencoder")},
}


def test_the_parts_cover_the_whole_paper_grid():
    whole = load_profile("paper", max_steps=1, max_draws=2, examples=1).cells
    parts = [load_profile("paper", max_steps=1, max_draws=2, examples=1, only_datasets=list(part)).cells
             for part in PAPER_PARTS]
    assert sorted(map(repr, whole)) == sorted(repr(cell) for part in parts for cell in part)


@pytest.mark.slow
@pytest.mark.parametrize("part", list(PAPER_PARTS), ids="+".join)
def test_paper_grid_runs_end_to_end_on_tiny_real_format_files(part, tmp_path, monkeypatch):
    _assert_registered("paper")
    write_all_tiny(tmp_path / "data")
    # Stand-in "pretrained" Inception-v3 weights, found through $PIXELDP_BENCH_WEIGHTS.
    write_inception_weights(tmp_path / "weights")
    monkeypatch.setenv("PIXELDP_BENCH_WEIGHTS", str(tmp_path / "weights"))
    results = tmp_path / "results"
    code = main(["run", "paper", "--data-root", str(tmp_path / "data"), "--results", str(results),
                 "--max-steps", "1", "--max-draws", "2", "--examples", "1", "--quiet", "--device", "cpu",
                 "--datasets", *part])
    assert code == 0
    store = Store(results / STORE_NAME)
    (run_id,) = store.runs()
    cells = store.run_cells(run_id)
    expected = load_profile("paper", max_steps=1, max_draws=2, examples=1, only_datasets=list(part)).cells
    assert len(cells) == len(expected)
    datasets_models = set()
    for key, cell in cells:
        assert store.is_done(key), cell
        assert store.count_records(key) == 1, cell
        datasets_models.add((cell.dataset, cell.defense_params.get("arch")))
    assert PAPER_PARTS[part] <= datasets_models and {d for d, _ in datasets_models} == set(part)
    store.close()


QUICK = ("pixeldp-bench run paper --datasets mnist --max-steps 1 --max-draws 10 --examples 4"
         " --data-root ~/data --download")


@pytest.mark.slow
def test_the_readmes_quick_paper_command_runs_with_mnist_alone(tmp_path):
    """Issue 27: `run paper --max-steps 1 --examples 4` needed all five datasets; --datasets runs what a user has."""
    from bench.core.data import REPO_ROOT
    from dataset_files import write_mnist

    assert QUICK in (REPO_ROOT / "README.md").read_text()
    write_mnist(tmp_path / "data")
    args = QUICK.split()[1:]
    args[args.index("~/data")] = str(tmp_path / "data")
    args.remove("--download")  # the test has no network; the tiny files stand in for the downloaded ones
    results = tmp_path / "results"
    assert main(args + ["--results", str(results), "--quiet", "--device", "cpu"]) == 0
    store = Store(results / STORE_NAME)
    (run_id,) = store.runs()
    cells = store.run_cells(run_id)
    whole = load_profile("paper", max_steps=1, max_draws=10, examples=4).cells
    assert {c.dataset for _, c in cells} == {"mnist"}
    assert len(cells) == sum(c.dataset == "mnist" for c in whole) > 0
    assert all(store.is_done(key) and store.count_records(key) == 4 for key, _ in cells)
    store.close()


def test_datasets_outside_the_profile_are_one_line(capsys):
    assert main(["run", "paper", "--datasets", "mnist", "cifar7", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--datasets cifar7: not in profile 'paper'" in err
