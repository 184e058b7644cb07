"""Seeded runs are reproducible, concurrent runs share one folder safely, and SIGKILLs anywhere lose nothing."""
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from bench.cli.commands import main

BASE = """
[run]
name = "NAME"
examples = 20
seed = 3
batch_size = 10
"""
PLAIN = """
[defenses.plain]
defense = "undefended"
params = { steps = STEPS, batch_size = 32 }
"""
NOISY = """
[defenses.noisy]
defense = "pixeldp"
[defenses.noisy.params]
L = 0.3
steps = STEPS
batch_size = 32
parseval_iters = 2
draws_certify = 40
draws_attack = 10
draws_predict = 5
"""
PGD = """
[attacks.pgd_linf]
against = "deterministic"
eps = [EPS]
params = { steps = 5 }
"""
EOT = """
[attacks.pgd_linf_eot]
against = "randomized"
eps = [0.1]
params = { steps = 3, draws = 4 }
"""


def profile_text(name: str, steps: int, eps: str, noisy: bool = True) -> str:
    text = BASE.replace("NAME", name) + PLAIN + (NOISY + EOT if noisy else "") + PGD.replace("EPS", eps)
    return text.replace("STEPS", str(steps))


def records_by_key(results: Path) -> dict[str, list[tuple]]:
    """{cell key: [(index, label, clean_pred, adv_pred, norm, radius, forward_passes)]} (no timings)."""
    conn = sqlite3.connect(results / "store.sqlite")
    rows = conn.execute("SELECT cell_key, idx, label, clean_pred, adv_pred, norm, radius, forward_passes "
                        "FROM records ORDER BY cell_key, idx").fetchall()
    conn.close()
    out: dict[str, list[tuple]] = {}
    for key, *values in rows:
        out.setdefault(key, []).append(tuple(values))
    return out


def model_tensors(results: Path) -> dict[str, dict]:
    return {p.name: load_file(str(p)) for p in sorted((results / "models").glob("*.safetensors"))}


def launch(profile: Path, results: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench", "run", str(profile), "--results", str(results),
                             "--device", "cpu", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def test_two_seeded_runs_give_identical_records_and_models(tmp_path, capsys):
    profile = tmp_path / "repro.toml"
    profile.write_text(profile_text("repro", 30, "0.1"))
    for folder in ("first", "second"):
        assert main(["run", str(profile), "--results", str(tmp_path / folder), "--quiet", "--device", "cpu"]) == 0
    first, second = records_by_key(tmp_path / "first"), records_by_key(tmp_path / "second")
    assert len(first) == 4 and first == second
    radii = [r[5] for key in first for r in first[key] if r[5] is not None]
    assert len(radii) == 40  # PixelDP's clean and EOT cells carry radii (drawn from seeded noise), equal twice
    a, b = model_tensors(tmp_path / "first"), model_tensors(tmp_path / "second")
    assert a.keys() == b.keys() and len(a) == 2
    assert all((a[name][t] == b[name][t]).all() for name in a for t in a[name])


def test_without_a_seed_the_os_seed_is_recorded(tmp_path, capsys):
    profile = tmp_path / "noseed.toml"
    profile.write_text(profile_text("noseed", 5, "0.1", noisy=False).replace("seed = 3\n", ""))
    assert main(["run", str(profile), "--results", str(tmp_path / "r"), "--quiet", "--device", "cpu",
                 "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    seed = int(out.split("seed ", 1)[1].split()[0])
    conn = sqlite3.connect(tmp_path / "r" / "store.sqlite")
    settings = conn.execute("SELECT settings FROM runs").fetchone()[0]
    assert f'"seed": {seed}' in settings and '"seed_source": "os"' in settings


@pytest.mark.slow
def test_three_overlapping_runs_at_once_compute_every_cell_once(tmp_path):
    shared, serial = tmp_path / "shared", tmp_path / "serial"
    profiles = []
    for name, eps in (("a", "0.05, 0.1"), ("b", "0.1, 0.2"), ("c", "0.05, 0.1, 0.2")):
        path = tmp_path / f"{name}.toml"
        path.write_text(profile_text(name, 40, eps))
        profiles.append(path)
    procs = [launch(p, shared) for p in profiles]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    folders = sorted(d.name for d in shared.iterdir() if d.is_dir() and d.name != "models")
    assert len(folders) == 3  # one run folder each, even when started in the same second

    union = launch(profiles[2], serial, "--quiet")
    assert union.wait(timeout=600) == 0
    together, alone = records_by_key(shared), records_by_key(serial)
    assert together == alone and len(alone) == 6  # plain: clean + 3 PGD; noisy: clean + 1 PGD-EOT
    assert all(len(rows) == 20 for rows in together.values())
    conn = sqlite3.connect(shared / "store.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    log = "".join(outputs)
    assert log.count("training plain on") == 1 and log.count("training noisy on") == 1  # each model trained once
    assert len(list((shared / "models").glob("*.safetensors"))) == 2
    assert model_tensors(shared).keys() == model_tensors(serial).keys()


@pytest.mark.slow
def test_sigkill_at_five_random_moments_ends_like_an_uninterrupted_run(tmp_path):
    profile = tmp_path / "fault.toml"
    profile.write_text(profile_text("fault", 400, "0.1, 0.2"))
    clean = tmp_path / "clean"
    began = time.monotonic()
    reference = launch(profile, clean, "--checkpoint-every", "0.25")
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    duration = time.monotonic() - began

    faulty = tmp_path / "faulty"
    rng = random.Random(7)
    resumed_training = False
    for _ in range(5):
        proc = launch(profile, faulty, "--checkpoint-every", "0.25")
        started = time.monotonic()
        lines = []
        for line in proc.stdout:  # the clock starts once the CLI has imported torch and begun the run
            lines.append(line)
            if line.startswith("run "):
                break
        delay = rng.uniform(0.3, max(0.6, duration - (time.monotonic() - started)) * 0.6)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
        resumed_training |= "resuming at step" in "".join(lines)
    final = launch(profile, faulty, "--checkpoint-every", "0.25")
    out, _ = final.communicate(timeout=600)
    assert final.returncode == 0, out
    resumed_training |= "resuming at step" in out
    assert resumed_training, "no kill landed during training"
    assert records_by_key(faulty) == records_by_key(clean)
    a, b = model_tensors(faulty), model_tensors(clean)
    assert a.keys() == b.keys() and all((a[n][t] == b[n][t]).all() for n in a for t in a[n])
    assert not list((faulty / "models").glob("*.ckpt"))  # checkpoints are dropped once a model is saved
