"""``maskhub import``: register a mask made elsewhere (:meth:`maskhub.Registry.add`)."""

from __future__ import annotations

import click

from maskhub.cli.common import (
    byte_progress,
    echo_json,
    home_option,
    json_option,
    registry,
    say,
    warn,
)
from maskhub.cli.core import _print_mask_line, _summary


@click.command("import")
@click.argument("source", type=click.Path(exists=False))
@click.option("--name", help="Name of the new mask (default: the store's, else the file's).")
@click.option("--base-model", help="Hub id or name of the checkpoint the mask was taken "
              "against (required unless the store records base_model).")
@click.option("--target-model", help="Hub id or name of the fine-tuned checkpoint "
              "(default: the mask's name).")
@click.option("--base-revision", help="Commit of the base model on the Hub.")
@click.option("--target-revision", help="Commit of the fine-tuned model on the Hub.")
@click.option("--tol", type=float, help="Tolerance the mask was made with (default: the "
              "store's, else 1e-5).")
@click.option("--algorithm", help="RL algorithm of the run (dpo, grpo, ppo...).")
@click.option("--seed", type=int, help="Seed of the run.")
@click.option("--dataset", help="Training dataset of the run.")
@click.option("--tag", "tags", multiple=True, help="A tag to attach (repeatable).")
@click.option("--notes", help="Free-text notes stored with the mask.")
@click.option("--base", "base", help="SOURCE is a sparse patch (TRL delta sync, vLLM "
              "checkpoint patch: NAME.indices + NAME.values) of this checkpoint: register it "
              "as a patch (mask + values) that rebuilds the patched weights; --tol defaults "
              "to 0 (lossless) there.")
@json_option
@home_option
def import_(source: str, name: str | None, base_model: str | None, target_model: str | None,
            base_revision: str | None, target_revision: str | None, tol: float | None,
            algorithm: str | None, seed: int | None, dataset: str | None,
            tags: tuple[str, ...], notes: str | None, base: str | None, as_json: bool,
            home: str | None) -> None:
    """Register a mask made elsewhere: SOURCE is a Zarr v3 store in the documented layout
    (one bool array per tensor, or packed uint8 with shape and bitorder attributes) or a
    .safetensors file of bool/uint8 masks. Checked like a pull; from Python:
    Registry().add(...), which also takes a dict of arrays or tensors.

    \b
    Example:
      maskhub import ./my-rl-mask.zarr --name grpo-run3 --base-model Qwen/Qwen2.5-0.5B
      maskhub import masks.safetensors --name ppo-7 --base-model org/sft --algorithm ppo
      maskhub import step-100.safetensors --base ./checkpoint-99 --name grpo-step100
    """
    reg = registry(home)
    with byte_progress("import") as progress:
        mask = reg.add(source, name=name, base_model=base_model, target_model=target_model,
                       base_revision=base_revision, target_revision=target_revision, tol=tol,
                       algorithm=algorithm, seed=seed, dataset=dataset, tags=tags,
                       notes=notes, base=base, progress=progress, warn=warn)
    if as_json:
        echo_json(_summary(mask))
    elif base is not None:
        _print_mask_line(mask, "imported")
    else:
        _print_mask_line(mask, "imported")
        say("no magnitude strata (they need the base weights): its overlaps report "
            "the stratified baseline")


COMMANDS = [import_]
