"""Benchmarks run only when asked for (`tox -e bench`: --benchmark-enable -p no:xdist).

Their timing ratios mean nothing under the parallel, --benchmark-disable unit-test run.
"""
import pytest


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_enable", False):
        return
    skip = pytest.mark.skip(reason="benchmarks run with `tox -e bench` (--benchmark-enable -p no:xdist)")
    for item in items:
        if "benchmarks" in item.path.parts:
            item.add_marker(skip)
