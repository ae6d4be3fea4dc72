"""``maskhub edit``: a thin layer over :meth:`maskhub.Registry.edit`."""

from __future__ import annotations

import click

from maskhub.cli.common import (
    complete_masks,
    echo,
    echo_json,
    home_option,
    json_option,
    registry,
)


@click.command()
@click.argument("mask", shell_complete=complete_masks)
@click.option("--name", "new_name", help="A new name for the mask.")
@click.option("--base-model", help="The base model's name (e.g. the Hub repo id it came from).")
@click.option("--base-revision", help="The base model's revision.")
@click.option("--target-model", help="The target model's name.")
@click.option("--target-revision", help="The target model's revision.")
@click.option("--algorithm", help="RL algorithm of the run (dpo, grpo, ppo...).")
@click.option("--seed", type=int, help="Seed of the run.")
@click.option("--dataset", help="Training dataset of the run.")
@click.option("--tag", "tags", multiple=True,
              help="The mask's tags (repeatable; replaces the tags it has).")
@click.option("--add-tag", "add_tags", multiple=True, help="A tag to add (repeatable).")
@click.option("--notes", help="Free-text notes (replaces the notes it has).")
@json_option
@home_option
def edit(mask: str, new_name: str | None, base_model: str | None, base_revision: str | None,
         target_model: str | None, target_revision: str | None, algorithm: str | None,
         seed: int | None, dataset: str | None, tags: tuple[str, ...],
         add_tags: tuple[str, ...], notes: str | None, as_json: bool, home: str | None) -> None:
    """Correct a mask's metadata after the fact. Each change is recorded (masks.edits,
    masks.edited_at) and written to the store's attributes too; bits, counts and content
    fingerprints are what the diff measured and cannot be edited.

    \b
    Example:
      maskhub edit llama-dpo --base-model meta-llama/Llama-3.1-8B --algorithm dpo --seed 1
      maskhub edit llama-dpo --add-tag paper-table4
    """
    reg = registry(home)
    new_tags: list[str] | None = list(tags) if tags else None
    if add_tags:
        current = new_tags if new_tags is not None else list(reg.get(mask).row["tags"] or [])
        new_tags = current + [t for t in add_tags if t not in current]
    edited = reg.edit(mask, name=new_name, base_model=base_model, base_revision=base_revision,
                      target_model=target_model, target_revision=target_revision,
                      algorithm=algorithm, seed=seed, dataset=dataset, tags=new_tags,
                      notes=notes)
    row = edited.row
    if as_json:
        echo_json({"id": row["id"], "name": row["name"], "edits": list(row["edits"] or [])})
        return
    for line in (row["edits"] or [])[-len(_changed(row)):]:
        echo(f"{edited.name}: {line.split(' ', 1)[1]}")


def _changed(row: dict) -> list[str]:
    """The edit lines of the last edit (those sharing the newest timestamp)."""
    lines = list(row["edits"] or [])
    last = lines[-1].split(" ", 1)[0] if lines else ""
    return [x for x in lines if x.split(" ", 1)[0] == last]


COMMANDS = [edit]
