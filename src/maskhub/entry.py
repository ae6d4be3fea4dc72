"""The ``maskhub`` console script: imports the CLI (torch, zarr, duckdb: about a second)
inside a guard, so that Ctrl-C during start-up is one line too, not a traceback."""

from __future__ import annotations

import sys


def run() -> None:
    """Entry point of the ``maskhub`` command."""
    try:
        from maskhub.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted: nothing was done.\n")
        sys.exit(1)
    main()
