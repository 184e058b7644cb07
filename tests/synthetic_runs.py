"""A fixed, hand-built run (cells, records, infos) for golden-file, plot and report tests; nothing is trained."""
from __future__ import annotations

import math
import random

from bench.execution.keys import cell_key
from bench.execution.store import Store
from bench.core.types import Cell, Record

N = 20
L_ATTACK = {"l2": [0.0, 0.5, 1.0], "linf": [0.0, 0.1, 0.3]}
THRESHOLDS = [0.0, 0.05, 0.1, 0.2]
SETTINGS = {"name": "synthetic", "batch_size": 10, "l_attack": L_ATTACK, "thresholds": THRESHOLDS}
ENVIRONMENT = {"package_version": "0.1.0", "git_commit": None, "python": "3.11", "torch": "2.x", "cuda": None,
               "device": "cpu", "device_name": "Test CPU (1 threads)", "platform": "test"}
# label -> (registry name, params, clean accuracy, robustness, certified, train s/step)
DEFENSES = {
    "undefended": ("undefended", {}, 0.95, 0.2, False, 0.010),
    "madry": ("madry", {"eps": 0.3}, 0.90, 0.7, False, 0.200),
    "pixeldp_L0.1": ("pixeldp", {"L": 0.1}, 0.90, 0.5, True, 0.011),
    "pixeldp_L0.3": ("pixeldp", {"L": 0.3, "certifier": "cohen"}, 0.80, 0.6, True, 0.011),
    "wong_kolter": ("wong_kolter", {"norm": "linf", "eps": 0.1}, 0.85, 0.6, True, 0.150),
}
# label -> (registry name, norm, eps list or None for a minimum-norm attack)
ATTACKS = {"pgd_linf": ("pgd", "linf", [0.1, 0.3]), "pgd_l2": ("pgd", "l2", [0.5]), "cw_l2": ("cw_l2", "l2", None)}


def _records(cell: Cell, rng: random.Random, clean_ok: list[bool], robust: float, certified: bool) -> list[Record]:
    records = []
    for i, ok in enumerate(clean_ok):
        index, label = 3 * i + 1, i % 10
        clean_pred = label if ok else (label + 1) % 10
        radius = round(rng.choice([0.0, 0.03, 0.07, 0.12, 0.25]), 2) if certified else None
        if cell.attack == "none":
            adv_pred, norm = clean_pred, 0.0
        elif cell.eps is not None:
            hold = ok and rng.random() < robust * (1 - cell.eps)
            adv_pred, norm = (label if hold else (label + 2) % 10), round(cell.eps * rng.random(), 3)
        else:
            found = rng.choice([0.2, 0.4, 0.7, 1.2, math.inf])
            norm = 0.0 if not ok else found
            adv_pred = label if norm == math.inf else (label + 3) % 10
        records.append(Record(index=index, label=label, clean_pred=clean_pred, adv_pred=adv_pred, norm=norm,
                              radius=radius, seconds=0.001 * (3 if certified else 1), forward_passes=
                              1 if cell.attack == "none" else (40 if cell.eps is not None else 900)))
    return records


def synthetic_run() -> list[tuple[Cell, list[Record], dict]]:
    """(cell, records, info) for 4 defenses x {clean, PGD L-inf (2 eps), PGD L2, CW L2 (minimum-norm)}."""
    rng = random.Random(7)  # random.Random's stream is stable across Python versions
    out = []
    for label, (name, params, clean_acc, robust, certified, step_s) in DEFENSES.items():
        common = dict(dataset="mnist5k", defense=name, defense_params=params, examples=N, seed=0, defense_label=label)
        defense_info = {"train_steps": 100, "train_seconds_per_step": step_s}
        clean_ok = [rng.random() < clean_acc for _ in range(N)]  # one clean prediction per example, in every cell
        clean = Cell(attack="none", **common)
        predict = {"1": 0.0002} | ({"10": 0.0005, "100": 0.003, "1000": 0.028} if name == "pixeldp" else {})
        out.append((clean, _records(clean, rng, clean_ok, robust, certified),
                    {"defense": defense_info, "overhead": {"predict_seconds_per_image": predict}}))
        for attack_label, (attack, norm, grid) in ATTACKS.items():
            for eps in grid or [None]:
                cell = Cell(attack=attack, norm=norm, eps=eps, attack_label=attack_label, **common)
                out.append((cell, _records(cell, rng, clean_ok, robust, certified), {"defense": defense_info}))
    return out


def cells_and_records() -> list[tuple[Cell, list[Record]]]:
    return [(cell, records) for cell, records, _ in synthetic_run()]


def store_run(store: Store, run_id: str, run: list[tuple[Cell, list[Record], dict]], profile: str = "synthetic",
              settings: dict | None = None, environment: dict | None = None, finished: int | None = None) -> str:
    """Write (cell, records, info) triples into a store as one run of `profile`; returns the run id.

    `finished`: only the first that many cells get results (a killed run); None: all of them.
    """
    keyed = [(cell_key(cell, {}), cell) for cell, _, _ in run]
    store.start_run(run_id, profile, settings or SETTINGS, environment or ENVIRONMENT, keyed)
    for (key, cell), (_, records, info) in list(zip(keyed, run, strict=True))[:finished]:
        store.write_cell(key, cell, records, info)
    return run_id


def fill_store(store: Store, run_id: str = "synthetic-run", finished: int | None = None) -> str:
    """Write the synthetic run into a store (run, cells, records, infos); returns the run id (`finished`: as
    in store_run)."""
    return store_run(store, run_id, synthetic_run(), finished=finished)
