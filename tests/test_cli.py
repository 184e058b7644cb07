"""The CLI end to end on a tiny profile: tables, reuse of finished cells, and one-line errors."""
import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.cli.commands import build_parser, main
from bench.execution.store import Store

TINY = """
[run]
examples = 20
seed = 0
batch_size = 10
[defenses.plain]
defense = "undefended"
params = { steps = 60, batch_size = 32 }
[attacks.pgd_linf]
eps = [0.0, 0.3]
params = { steps = 5 }
"""


@pytest.fixture
def tiny_profile(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def run_cli(*args) -> int:
    return main(list(map(str, args)))


def test_run_writes_tables_and_reuses_cells(tiny_profile, tmp_path, capsys):
    results = tmp_path / "results"
    assert run_cli("run", tiny_profile, "--results", results, "--quiet") == 0
    first = capsys.readouterr().out
    assert "3 cell(s) computed, 0 reused" in first and "Accuracy under attack" in first
    run_dirs = [p for p in results.iterdir() if p.is_dir() and p.name.startswith("tiny-")]
    assert len(run_dirs) == 1
    frame = pd.read_csv(run_dirs[0] / "accuracy_under_attack.csv")
    clean = frame[frame.attack == "clean"].iloc[0]
    at_zero = frame[(frame.attack == "pgd_linf") & (frame.eps == 0.0)].iloc[0]
    at_big = frame[(frame.attack == "pgd_linf") & (frame.eps == 0.3)].iloc[0]
    assert clean.n == 20 and at_zero.correct == clean.correct  # eps = 0 changes nothing
    assert at_big.accuracy < clean.accuracy
    assert clean.ci_low <= clean.accuracy <= clean.ci_high
    assert (run_dirs[0] / "accuracy_under_attack.md").read_text().count("|") > 10

    assert run_cli("run", tiny_profile, "--results", results, "--quiet") == 0
    assert "0 cell(s) computed, 3 reused" in capsys.readouterr().out
    assert run_cli("report", run_dirs[0]) == 0
    assert "plain" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["run", "smok"], "unknown profile 'smok'"),
    (["report", "no-such-run", "--results", "{results}"], "no run 'no-such-run'"),
])
def test_one_line_errors(args, message, tmp_path, capsys, tiny_profile):
    results = tmp_path / "results"
    Store(results / "store.sqlite").close()
    code = run_cli(*[a.format(results=results) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("old, new, message", [
    ('defense = "undefended"', 'defense = "nope"', "unknown defense 'nope'"),
    ("[attacks.pgd_linf]", '[attacks.pgd_linf]\nattack = "nope"', "unknown attack 'nope'"),
    ("examples = 20", 'examples = 20\ndatasets = ["nope"]', "unknown dataset 'nope'"),
    ("batch_size = 10", "batch_size = 10\nbogus = 1", "unknown key 'bogus'"),
])
def test_bad_profiles_exit_nonzero(old, new, message, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(TINY.replace(old, new))
    assert run_cli("run", path, "--results", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unreadable_store_is_reported_and_untouched(tiny_profile, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    junk = b"this is not an sqlite database\n" * 100
    (results / "store.sqlite").write_bytes(junk)
    assert run_cli("run", tiny_profile, "--results", results, "--quiet") == 2
    err = capsys.readouterr().err
    assert "unreadable" in err and str(results / "store.sqlite") in err and err.count("\n") == 1
    assert (results / "store.sqlite").read_bytes() == junk


def test_console_script_and_module_entry_points(tmp_path):
    script = str(Path(sys.executable).parent / "pixeldp-bench")
    for command in ([script, "list"], [sys.executable, "-m", "bench", "list"]):
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "undefended" in out.stdout and "pgd_linf" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "bench", "run", "smok"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown profile" in bad.stderr


# What each subcommand's --help must name (the README documents these; a renamed option fails here).
HELP = {
    None: ["run", "list", "report", "compare", "baseline"],
    "run": ["profile", "--examples", "--max-steps", "--max-draws", "--seed", "--results", "--data-root", "--download",
            "--device", "--batch-size", "--quiet", "--dry-run", "--checkpoint-every", "--threads", "--weights-root"],
    "list": ["--models", "--zoo", "--weights-root"],
    "report": ["run", "--results", "--robust-thresholds"],
    "compare": ["base", "new", "--results", "--tolerance", "--alpha", "--correction", "--robust-thresholds", "--all",
                "--out"],
    "baseline": ["run", "--results", "--out"],
    "estimate": ["profile", "--device-flops", "--examples", "--max-steps", "--max-draws", "--seed", "--threads"],
    "store": ["check", "recover"],
    "history": ["RESULTS", "--results", "--metric", "--profile", "--last", "--tolerance", "--alpha", "--out"],
    "metrics": ["diff"],
}


def test_help_everywhere(capsys):
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    subcommands = subparsers.choices
    assert set(subcommands) == set(HELP) - {None}  # every subcommand's help is checked below
    for command, words in HELP.items():
        with pytest.raises(SystemExit) as info:
            main(([command] if command else []) + ["--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: pixeldp-bench" + (f" {command}" if command else ""))
        missing = [w for w in words if w not in text]
        assert not missing, f"{command or 'pixeldp-bench'} --help does not name {missing}"
        if command:  # and every option the subcommand accepts appears in its help
            options = {o for a in subcommands[command]._actions for o in a.option_strings}
            assert options <= set(text.replace(",", " ").split())


def test_an_attack_whose_output_check_fails_is_one_line(tmp_path, capsys):
    """A (plugin) attack the template catches leaving its ball: exit 2, one line naming it; earlier cells are kept."""
    from attacks.template import register_attack
    from bench.core.registry import ATTACKS

    def overshoot(model, x, y, *, threat, generator=None):
        return (x + 2 * threat.eps).clamp(0, 1)  # claims to project, does not

    register_attack("overshoot_cli", overshoot, norm="linf", projected=True)
    try:
        profile = tmp_path / "liar.toml"
        profile.write_text(TINY.replace("[attacks.pgd_linf]", "[attacks.overshoot_cli]").replace(
            "eps = [0.0, 0.3]\nparams = { steps = 5 }", "eps = [0.1]"))
        results = tmp_path / "results"
        assert run_cli("run", profile, "--results", results, "--quiet") == 2
        err = capsys.readouterr().err.strip()
        assert "overshoot_cli" in err and "outside the linf ball" in err and len(err.splitlines()) == 1
        assert len(Store(results / "store.sqlite", readonly=True).all_cells()) == 1  # the clean cell is kept
    finally:
        ATTACKS.unregister("overshoot_cli")


def test_the_runner_checks_what_an_attack_returns_itself(tmp_path, capsys, monkeypatch):
    """An attack function the template never wrapped (swapped into the registry) returning NaN: the runner's
    check (the template's own) stops the run with one line naming it; the clean cell is kept."""
    from bench.registry import ATTACKS

    def diverged(model, x, y, *, threat, steps: int = 5, generator=None):
        return torch.full_like(x, float("nan"))

    monkeypatch.setitem(ATTACKS._objects, "pgd_linf", diverged)
    profile = tmp_path / "nan.toml"
    profile.write_text(TINY)
    results = tmp_path / "results"
    assert run_cli("run", profile, "--results", results, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert "attack 'pgd_linf' returned 10 example(s) with NaN or inf pixels" in err and len(err.splitlines()) == 1
    assert len(Store(results / "store.sqlite", readonly=True).all_cells()) == 1


def test_list_into_a_closed_pipe_is_quiet():
    """`pixeldp-bench list | head -1`: no BrokenPipeError traceback."""
    done = subprocess.run(f"{sys.executable} -m bench list | head -1", shell=True, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "datasets:" and "Traceback" not in done.stderr


def test_progress_bars_stay_out_of_logs(tiny_profile, tmp_path):
    """Issue 27: with stderr redirected to a file (not a terminal) no progress bar is written there."""
    log = tmp_path / "run.log"
    with log.open("w") as handle:
        done = subprocess.run([sys.executable, "-m", "bench", "run", str(tiny_profile), "--results",
                               str(tmp_path / "results"), "--device", "cpu"], stdout=handle, stderr=subprocess.STDOUT,
                              cwd=Path(__file__).parents[1])
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    assert "\r" not in text and "it/s" not in text and "s/it" not in text
    assert "3 cell(s) computed" in text  # the per-cell lines and the summary still reach the log
