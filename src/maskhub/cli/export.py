"""``maskhub export``: a thin layer over :meth:`maskhub.Registry.export`."""

from __future__ import annotations

import click

from maskhub.cli.common import complete_masks, echo_json, home_option, json_option, registry


@click.command()
@click.argument("mask", shell_complete=complete_masks)
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--packed", is_flag=True,
              help="Write the packed bits (uint8, ceil(numel/8) bytes per tensor, little bit "
                   "order; shapes in the file's metadata) instead of one bool tensor per "
                   "parameter.")
@json_option
@home_option
def export(mask: str, out: str, packed: bool, as_json: bool, home: str | None) -> None:
    """Write MASK as one .safetensors file, for tools that do not read Zarr: one bool tensor
    per parameter (its name and shape; `maskhub import` reads it back), or with --packed the
    packed bits. The file's metadata names the mask, its models and fingerprints.

    \b
    Example:
      maskhub export tulu-dpo tulu-dpo-mask.safetensors
      maskhub export tulu-dpo tulu-dpo-bits.safetensors --packed
    """
    reg = registry(home, reading=True)
    m = reg.get(mask)
    path = reg.export(mask, out, layout="packed" if packed else "bool")
    if as_json:
        echo_json({"name": m.name, "id": m.id, "path": str(path),
                   "layout": "packed" if packed else "bool", "bytes": path.stat().st_size})
    else:
        click.echo(f"wrote {path} ({path.stat().st_size:,} bytes, "
                   f"{'packed bits' if packed else 'one bool tensor per parameter'})")


COMMANDS = [export]
