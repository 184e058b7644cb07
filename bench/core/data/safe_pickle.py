"""Unpickling restricted to containers, strings and numpy arrays: the CIFAR batches need no more."""
from __future__ import annotations

import pickle
from typing import IO, Any

__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "load"]

# The globals a CIFAR python batch may reference (numpy array reconstruction, Python 2 byte strings).
ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # pickle protocol 5
    ("_codecs", "encode"), ("builtins", "bytes"), ("__builtin__", "bytes"),  # bytes written by Python 3
}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that refuses every global outside ALLOWED_GLOBALS, so a file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a dataset batch holds only dicts, lists, "
                                     "strings and numpy arrays")


def load(handle: IO[bytes]) -> Any:
    """Unpickle a (Python 2 or 3) dataset file with the restricted unpickler; strings decoded as latin-1."""
    return RestrictedUnpickler(handle, encoding="latin1").load()
