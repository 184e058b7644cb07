"""PixelDP (Lecuyer et al., IEEE S&P 2019): noise layer, sensitivity control, Monte Carlo certificates."""
from defenses.pixeldp import defense  # noqa: F401  (registers "pixeldp")
