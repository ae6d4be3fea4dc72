"""``maskhub fsck``: a thin layer over :mod:`maskhub.maintenance.fsck`."""

from __future__ import annotations

import sys

import click

from maskhub.cli.common import command_home, echo, echo_json, home_option, json_option
from maskhub.registry.api import Registry


@click.command()
@click.option("--repair", is_flag=True,
              help="Fix what is found: delete stale staging, tombstones and orphan stores, "
                   "settle interrupted writes, unregister masks whose store is missing or "
                   "incomplete, delete dangling rows, apply pending migrations, put the "
                   "index's metadata back in a store an interrupted edit left ahead, and "
                   "delete what recovery left in tmp/trash.")
@click.option("--store", default=None, envvar="MASKHUB_STORE", show_envvar=True,
              metavar="URL",
              help="Also look for orphan mask stores under this store root (s3://bucket/"
                   "prefix): prefixes that no registered mask owns.")
@json_option
@home_option
def fsck(repair: bool, store: str | None, as_json: bool, home: str | None) -> None:
    """Check that the index and the mask stores agree: every row has its store and arrays,
    every store its row, no interrupted write, staging or tombstone is left, the lineage and
    the overlap cache name registered masks, the migrations are applied, each store records
    the edits the index does (an interrupted `maskhub edit`). Read-only unless
    --repair. One line per problem and exit code 1; a one-line summary and 0 when clean.
    With --store (or MASKHUB_STORE), orphan prefixes under that root are looked for too.

    \b
    Example:
      maskhub fsck
      maskhub fsck --repair
    """
    # Opened without recovery: a check reports what a crash left instead of fixing it.
    report = Registry(command_home(home), store=store, recover=False).fsck(repair=repair)
    if as_json:
        echo_json(report.to_dict())
    else:
        for finding in report.findings:
            echo(finding.line())
        if report.clean:
            echo(report.summary())
    if not report.clean:
        sys.exit(1)


COMMANDS = [fsck]
