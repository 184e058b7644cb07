"""Stable IDs of the sanity checks' warnings; docs/checks.md has one section per ID (when raised, what to do).

A warning stays a plain `str` (its text, which may be reworded) and carries its kind's ID in
`.check`, so reports can link a warning to its documentation however the wording changes.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec

__all__ = ["CheckWarning", "CHECK_IDS", "CHECKS_DOC", "raises", "tagged"]

CHECKS_DOC = "docs/checks.md"  # relative to the repository root; its section headings are the IDs

RISES_WITH_EPS = "accuracy-rises-with-eps"
UNDEFENDED_NOT_BROKEN = "undefended-not-broken"
UNBOUNDED_ATTACK_FAILS = "unbounded-attack-fails"
GRADIENT_MASKING = "gradient-masking"
SATURATED_SOFTMAX = "saturated-softmax"
RANDOMIZED_WITHOUT_EOT = "randomized-without-eot"
CERTIFIED_ABOVE_ATTACK = "certified-above-attack"
HUGE_EPS_SURVIVORS = "huge-eps-survivors"
GRADIENT_FREE_WINS = "gradient-free-wins"
WEAK_WORST_CASE = "weak-worst-case"
WEAK_WORST_CASE_CE_ONLY = "weak-worst-case-ce-only"
WEAK_WORST_CASE_EOT_DRAWS = "weak-worst-case-eot-draws"
WEAK_MINIMUM_NORM = "weak-minimum-norm"
INCOMPLETE_RUN = "incomplete-run"  # raised by the report itself (cells without results), not by a check

# Every ID, in docs/checks.md's order.
CHECK_IDS = (RISES_WITH_EPS, UNDEFENDED_NOT_BROKEN, UNBOUNDED_ATTACK_FAILS, GRADIENT_MASKING, SATURATED_SOFTMAX,
             RANDOMIZED_WITHOUT_EOT, CERTIFIED_ABOVE_ATTACK, HUGE_EPS_SURVIVORS, GRADIENT_FREE_WINS, WEAK_WORST_CASE,
             WEAK_WORST_CASE_CE_ONLY, WEAK_WORST_CASE_EOT_DRAWS, WEAK_MINIMUM_NORM, INCOMPLETE_RUN)

P = ParamSpec("P")


class CheckWarning(str):
    """One warning: the text (the str itself, as printed and written to checks.txt) and its kind's ID (`check`)."""

    check: str

    def __new__(cls, text: str, check: str) -> CheckWarning:
        warning = super().__new__(cls, text)
        warning.check = check
        return warning

    def __getnewargs__(self) -> tuple[str, str]:  # type: ignore[override]
        # pickle (Ray) rebuilds a str subclass from these: str's own would drop the ID
        return str(self), self.check


def tagged(check: str, texts: list[str]) -> list[CheckWarning]:
    """The warnings `texts`, each tagged with `check` (an ID above)."""
    return [CheckWarning(text, check) for text in texts]


def raises(check: str) -> Callable[[Callable[P, list[str]]], Callable[P, list[CheckWarning]]]:
    """Decorator for a check that raises one kind of warning: tags everything it returns with `check`."""
    def decorate(function: Callable[P, list[str]]) -> Callable[P, list[CheckWarning]]:
        @functools.wraps(function)
        def check_function(*args: P.args, **kwargs: P.kwargs) -> list[CheckWarning]:
            return tagged(check, function(*args, **kwargs))
        return check_function
    return decorate
