"""A run killed with SIGKILL mid-way resumes to exactly one record set per cell."""
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

PROFILE = """
[run]
examples = 30
seed = 0
batch_size = 10
[defenses.plain]
defense = "undefended"
params = { steps = 40, batch_size = 32 }
[attacks.pgd_linf]
eps = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
params = { steps = 30 }
"""


def launch(profile, results):
    return subprocess.Popen([sys.executable, "-m", "bench", "run", str(profile), "--results", str(results)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
    profile = tmp_path / "resume.toml"
    profile.write_text(PROFILE)
    results = tmp_path / "results"
    proc = launch(profile, results)
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until a few cells are stored, then kill mid-cell
        if line.startswith("[4/7]") or time.time() > deadline:
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(results / "store.sqlite")
    partial = conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    conn.close()
    assert 1 <= partial < 7

    again = launch(profile, results)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert f"{7 - partial} cell(s) computed, {partial} reused" in out

    conn = sqlite3.connect(results / "store.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 7
    per_cell = conn.execute("SELECT cell_key, COUNT(*) FROM records GROUP BY cell_key").fetchall()
    assert len(per_cell) == 7 and {n for _, n in per_cell} == {30}
    assert conn.execute("SELECT COUNT(*) FROM (SELECT cell_key, idx FROM records GROUP BY cell_key, idx "
                        "HAVING COUNT(*) > 1)").fetchone()[0] == 0
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
