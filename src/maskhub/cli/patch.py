"""Patch commands: apply (a thin layer over :meth:`maskhub.Registry.apply`)."""

from __future__ import annotations

import click

from maskhub.cli.common import (
    byte_progress,
    echo_json,
    home_option,
    json_option,
    registry,
    stdout,
    warn,
)


@click.command()
@click.argument("mask")
@click.argument("base")
@click.argument("out", type=click.Path(file_okay=False))
@json_option
@home_option
def apply(mask: str, base: str, out: str, as_json: bool, home: str | None) -> None:
    """Rebuild the target of patch MASK from BASE into the new directory OUT.

    MASK is a patch (a mask made with `maskhub diff BASE TARGET --patch`): its name, an id
    prefix, or a Hub repo id org/name[@REV] (pulled and verified first). BASE is the patch's
    base (a directory, a .safetensors file or a Hub repo id); it must hold the same tensors,
    shapes and dtypes. OUT gets safetensors laid out like BASE (same shard names and index)
    in the target's dtypes, bit for bit the target, plus BASE's other small files (config,
    tokenizer). One tensor at a time; no torch.

    \b
    Example:
      maskhub diff ./qwen-sft ./qwen-grpo --patch --name qwen-grpo
      maskhub apply qwen-grpo ./qwen-sft ./qwen-grpo-rebuilt
      maskhub apply alice/qwen-grpo-patch Qwen/Qwen3-0.6B ./qwen-grpo
    """
    with byte_progress("apply") as progress:
        res = registry(home).apply(mask, base, out, progress=progress, warn=warn,
                                   notice=lambda line: warn(line))
    if as_json:
        echo_json(res.to_dict())
        return
    stdout.print(f"wrote {res.out}: {res.n_tensors} tensors in {len(res.files)} file(s), "
                 f"{res.nbytes:,} bytes, {res.n_values:,} values from patch "
                 f"[bold]{res.mask}[/bold]", highlight=False)


COMMANDS = [apply]
