"""Analysis commands: trajectory, compare."""

from __future__ import annotations

import click

from maskhub.cli.common import (
    byte_progress,
    echo_json,
    home_option,
    json_option,
    pct,
    print_table,
    registry,
    say,
    store_option,
    warn,
)


@click.command()
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--name", help="Base name of the two registered masks (NAME-final, NAME-ever).")
@click.option("--tol", type=float, default=1e-5, show_default=True,
              help="Updated iff |θk - θj| > tol.")
@click.option("--device", default="auto", show_default=True,
              help="auto (= cpu: faster than a GPU for reading checkpoints), cpu or cuda[:N].")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also write a PNG: sparsity against step, and the split.")
@click.option("--algorithm", help="RL algorithm of the run (recorded on both masks).")
@click.option("--seed", type=int, help="Seed of the run.")
@click.option("--dataset", help="Training dataset of the run.")
@click.option("--tag", "tags", multiple=True, help="A tag to attach (repeatable).")
@click.option("--patches", is_flag=True,
              help="CHECKPOINTS are BASE P1 ... Pn: a base and an ordered chain of sparse "
              "patch files (TRL delta sync, vLLM checkpoint patches; see the README), "
              "measured without building any dense checkpoint.")
@store_option
@json_option
@home_option
def trajectory(checkpoints: tuple[str, ...], name: str | None, tol: float, device: str,
               plot_path: str | None, algorithm: str | None, seed: int | None,
               dataset: str | None, tags: tuple[str, ...], patches: bool, store: str | None,
               as_json: bool, home: str | None) -> None:
    """Follow the mask along CKPT0 CKPT1 ... CKPTn (or one directory of checkpoint
    subdirectories, ordered by the step number in their names).

    Reports the sparsity of each checkpoint against CKPT0 and against the previous one, the
    ever-updated set (updated against CKPT0 at some checkpoint so far), the share updated at
    each step but not in the final subnetwork (the paper's Figure 6), and the split into
    never touched / touched but cancelled out / final subnetwork (Figure 2). Registers
    NAME-final and NAME-ever.

    \b
    Example:
      maskhub trajectory ./run/checkpoint-0 ./run/checkpoint-500 ./run/checkpoint-1000
      maskhub trajectory ./run --name grpo-run --plot grpo.png
      maskhub trajectory --patches ./base step-1.safetensors step-2.safetensors
    """
    reg = registry(home, store)
    with byte_progress("trajectory") as progress:
        result = reg.trajectory(list(checkpoints), name=name, tol=tol, device=device,
                                algorithm=algorithm, seed=seed, dataset=dataset, tags=tags,
                                patches=patches, progress=progress)
    data = result.to_dict()
    if plot_path:
        from maskhub.analytics.trajectory_plot import plot_trajectory

        plot_trajectory(data, plot_path)
    if as_json:
        echo_json(data)
        return
    print_table(["step", "checkpoint", "vs first", "vs previous", "ever updated",
                 "not in final"],
                [[p["step"], p["checkpoint"], p["sparsity_vs_first"], p["sparsity_vs_prev"],
                  p["sparsity_ever"], p["frac_not_in_final"]] for p in data["points"][1:]],
                title=f"sparsity along {result.name} (not in final: share of the parameters "
                      "updated at that step that the final subnetwork lacks)",
                formatters={"vs first": pct, "vs previous": pct, "ever updated": pct,
                            "not in final": pct})
    split = result.split()
    say(f"never touched {pct(split['never'])}, touched but cancelled out "
        f"{pct(split['cancelled'])}, final subnetwork {pct(split['subnetwork'])}; "
        f"registered {result.final.name} and {result.ever.name}")
    if plot_path:
        say(f"wrote {plot_path}")


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--mask", "mask_ref", help="Also count inside and outside this registered mask.")
@click.option("--tol", "tols", type=float, multiple=True,
              help="Equal iff |A - B| <= tol (repeatable; default 1e-5).")
@click.option("--device", default="auto", show_default=True,
              help="auto (= cpu: faster than a GPU for reading checkpoints), cpu or cuda[:N].")
@click.option("--allow-missing", is_flag=True,
              help="Skip (with a warning) tensors present on one side only.")
@json_option
@home_option
def compare(a: str, b: str, mask_ref: str | None, tols: tuple[float, ...], device: str,
            allow_missing: bool, as_json: bool, home: str | None) -> None:
    """How much two fine-tuned checkpoints A and B agree, entry by entry: the share of
    entries with |A - B| <= tol, overall and, with --mask, inside and outside a mask. For
    Conjecture 1: A trained only on the subnetwork, B fully fine-tuned from the same base
    (the paper: 94% of entries equal at 1e-5 for DPO, 100% at 1e-4). Registers nothing.

    \b
    Example:
      maskhub compare ./theta-sub ./theta-full --mask tulu-dpo --tol 1e-5 --tol 1e-4
    """
    with byte_progress("compare") as progress:
        report = registry(home).compare(a, b, mask=mask_ref, tols=tols or (1e-5,),
                                        device=device, allow_missing=allow_missing,
                                        progress=progress, warn=warn)
    if as_json:
        echo_json(report.to_dict())
        return
    columns = ["tol", "entries", "equal", "equal %"]
    if mask_ref:
        columns += ["inside mask", "equal inside %", "outside mask", "equal outside %"]
    rows = []
    for g in report.agreements:
        row = [f"{g.tol:g}", f"{g.n_params:,}", f"{g.n_equal:,}", pct(g.frac_equal)]
        if mask_ref:
            row += [f"{g.n_inside:,}", pct(g.frac_equal_inside), f"{g.n_outside:,}",
                    pct(g.frac_equal_outside)]
        rows.append(row)
    print_table(columns, rows, title=f"agreement of {a} and {b}"
                + (f" (mask {report.mask})" if mask_ref else ""))


COMMANDS = [trajectory, compare]
