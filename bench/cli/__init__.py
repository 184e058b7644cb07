"""The command line (`pixeldp-bench`), a thin shell over bench.cli.session and the public API."""
from bench.cli.commands import main

__all__ = ["main"]
