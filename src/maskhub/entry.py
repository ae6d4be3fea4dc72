"""The ``maskhub`` console script: imports the CLI (torch, zarr, duckdb: about a second)
inside a guard, so that Ctrl-C during start-up is one line too, not a traceback."""

from __future__ import annotations

import signal
import sys


def run() -> None:
    """Entry point of the ``maskhub`` command."""
    try:
        from maskhub.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted: nothing was done.\n")
        sys.exit(130)
    try:
        main()
    finally:
        # The command has finished and said so: a Ctrl-C during the interpreter's teardown
        # (a fraction of a second with torch loaded) must not kill the exit.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
