"""The `scope` command: a typer app whose commands live one group per module.

``common`` holds the app, shared options and helpers; ``info`` (info, saes, inspect),
``record`` (record, merge), ``query`` (feature, sql), ``steer`` (steer, sweep), ``evals`` (eval) and ``serve`` (app, serve) add
their commands to it when imported here. A new group (train, app, demo) is a module importing
from ``common``, listed below. Importing this package loads no model library: each command imports what it
needs when it runs, and library chatter is quieted only while a command runs.
"""

from __future__ import annotations

import sys

from scope.cli import (  # noqa: F401  (each adds its commands)
    attribute,
    evals,
    explain,
    info,
    query,
    record,
    serve,
    steer,
    train,
)
from scope.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    """Run the `scope` command with the process's arguments."""
    sys.exit(app())
