"""``maskhub verify``: did a masked training run change anything outside the mask?"""

from __future__ import annotations

import sys

import click

from maskhub.cli.common import (
    byte_progress,
    complete_masks,
    echo_json,
    home_option,
    json_option,
    print_table,
    registry,
    say,
    warn,
)
from maskhub.errors import UsageError


@click.command()
@click.argument("mask", shell_complete=complete_masks)
@click.argument("base")
@click.argument("trained")
@click.option("--tol", "tol_text", default="0", show_default=True, metavar="TOL|mask",
              help="An entry changed iff |trained - base| > tol (0: any change, the exact-mode "
              "guarantee; 'mask': the tolerance the mask was made with, to check a full run "
              "against its own mask).")
@click.option("--device", default="auto", show_default=True,
              help="auto (the CPU: checkpoint reads are faster there than through a GPU), cpu, "
              "or cuda[:N].")
@click.option("--allow-missing", is_flag=True,
              help="Skip (with a warning) tensors not present in the mask and both checkpoints.")
@click.option("--all", "show_all", is_flag=True,
              help="List every tensor, not only those changed outside the mask.")
@json_option
@home_option
def verify(mask: str, base: str, trained: str, tol_text: str, device: str, allow_missing: bool,
           show_all: bool, as_json: bool, home: str | None) -> None:
    """Check that TRAINED differs from BASE only inside MASK: diff the two checkpoints and
    count, per tensor, the entries that changed outside the mask. Exit code 1 if any did.

    MASK is a registered mask's name or id prefix; BASE and TRAINED are checkpoints as for
    `maskhub diff` (directory, .safetensors file or Hub repo id[@revision]).

    \b
    Example:
      maskhub verify tulu-dpo ./tulu-sft ./my-masked-run
      maskhub verify tulu-dpo ./tulu-sft ./my-masked-run --json
      maskhub verify tulu-dpo ./tulu-sft ./tulu-dpo --tol mask   # a run against its own mask
    """
    tol: float | str = "mask" if tol_text.strip().lower() == "mask" else _number(tol_text)
    with byte_progress("verify") as progress:
        report = registry(home).verify(mask, base, trained, tol=tol, device=device,
                                       allow_missing=allow_missing, progress=progress,
                                       warn=warn)
    if as_json:
        echo_json(report.to_dict())
    else:
        rows = report.tensors if show_all else report.outside()
        if rows:
            print_table(["tensor", "numel", "in mask", "changed", "outside mask"],
                        [[t.tensor, f"{t.numel:,}", f"{t.n_mask:,}", f"{t.n_changed:,}",
                          f"{t.n_outside:,}"] for t in rows])
        if tol == "mask":
            why = ", the mask's own tolerance"
        elif report.tol == 0:
            why = ": any change at all, the exact-mode guarantee"
        else:
            why = ""
        say(f"mask {report.mask}: {report.n_changed:,} of {report.n_params:,} "
            f"parameters changed (tol {report.tol:g}{why}), {report.n_outside:,} "
            "outside the mask")
        if report.ok:
            say("OK: nothing changed outside the mask")
        else:
            say(f"FAIL: {report.n_outside:,} parameter(s) changed outside the mask, "
                f"in {len(report.outside())} tensor(s)")
            if report.mask_tol is not None and report.tol < report.mask_tol:
                say(f"note: the mask was made at tol {report.mask_tol:g}, so changes "
                    f"of at most {report.mask_tol:g} are outside it by definition; "
                    "to check a run against its own mask use --tol mask")
    if not report.ok:
        # SystemExit, not ctx.exit(): the group runs click with standalone_mode=False, where
        # ctx.exit(1) would become a return value and exit code 0.
        sys.exit(1)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--tol takes a number >= 0 or 'mask', not {text!r}") from None


COMMANDS = [verify]
