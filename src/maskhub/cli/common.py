"""Shared CLI pieces: options as decorators, output to stdout/stderr, progress bars."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import click

from maskhub.errors import UsageError
from maskhub.registry.api import Registry

if TYPE_CHECKING:
    from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])


class LazyConsole:
    """A ``rich`` console made on first use: ``maskhub --help`` and the commands that print
    no table never import rich (~40 ms of start-up)."""

    def __init__(self, **options: Any) -> None:
        """``options``: the keyword arguments of ``rich.console.Console``."""
        self._options = options
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """The real console."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


# Tables are not folded to 80 columns when stdout is a pipe or a file.
stdout = LazyConsole(soft_wrap=True, width=None if sys.stdout.isatty() else 240)
stderr = LazyConsole(stderr=True)


def home_option(f: F) -> F:
    """``--home DIR``: the maskhub home (default ``$MASKHUB_HOME`` or the user cache dir).
    The global ``maskhub --home DIR`` applies where the command's own is not given."""
    return click.option("--home", type=click.Path(file_okay=False), default=None,
                        envvar="MASKHUB_HOME", show_envvar=True,
                        help="maskhub home holding registry.duckdb and the mask stores.")(f)


def command_home(home: str | None) -> str | None:
    """The home a command works on: its own ``--home`` when given on the command line, else
    the global ``maskhub --home DIR`` when given, else ``$MASKHUB_HOME`` (or the default)."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.get_parameter_source("home") == ParameterSource.COMMANDLINE:
        return home
    root = ctx.find_root()
    if root is not ctx and root.get_parameter_source("home") == ParameterSource.COMMANDLINE:
        return root.params["home"]
    return home


def json_option(f: F) -> F:
    """``--json``: machine-readable output on stdout."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON instead of tables.")(f)


def ray_option(f: F) -> F:
    """``--ray [ADDRESS]``: run the work as Ray tasks (alone: ``ray.init()``, i.e. the cluster
    of ``RAY_ADDRESS`` or a new local Ray)."""
    return click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None,
                        metavar="[ADDRESS]",
                        help="Run as Ray tasks: on the cluster at ADDRESS, or alone for "
                             "ray.init() (RAY_ADDRESS, else a local Ray). Needs "
                             "pip install 'maskhub[ray]'.")(f)


def store_option(f: F) -> F:
    """``--store URL``: where new mask stores are written (``s3://bucket/prefix``)."""
    return click.option("--store", default=None, envvar="MASKHUB_STORE", show_envvar=True,
                        metavar="URL",
                        help="Write the mask store under this URL (s3://bucket/prefix) instead "
                             "of HOME/masks; the index stays local. Needs "
                             "pip install 'maskhub[s3]'.")(f)


def registry(home: str | None, store: str | None = None, *, reading: bool = False) -> Registry:
    """Open the registry of ``--home`` (the command's, else the global one, else
    ``$MASKHUB_HOME``); new stores under ``--store`` when given. ``reading``: a command
    that only reads (``ls``, ``show``, ``sql``) creates no home: a ``--home`` or
    ``$MASKHUB_HOME`` that does not exist is one error line (the default home is created)."""
    chosen = command_home(home)
    given = chosen or os.environ.get("MASKHUB_HOME")
    if reading and given and "://" not in str(given):
        from maskhub.config import home_dir

        path = home_dir(chosen)
        blocked = any(p.exists() and not p.is_dir() for p in path.parents)  # said by Home
        if not path.exists() and not blocked:
            raise UsageError(f"no registry at {path}: no such directory (`maskhub diff` or "
                             "`maskhub demo` creates one)")
    return Registry(chosen, store=store)


def _plain(v: Any) -> Any:
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def echo_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout."""
    click.echo(json.dumps(_plain(obj), indent=2, default=str))


def fmt(v: Any) -> str:
    """A cell for a human table."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ",".join(fmt(x) for x in v)
    if isinstance(v, datetime):
        return v.isoformat(sep=" ", timespec="seconds")
    return str(v)


def pct(fraction: float | None) -> str:
    """A fraction in [0, 1] printed as a percentage."""
    return "" if fraction is None else f"{100 * fraction:.2f}%"


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None,
                formatters: dict[str, Callable[[Any], str]] | None = None) -> None:
    """Print a rich table on stdout."""
    from rich.table import Table

    formatters = formatters or {}
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(formatters.get(c, fmt)(v) for c, v in zip(columns, r, strict=True)))
    stdout.print(table)


def print_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print CSV on stdout."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")  # not CRLF: shell substitution keeps \r
    w.writerow(columns)
    for r in rows:
        w.writerow([fmt(v) for v in r])
    sys.stdout.write(buf.getvalue())


def warn(message: str) -> None:
    """A warning line on stderr."""
    stderr.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


def _stderr_is_tty() -> bool:
    """Whether stderr is a terminal (not merely a stream rich was told to colour)."""
    try:
        return os.isatty(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # a notebook's or test runner's stream
        return False


@contextmanager
def byte_progress(description: str) -> Iterator[Callable[[int, int, int, int, str], None]]:
    """A progress bar on stderr fed by ``(done, total, bytes_done, bytes_total, name)``;
    nothing (not even rich's import) until the first update: an answer from the cache draws
    no bar."""
    state: dict[str, Any] = {}

    def update(done: int, total: int, bytes_done: int, bytes_total: int, name: str) -> None:
        if "progress" not in state:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(),
                # a real terminal only: rich takes FORCE_COLOR (set by ipykernel) for one,
                # and a notebook would capture the live bar's escape codes
                console=stderr.console, transient=True, disable=not _stderr_is_tty(),
            )
            progress.start()
            state["progress"] = progress
            state["task"] = progress.add_task(description, total=bytes_total)
        state["progress"].update(state["task"], completed=bytes_done,
                                 description=f"{description} {done}/{total} tensors")

    try:
        yield update
    finally:
        if "progress" in state:
            state["progress"].stop()


# -- issue 26: shell completion of mask names --------------------------------------------

def complete_masks(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Mask names starting with ``incomplete``, for click's shell completion (the home of
    ``--home``/``$MASKHUB_HOME``; nothing when there is no registry there yet)."""
    from click.core import ParameterSource
    from click.shell_completion import CompletionItem

    from maskhub.config import home_dir

    root = ctx.find_root()
    home = ctx.params.get("home")  # the command's own, or $MASKHUB_HOME
    if ctx.get_parameter_source("home") != ParameterSource.COMMANDLINE and \
            root is not ctx and root.params.get("home"):
        home = root.params["home"]  # `maskhub --home DIR cmd`
    path = home_dir(home)
    if not (path / "registry.duckdb").is_file():
        return []
    try:
        names = [r["name"] for r in Registry(home).ls()]
    except Exception:  # completion must never print a traceback into the shell
        return []
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]
