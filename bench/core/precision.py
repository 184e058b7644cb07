"""IEEE float32 arithmetic for code whose soundness needs it (convex bounds, PixelDP's stem and sensitivity).

On Ampere and later GPUs PyTorch may run float32 matmuls and cuDNN convolutions in TF32 (10-bit
mantissa). A bound computed that way can be off by ~1e-3 in the unsound direction, so certified
code runs inside `exact_float32()`. On CPUs the flags change nothing.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["exact_float32"]

# The backends whose float32 precision PyTorch's (new, per-backend) API controls.
# (typed Any: torch's stubs do not declare the per-backend precision attributes).
_cudnn: Any = torch.backends.cudnn
_BACKENDS: tuple[Any, ...] = (torch.backends.cuda.matmul, _cudnn.conv, _cudnn.rnn)


@contextmanager
def exact_float32() -> Iterator[None]:
    """Run the block with TF32 off for matmuls and cuDNN convolutions; the previous settings come back after.

    Uses only the per-backend `fp32_precision` API: mixing it with the legacy `allow_tf32` flags makes
    PyTorch refuse to read them, so the caller's setting is saved and restored through the same API.
    """
    previous = [backend.fp32_precision for backend in _BACKENDS]
    matmul_precision = torch.get_float32_matmul_precision()
    try:
        for backend in _BACKENDS:
            backend.fp32_precision = "ieee"
        # The legacy global setting is read by some matmul paths on its own; pin it too.
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
        for backend, value in zip(_BACKENDS, previous, strict=True):
            backend.fp32_precision = value
