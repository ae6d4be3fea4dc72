"""Named steps of the commit protocol where a test can kill the process (SIGKILL, no handler
runs), to prove that recovery handles a crash at each of them.

``MASKHUB_TEST_KILL_AT=<step>`` makes the process kill itself when it reaches ``<step>``
(see :data:`STEPS`). Unset (always, outside the fault-injection tests), a crash point costs
one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "MASKHUB_TEST_KILL_AT"

#: Every step, in the order a registration (``register:``), a removal (``rm:``) or a metadata
#: edit (``edit:``) meets them.
STEPS = (
    "register:staged",          # the store is complete in tmp/; nothing else done
    "register:intent-written",  # the intent record exists, the row is inserted (uncommitted)
    "register:published",       # the store is renamed into masks/; not committed yet
    "register:committed",       # the row is committed; the intent is not yet removed
    "rm:intent-written",        # the intent exists, the rows deleted (uncommitted)
    "rm:tombstoned",            # the store is renamed to <id>.zarr.removing; not committed
    "rm:committed",             # the row deletion is committed; the tombstone is intact
    "rm:half-deleted",          # the tombstone lost its group metadata, arrays remain
    "edit:attributes-replaced",  # edit: the store's zarr.json is the new one; not committed
)


def crash_point(step: str) -> None:
    """Kill this process with SIGKILL if ``MASKHUB_TEST_KILL_AT`` names ``step``."""
    if os.environ.get(ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
