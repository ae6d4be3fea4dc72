"""Hub commands: push, pull, search (thin layers over :mod:`maskhub.hub`)."""

from __future__ import annotations

import sys
from typing import Any

import click

from maskhub.checkpoints.sources import split_revision
from maskhub.cli.common import (
    F,
    complete_masks,
    echo_json,
    home_option,
    json_option,
    line_of,
    pct,
    print_table,
    registry,
    say,
    warn,
)

REPO_TYPE = click.Choice(["model", "dataset"])


def quiet_option(f: F) -> F:
    """``--quiet``: no retry lines, warnings or progress bars from huggingface_hub."""
    return click.option("--quiet", "-q", is_flag=True,
                        help="Print nothing on stderr but a final error line (no retry "
                             "notices, no progress bars).")(f)


def hub_output(quiet: bool) -> dict[str, Any]:
    """The ``notice``/``progress`` arguments of a Hub call for ``--quiet`` or not: retries
    and huggingface_hub's warnings as one short line each on stderr, or nothing."""
    if quiet:
        return {"notice": lambda line: None, "progress": False}
    # Bars only on a terminal: drawn into a pipe they are noise, and once the pipe closes
    # (`maskhub push ... 2>&1 | head -1`) tqdm's upload threads fail while holding its lock.
    return {"notice": _above_bars, "progress": sys.stderr.isatty()}


def _above_bars(line: str) -> None:
    """A line on stderr that does not run into huggingface_hub's progress bars (tqdm, which
    it brings): printed above them, the bars redrawn below. A closed stderr (the reader of a
    pipe has gone) drops the line instead of failing the thread that logged it."""
    from tqdm import tqdm

    try:
        tqdm.write(line, file=sys.stderr)
    except OSError:
        pass


def repo_type_option(f: F) -> F:
    """``--repo-type model|dataset``."""
    return click.option("--repo-type", type=REPO_TYPE, default="model", show_default=True,
                        help="Kind of Hub repo holding the mask.")(f)


@click.command()
@click.argument("mask", shell_complete=complete_masks)
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (when it is new).")
@click.option("--revision", metavar="BRANCH",
              help="Branch to commit to (created from main if missing; default: main).")
@click.option("--commit-message", metavar="M", help="Commit message.")
@click.option("--license", "license_", metavar="ID",
              help="License id for the model card, e.g. apache-2.0.")
@repo_type_option
@quiet_option
@json_option
@home_option
def push(mask: str, repo_id: str, private: bool, revision: str | None,
         commit_message: str | None, license_: str | None, repo_type: str, quiet: bool,
         as_json: bool, home: str | None) -> None:
    """Push MASK to the Hub repo REPO_ID in one commit: the Zarr store, maskhub.json (every
    file's sha256), tensors.parquet and a model card. Creates the repo if needed; pushing an
    unchanged mask again makes no commit. Authenticates with HF_TOKEN (never printed).

    \b
    Example:
      maskhub push tulu-dpo alice/tulu-dpo-mask --license apache-2.0
    """
    res = registry(home).push(mask, repo_id, private=private, revision=revision,
                              commit_message=commit_message, repo_type=repo_type,
                              license=license_, **hub_output(quiet))
    if as_json:
        echo_json(res.to_dict())
    elif res.changed:
        # One write for both lines: `maskhub push ... | head -1` gets the first whole.
        click.echo(line_of("pushed ", (res.name, "bold"), f" to {res.repo_id}@{res.branch}: "
                           f"commit {res.commit[:12]} ({res.files} files, {res.bytes:,} bytes)")
                   + "\n" + line_of(res.url))
    else:
        say(f"{res.name} is unchanged on {res.repo_id}@{res.branch}: no new commit "
            f"(at {res.commit[:12]})")


@click.command()
@click.argument("repo_id", metavar="REPO_ID[@REV]")
@click.option("--name", help="Local name (default: the mask's own, suffixed -2... if taken).")
@repo_type_option
@quiet_option
@json_option
@home_option
def pull(repo_id: str, name: str | None, repo_type: str, quiet: bool, as_json: bool,
         home: str | None) -> None:
    """Download the mask of Hub repo REPO_ID (at branch, tag or commit REV), verify every
    checksum and the arrays against the metadata, and register it. Pulling a commit already
    pulled is a no-op; a cached commit can be pulled with HF_HUB_OFFLINE=1.

    \b
    Example:
      maskhub pull alice/tulu-dpo-mask@main --name tulu-dpo
    """
    repo, rev = split_revision(repo_id)
    res = registry(home).pull(repo, rev, name=name, repo_type=repo_type, **hub_output(quiet))
    if as_json:
        echo_json(res.to_dict())
        return
    for note in res.notes:
        warn(note)
    m = res.mask
    verb = "registered" if res.status == "registered" else "already registered:"
    say(f"{verb} ", (m.name, "bold"), f" (id {m.id[:12]}) from {res.repo_id}@"
        f"{res.commit[:12]}: {m.n_updated:,} of {m.n_params:,} parameters updated, "
        f"sparsity {pct(m.sparsity)}")


@click.command()
@click.option("--base-model", metavar="M", help="Only masks of this base model (a repo id).")
@click.option("--algorithm", metavar="A", help="Only masks of this algorithm (dpo, grpo...).")
@click.option("--limit", type=int, default=50, show_default=True, help="At most this many.")
@repo_type_option
@quiet_option
@json_option
def search(base_model: str | None, algorithm: str | None, limit: int, repo_type: str,
           quiet: bool, as_json: bool) -> None:
    """List mask repos on the Hub (tag maskhub), by base model and algorithm.

    \b
    Example:
      maskhub search --base-model allenai/Llama-3.1-Tulu-3-8B-SFT --algorithm dpo
    """
    from maskhub.hub.search import search as hub_search  # lazy: keeps `maskhub` start fast

    hits = hub_search(base_model=base_model, algorithm=algorithm, repo_type=repo_type,
                      limit=limit, notice=hub_output(quiet)["notice"])
    if as_json:
        echo_json(hits)
        return
    if not hits:
        click.echo("no mask repos found", err=True)
        return
    cols = ["repo_id", "algorithm", "base_model", "sparsity", "n_params", "last_modified"]
    print_table(cols, [[h[c] for c in cols] for h in hits], formatters={"sparsity": pct})


COMMANDS = [push, pull, search]
