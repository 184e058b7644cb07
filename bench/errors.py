"""`bench.core.errors` under the path plugins and CONTRIBUTING.md import: the very same module object."""
import sys

from bench.core import errors as _moved
from bench.core.errors import *  # noqa: F403 (the names, for type checkers)

sys.modules[__name__] = _moved
