"""Wong-Kolter convex-relaxation certified defense: bound propagation, models and the defense."""
from defenses.convex import bounds, defense, models  # noqa: F401
