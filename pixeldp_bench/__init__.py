"""pixeldp-bench's Python API: `run` a profile, `load_run` a stored run, read its tables as pandas DataFrames,
`evaluate` a model on a tensor batch, follow metrics across runs with `history`.

    import pixeldp_bench
    run = pixeldp_bench.run("smoke", seed=0)
    run.tables["accuracy"]

`run`, `evaluate`, `load_run`, `Run` and `history` are imported on first use: `import pixeldp_bench` alone loads
no torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bench.core.errors import UserError

if TYPE_CHECKING:
    from pixeldp_bench.api import run
    from pixeldp_bench.evaluate import evaluate
    from pixeldp_bench.runs import Run, load_run
    from pixeldp_bench.tracking import history

__all__ = ["Run", "UserError", "evaluate", "history", "load_run", "run"]

_LAZY = {"run": "pixeldp_bench.api", "evaluate": "pixeldp_bench.evaluate",
         "load_run": "pixeldp_bench.runs", "Run": "pixeldp_bench.runs", "history": "pixeldp_bench.tracking"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pixeldp_bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
