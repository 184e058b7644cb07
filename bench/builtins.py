"""The built-in datasets, architectures, attacks and defenses: importing this module registers them, once per process.

The registries (bench.core.registry) import nothing they register. Entry points (the CLI, bench.cli.session,
pixeldp_bench) and profile loading (bench.profile.plugins, before any plugin) import this module.
"""
from __future__ import annotations

import attacks  # noqa: F401
import bench.core.archs  # noqa: F401
import bench.core.data  # noqa: F401
import defenses  # noqa: F401
