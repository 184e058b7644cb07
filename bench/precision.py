"""`bench.core.precision` under the path plugins and CONTRIBUTING.md import: the very same module object."""
import sys

from bench.core import precision as _moved
from bench.core.precision import *  # noqa: F403 (the names, for type checkers)

sys.modules[__name__] = _moved
