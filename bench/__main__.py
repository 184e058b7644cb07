"""`python -m bench` runs the command-line interface."""
from bench.cli.main import main

raise SystemExit(main())
