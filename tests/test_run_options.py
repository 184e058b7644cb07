"""`run`'s options are all checked before a run is registered: a refused option leaves no run and no run folder."""
import sqlite3

import pytest

from bench.cli.commands import main
from bench.execution.store import Store

TINY = """
[run]
examples = 10
seed = 0
[defenses.plain]
defense = "undefended"
params = { steps = 3 }
"""


@pytest.mark.parametrize("flag, value, message", [
    ("--checkpoint-every", "0", "--checkpoint-every must be a positive number of seconds, got 0"),
    ("--checkpoint-every", "-5", "--checkpoint-every must be a positive number of seconds, got -5"),
    ("--checkpoint-every", "nan", "--checkpoint-every must be a positive number of seconds, got nan"),
    ("--threads", "0", "--threads must be at least 1, got 0"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--loader-workers", "-1", "--loader-workers must be at least 0, got -1"),
])
def test_a_refused_option_registers_nothing(flag, value, message, tmp_path, capsys):
    profile = tmp_path / "tiny.toml"
    profile.write_text(TINY)
    results = tmp_path / "results"
    Store(results / "store.sqlite").close()  # an existing store: the refused run must not appear in it
    before = sorted(p.name for p in results.iterdir())
    assert main(["run", str(profile), "--results", str(results), "--quiet", flag, value]) == 2
    err = capsys.readouterr().err
    assert err == f"pixeldp-bench: error: {message}\n"
    assert sorted(p.name for p in results.iterdir()) == before  # no run folder
    conn = sqlite3.connect(results / "store.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    conn.close()


def test_a_refused_option_creates_no_results_folder(tmp_path, capsys):
    profile = tmp_path / "tiny.toml"
    profile.write_text(TINY)
    assert main(["run", str(profile), "--results", str(tmp_path / "results"), "--checkpoint-every", "0"]) == 2
    assert "--checkpoint-every" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
