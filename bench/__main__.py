"""`python -m bench` runs the command-line interface."""
from bench.cli import main

raise SystemExit(main())
