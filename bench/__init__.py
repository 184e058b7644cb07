"""pixeldp-bench: an adversarial-robustness benchmark harness reproducing PixelDP (Lecuyer et al. 2019)."""
__version__ = "0.1.0"
