"""A user's own model, imported from `module:function` and loaded from a weights file, evaluated as given."""
from __future__ import annotations

from typing import Any

from bench.core.data import DatasetSpec
from bench.core.registry import DEFENSES
from defenses.undefended import Undefended


# A user's model is evaluated as given: deterministic and uncertified. A model with its own noise or
# certificate is registered by its author (a plugin) with its own DefenseInfo.
@DEFENSES.register("user_model", family="user model", randomized=False, certified=False)
class UserModel(Undefended):
    """Your own classifier: `factory` (or a registered `arch`) builds it ([0,1] images -> logits), `weights` fills it.

    With the default `steps = 0` the model is evaluated as given (weights required); with
    steps > 0 it is trained (or fine-tuned from `weights`) with cross-entropy like the undefended
    baseline. Every defense takes the same `factory` / `arch` / `weights` parameters (bench.core.weights),
    and `input_mean` / `input_std` for a network trained on (x - mean) / std: it is fed that while
    budgets stay in pixels (bench.core.input_normalization). Use `wong_kolter` or `randomized_smoothing`
    with them to certify your model.
    """

    def __init__(self, spec: DatasetSpec, *, factory: str | None = None, arch: str | None = None, steps: int = 0,
                 **params: Any):
        if factory is None and arch is None:
            # Without either it would silently evaluate the dataset's default model, not the user's.
            raise ValueError("user_model needs factory = \"package.module:function\" (your network) or arch = "
                             "\"NAME\" (a registered architecture, see `pixeldp-bench list --models`)")
        super().__init__(spec, factory=factory, arch=arch, steps=steps, **params)
