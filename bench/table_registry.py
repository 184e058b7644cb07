"""`bench.reporting.table_registry` under the path plugins and CONTRIBUTING.md import: the very same module object."""
import sys

from bench.reporting import table_registry as _moved
from bench.reporting.table_registry import *  # noqa: F403 (the names, for type checkers)

sys.modules[__name__] = _moved
