"""Shared CLI pieces: options as decorators, output to stdout/stderr, progress bars."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import click

from maskhub.cli.text import cell, styled, table_lines, visible
from maskhub.errors import UsageError
from maskhub.registry.api import Registry

if TYPE_CHECKING:
    from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])


class LazyConsole:
    """A ``rich`` console made on first use, for the progress bars: tables and lines are
    printed without rich (:func:`print_table`, :func:`say`), so a command that draws no bar
    never imports it (~40 ms of start-up)."""

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


# Tables are not folded to 80 columns when stdout is a pipe or a file. Data never goes
# through these consoles (they read markup): print it with print_table/say/echo.
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


def _exact_decimal(v: Decimal) -> int | float | str:
    """A DECIMAL for JSON: an int or a float where that is the same number, else its digits
    as a string (never rounded)."""
    if v == v.to_integral_value():
        return int(v)
    f = float(v)
    return f if math.isfinite(f) and Decimal(repr(f)) == v else str(v)


def _plain(v: Any) -> Any:
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, Decimal):
        return _exact_decimal(v)
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
    """Print ``obj`` as JSON on stdout: strings exact (JSON escapes their control
    characters), floats as Python's shortest exact repr, DECIMALs unrounded."""
    click.echo(json.dumps(_plain(obj), indent=2, default=str))


def fmt(v: Any) -> str:
    """A cell for a human table (before :func:`maskhub.cli.text.cell` makes it safe)."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ",".join(fmt(x) for x in v)
    if isinstance(v, datetime):
        return v.isoformat(sep=" ", timespec="seconds")
    return str(v)


def csv_value(v: Any) -> str:
    """A CSV field, exact: floats as their shortest repr that reads back to the same
    double, DECIMALs with all their digits, timestamps with their microseconds, lists and
    structs as JSON; strings as they are (the csv module quotes them)."""
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(_plain(v), default=str)
    return str(v)


def pct(fraction: float | None) -> str:
    """A fraction in [0, 1] printed as a percentage."""
    return "" if fraction is None else f"{100 * fraction:.2f}%"


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None,
                formatters: dict[str, Callable[[Any], str]] | None = None) -> None:
    """Print a table on stdout, every header and cell verbatim and harmless (control
    characters escaped and long values cut by :func:`maskhub.cli.text.cell`; no markup), at
    a cost proportional to the cells shown (:func:`maskhub.cli.text.table_lines`). On a
    terminal the table is fitted to its width, long cells folded."""
    import shutil

    formatters = formatters or {}
    cells = [[cell(formatters.get(c, fmt)(v)) for c, v in zip(columns, r, strict=True)]
             for r in rows]
    tty = styled(sys.stdout)
    lines = table_lines([cell(c) for c in columns], cells,
                        title=visible(title) if title else None,
                        max_width=shutil.get_terminal_size().columns if sys.stdout.isatty()
                        else None, bold=tty)
    click.echo("\n".join(lines))


def print_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print CSV on stdout, values exact (see :func:`csv_value`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")  # not CRLF: shell substitution keeps \r
    w.writerow(columns)
    for r in rows:
        w.writerow([csv_value(v) for v in r])
    sys.stdout.write(buf.getvalue())


Part = str | tuple[str, str]

#: ANSI codes of the styles :func:`say` knows.
_STYLES = {"bold": "1", "yellow": "33", "red": "31", "green": "32"}


def line_of(*parts: Part, err: bool = False) -> str:
    """One line made of ``parts`` (plain strings, or ``(text, style)`` pairs such as
    ``(name, "bold")``), each shown verbatim and harmless (:func:`maskhub.cli.text.visible`):
    no markup, no emoji codes, no terminal escapes but the style's own (only when the line
    goes to a terminal: stdout, or stderr with ``err``)."""
    tty = styled(sys.stderr if err else sys.stdout)
    out = []
    for part in parts:
        if isinstance(part, tuple):
            text = visible(part[0])
            out.append(f"\x1b[{_STYLES[part[1]]}m{text}\x1b[0m" if tty and text else text)
        else:
            out.append(visible(part))
    return "".join(out)


def say(*parts: Part, err: bool = False) -> None:
    """Print the line :func:`line_of` makes of ``parts``, on stdout (stderr with ``err``)."""
    click.echo(line_of(*parts, err=err), err=err)


def echo(line: str, err: bool = False) -> None:
    """``click.echo`` of a line holding data, made harmless (:func:`maskhub.cli.text.visible`)."""
    click.echo(visible(line), err=err)


def warn(message: str) -> None:
    """A warning line on stderr (the message verbatim and harmless)."""
    say(("warning:", "yellow"), " " + message, err=True)


#: Seconds of work before a progress bar is drawn.
BAR_DELAY = 0.3


def _stderr_is_terminal() -> bool:
    """Whether rich would draw on stderr (a terminal, or FORCE_TERMINAL / TTY_COMPATIBLE set),
    decided without importing rich."""
    import os

    for var in ("FORCE_TERMINAL", "TTY_COMPATIBLE"):
        if os.environ.get(var, "") not in ("", "0"):
            return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


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
    no bar. Nothing either when stderr is not a terminal (rich would draw a disabled bar), or
    before :data:`BAR_DELAY` seconds have passed: a small job finishes without a bar, and
    without paying rich's import."""
    state: dict[str, Any] = {}
    started = time.monotonic()
    if not _stderr_is_terminal():
        yield lambda *_: None
        return

    def update(done: int, total: int, bytes_done: int, bytes_total: int, name: str) -> None:
        if "progress" not in state:
            if time.monotonic() - started < BAR_DELAY:
                return
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
