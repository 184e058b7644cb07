"""The built-in datasets, architectures, attacks and defenses: importing this module registers them, once per process.

The registries (bench.registry) import nothing they register. Entry points (the CLI, bench.api,
pixeldp_bench) and profile loading (bench.plugins, before any plugin) import this module.
"""
from __future__ import annotations

import attacks  # noqa: F401
import bench.archs  # noqa: F401
import bench.data  # noqa: F401
import defenses  # noqa: F401
