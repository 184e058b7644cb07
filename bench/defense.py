"""`bench.core.defense` under the path plugins and CONTRIBUTING.md import: the very same module object."""
import sys

from bench.core import defense as _moved
from bench.core.defense import *  # noqa: F403 (the names, for type checkers)

sys.modules[__name__] = _moved
