"""The progress callback every long operation takes."""

from __future__ import annotations

from collections.abc import Callable

#: ``progress(items_done, items_total, bytes_done, bytes_total, item_name)``, called after
#: each item (a tensor, mostly) in order.
ProgressFn = Callable[[int, int, int, int, str], None]
