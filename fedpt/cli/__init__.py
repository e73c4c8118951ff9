"""The `fedpt` command line: `app.py` the app and its entry point; one module per group of commands."""

from fedpt.cli import decode, federate, models  # noqa: F401  (each registers its commands on the app)
from fedpt.cli.app import app, main

__all__ = ["app", "main"]
