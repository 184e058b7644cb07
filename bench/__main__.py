"""`python -m bench` runs the command-line interface."""
from bench.cli.commands import main

raise SystemExit(main())
