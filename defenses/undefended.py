"""The undefended baseline: the architecture trained with plain cross-entropy."""
from __future__ import annotations

from bench.defense import Defense
from bench.registry import DEFENSES


@DEFENSES.register("undefended", randomized=False, certified=False)
class Undefended(Defense):
    """Standard training (cross-entropy, no noise, no adversarial examples)."""
