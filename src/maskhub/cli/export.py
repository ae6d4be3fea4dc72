"""``maskhub export``: a thin layer over :meth:`maskhub.Registry.export`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from maskhub.cli.common import complete_masks, echo_json, home_option, json_option, registry
from maskhub.errors import UsageError

if TYPE_CHECKING:
    from maskhub.registry.api import Registry


@click.command()
@click.argument("mask", shell_complete=complete_masks)
@click.argument("out", type=click.Path())
@click.option("--packed", is_flag=True,
              help="Write the packed bits (uint8, ceil(numel/8) bytes per tensor, little bit "
                   "order; shapes in the file's metadata) instead of one bool tensor per "
                   "parameter.")
@click.option("--peft", is_flag=True,
              help="Write OUT as a directory holding a SHiRA adapter in PEFT's own format "
                   "(adapter_config.json, adapter_model.safetensors): plain "
                   "PeftModel.from_pretrained(model, OUT) loads it, without maskhub.")
@click.option("--exclude", metavar="REGEX", default=None,
              help="With --peft: leave out the 2-D weights whose name matches REGEX "
                   "(default: embeddings, which SHiRA cannot adapt).")
@json_option
@home_option
def export(mask: str, out: str, packed: bool, peft: bool, exclude: str | None, as_json: bool,
           home: str | None) -> None:
    """Write MASK as one .safetensors file, for tools that do not read Zarr: one bool tensor
    per parameter (its name and shape; `maskhub import` reads it back), or with --packed the
    packed bits. The file's metadata names the mask, its models and fingerprints.

    With --peft, OUT is a directory and the mask becomes a SHiRA adapter (zero weights) at
    exactly the mask's entries of each 2-D weight: PEFT gives every layer r*(m+n) slots with
    one r, so the extra slots repeat the layer's own entries (a repeated entry trains that
    many times as fast; the output says how many). Norms, biases and embeddings are not in
    the adapter (the output counts their masked entries).

    \b
    Example:
      maskhub export tulu-dpo tulu-dpo-mask.safetensors
      maskhub export tulu-dpo tulu-dpo-bits.safetensors --packed
      maskhub export tulu-dpo tulu-dpo-shira/ --peft
    """
    reg = registry(home, reading=True)
    if peft or exclude is not None:
        if packed or not peft:
            raise UsageError("--exclude goes with --peft, and --peft not with --packed")
        _export_peft(reg, mask, out, exclude, as_json)
        return
    m = reg.get(mask)
    path = reg.export(mask, out, layout="packed" if packed else "bool")
    if as_json:
        echo_json({"name": m.name, "id": m.id, "path": str(path),
                   "layout": "packed" if packed else "bool", "bytes": path.stat().st_size})
    else:
        click.echo(f"wrote {path} ({path.stat().st_size:,} bytes, "
                   f"{'packed bits' if packed else 'one bool tensor per parameter'})")


def _export_peft(reg: Registry, mask: str, out: str, exclude: str | None, as_json: bool) -> None:
    """``export --peft``: the adapter directory, and what it holds and leaves out."""
    from maskhub.schemas.names import PEFT_EXCLUDE

    m = reg.get(mask)
    res = reg.export_peft(mask, out, exclude=PEFT_EXCLUDE if exclude is None
                          else (exclude or None))
    if as_json:
        echo_json({"name": m.name, "id": m.id, "layout": "peft-shira", **res.to_dict()})
        return
    slots = sum(s for _, s, _ in res.layers.values())
    copies = max(c for _, _, c in res.layers.values())
    click.echo(f"wrote {res.path}/ ({res.bytes:,} bytes): a SHiRA adapter, r={res.r}, "
               f"{len(res.layers)} layer(s), {res.n_adapted:,} mask entries in {slots:,} "
               f"slots (a position repeated at most {copies}x)")
    if res.left_out:
        names = sorted(res.left_out)
        click.echo(f"left out: {res.n_left_out:,} masked entries of {len(names)} tensor(s) "
                   "(not 2-D weights, or excluded): " + ", ".join(names[:4])
                   + (" ..." if len(names) > 4 else ""))
    click.echo(f"load it: PeftModel.from_pretrained(model, {str(res.path)!r})")


COMMANDS = [export]
