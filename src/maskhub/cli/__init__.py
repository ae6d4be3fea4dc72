"""The ``maskhub`` command line: a thin layer over :mod:`maskhub.registry`.

Every user error (a :class:`~maskhub.errors.MaskhubError`, or a click usage error such as
an unknown option or a bad value) becomes one line on stderr and exit code 1, here and only
here; so does an error of the environment (a full disk...) that no boundary translated
(:func:`~maskhub.errors.environment_failure`). ``maskhub`` alone prints the help and exits 0.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from maskhub import __version__
from maskhub.cli.text import visible
from maskhub.errors import MaskhubError, StudyInterruptedError, environment_failure


def usage_line(exc: click.UsageError) -> str:
    """A click usage error as one line: ``Error: <message> (see 'maskhub <cmd> --help')``."""
    message = " ".join(exc.format_message().split())
    words = exc.ctx.command_path.split()[1:] if exc.ctx is not None else []
    return visible(f"Error: {message} (see '{' '.join(['maskhub', *words, '--help'])}')")


#: Command name -> the module of ``maskhub.cli`` that defines it (in its ``COMMANDS``). A
#: command's module is imported only when that command runs (or help lists them all).
COMMAND_MODULES = {
    "diff": "core", "ls": "core", "show": "core", "sql": "core", "rm": "core", "demo": "core",
    "overlap": "overlap", "combine": "overlap", "plot": "overlap",
    "push": "hub", "pull": "hub", "search": "hub",
    "verify": "verify", "trajectory": "analysis", "compare": "analysis",
    "fsck": "maintenance", "import": "ingest", "study": "study",
    "apply": "patch",
    "edit": "edit", "export": "export",  # issue 26
}


class MaskhubGroup(click.Group):
    """Click group that turns maskhub errors, usage errors and Ctrl-C into one-line
    messages with exit code 1, and imports each command's module on first use."""

    @property
    def commands(self) -> dict[str, click.Command]:  # every command, all modules loaded
        for module in sorted(set(COMMAND_MODULES.values())):
            self._load(module)
        return self._commands

    @commands.setter
    def commands(self, value: dict[str, click.Command]) -> None:
        self._commands = value
        self._loaded: set[str] = set()

    def _load(self, module: str) -> None:
        if module in self._loaded:
            return
        self._loaded.add(module)
        for command in importlib.import_module(f"maskhub.cli.{module}").COMMANDS:
            self._commands[command.name] = command

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:  # noqa: D102
        if cmd_name in COMMAND_MODULES:
            self._load(COMMAND_MODULES[cmd_name])
        return self._commands.get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:  # noqa: D102
        return sorted(set(self._commands) | set(COMMAND_MODULES))

    def main(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        standalone = kwargs.pop("standalone_mode", True)
        try:
            rv = super().main(*args, **kwargs, standalone_mode=False)
            if not standalone:
                return rv
            # Without standalone mode click turns ctx.exit(code) into a return value:
            # give it back as the exit status, as standalone click would.
            sys.exit(rv if isinstance(rv, int) else 0)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError as exc:  # `maskhub` alone: its help
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.UsageError as exc:
            click.echo(usage_line(exc), err=True)
            sys.exit(1)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except MaskhubError as exc:
            click.echo(visible(f"Error: {exc}"), err=True)  # one line, harmless
            sys.exit(INTERRUPTED if isinstance(exc, StudyInterruptedError) else 1)
        except (KeyboardInterrupt, click.exceptions.Abort):
            click.echo("Interrupted: nothing was registered and no partial mask was kept.",
                       err=True)
            sys.exit(INTERRUPTED)
        except BrokenPipeError:
            # `maskhub show X | head -2`: the reader has what it wanted. Quietly, exit 0;
            # stdout goes to /dev/null so that the interpreter's last flush cannot complain.
            _silence_stdout()
            sys.exit(0)
        except Exception as exc:
            # The disk (or the system) refusing an operation that no boundary translated:
            # still one line naming the path and the cause (errors.environment_failure).
            failure = environment_failure(exc, doing="at")  # reading or writing: unknown
            if failure is None:
                raise
            click.echo(visible(f"Error: {failure}"), err=True)
            sys.exit(1)


#: Exit status after Ctrl-C (128 + SIGINT), as shells and other tools report it.
INTERRUPTED = 130


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (a test runner)
        pass


@click.group(cls=MaskhubGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="maskhub")
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="maskhub home holding registry.duckdb and the mask stores, for every "
                   "command (default $MASKHUB_HOME; a command's own --home wins).")
def main(home: str | None) -> None:
    """maskhub: diff, store, query, compare and share the sparse update masks of RL
    fine-tuned LLMs.

    \b
    Example:
      maskhub demo
      maskhub diff ./sft ./dpo --algorithm dpo --seed 42 --name tulu-dpo
      maskhub ls
      maskhub show tulu-dpo
      maskhub --home /data/masks ls
    """
