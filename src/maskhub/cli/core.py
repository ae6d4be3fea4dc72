"""Core commands: diff, ls, show, sql, rm, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from maskhub.cli.common import (
    byte_progress,
    complete_masks,
    echo_json,
    home_option,
    json_option,
    pct,
    print_csv,
    print_table,
    ray_option,
    registry,
    stdout,
    store_option,
    warn,
)
from maskhub.errors import UsageError
from maskhub.registry.api import Mask


def _parse_sweep(value: str | None) -> list[float]:
    if not value:
        return []
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--sweep takes comma-separated numbers, not {value!r}") from None


def _summary(mask: Mask) -> dict[str, Any]:
    r = mask.row
    return {"id": r["id"], "name": r["name"], "base_model": r["base_model"],
            "target_model": r["target_model"], "n_params": r["n_params"],
            "n_updated": r["n_updated"], "sparsity": r["sparsity"], "tol": r["tol"]}


def _print_mask_line(mask: Mask, verb: str) -> None:
    stdout.print(
        f"{verb} [bold]{mask.name}[/bold] (id {mask.id[:12]}): {mask.n_updated:,} of "
        f"{mask.n_params:,} parameters updated, sparsity {pct(mask.sparsity)}", highlight=False)


@click.command()
@click.argument("base")
@click.argument("target")
@click.option("--name", help="Name of the new mask (default: from the target's name).")
@click.option("--algorithm", help="RL algorithm of the run (dpo, grpo, ppo...).")
@click.option("--seed", type=int, help="Seed of the run.")
@click.option("--dataset", help="Training dataset of the run.")
@click.option("--tol", type=float, default=1e-5, show_default=True,
              help="Updated iff |target - base| > tol (0: any change).")
@click.option("--sweep", help="Comma-separated extra tolerances whose per-tensor counts are "
              "recorded in the same pass, e.g. 0,1e-8,1e-7,1e-6,1e-5.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when available), cpu, or cuda[:N].")
@click.option("--allow-missing", is_flag=True,
              help="Skip (with a warning) tensors present on one side only.")
@click.option("--base-model", help="Name to record for the base (default: repo id or path).")
@click.option("--target-model", help="Name to record for the target.")
@click.option("--tag", "tags", multiple=True, help="A tag to attach (repeatable).")
@click.option("--notes", help="Free-text notes stored with the mask.")
@click.option("--rank", is_flag=True,
              help="Also record the numerical rank of every 2-D update (the paper's Table 2).")
@click.option("--stats", is_flag=True,
              help="Also record sign flips, mean/max |delta| and |delta|/|base| per tensor.")
@click.option("--force", is_flag=True,
              help="Register the mask even when the same diff (same base and target bytes, "
              "tol and sweep) is already registered (without it, and without --name, that "
              "mask is named and nothing is registered; exit 0).")
@ray_option
@store_option
@json_option
@home_option
def diff(base: str, target: str, name: str | None, algorithm: str | None, seed: int | None,
         dataset: str | None, tol: float, sweep: str | None, device: str, allow_missing: bool,
         base_model: str | None, target_model: str | None, tags: tuple[str, ...],
         notes: str | None, rank: bool, stats: bool, force: bool, ray_address: str | None,
         store: str | None, as_json: bool, home: str | None) -> None:
    """Diff TARGET against BASE and register the mask of updated parameters.

    BASE and TARGET are each a .safetensors file, a directory of safetensors (single file or
    sharded with model.safetensors.index.json), or a Hub repo id with an optional @revision.

    \b
    Example:
      maskhub diff ./tulu-sft ./tulu-dpo --algorithm dpo --seed 42 \\
          --dataset tulu-pref --name tulu-dpo --sweep 0,1e-8,1e-7,1e-6,1e-5
      maskhub diff /shared/sft /shared/rl --ray --store s3://bucket/maskhub
    """
    reg = registry(home, store)
    with byte_progress("diff") as progress:
        mask = reg.diff(base, target, name=name, algorithm=algorithm, seed=seed,
                        dataset=dataset, tol=tol, sweep=_parse_sweep(sweep), device=device,
                        allow_missing=allow_missing, base_model=base_model,
                        target_model=target_model, tags=tags, notes=notes, rank=rank,
                        stats=stats, ray=ray_address, force=force, progress=progress,
                        warn=warn)
    if as_json:
        echo_json({**_summary(mask), "already_registered": mask.reused})
    elif mask.reused:
        _print_mask_line(mask, "already registered as")
        click.echo("(the same diff: same base and target bytes, same tol; nothing registered; "
                   "--force registers a copy, `maskhub edit` fixes its metadata)", err=True)
    else:
        _print_mask_line(mask, "registered")


#: Density map characters, from no entry updated to all (issue 26).
DENSITY_CHARS = " .:-=+*#%@"


def _show_tensor(d: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json(d)
        return
    click.echo(f"{d['tensor']} {d['shape']}: {d['n_updated']:,} of {d['numel']:,} entries "
               f"updated; each character {d['cell_rows']} x {d['cell_cols']} entries, "
               f"'{DENSITY_CHARS}' = 0% .. 100%")
    top = len(DENSITY_CHARS) - 1
    for row in d["grid"]:
        line = "".join(DENSITY_CHARS[0 if v == 0 else max(1, min(top, round(v * top)))]
                       for v in row)
        click.echo(f"|{line}|")


@click.command()
@click.option("--where", help="SQL filter on the masks table, e.g. \"algorithm = 'dpo'\".")
@json_option
@home_option
def ls(where: str | None, as_json: bool, home: str | None) -> None:
    """List registered masks, newest first.

    \b
    Example:
      maskhub ls --where "algorithm = 'dpo'"
    """
    rows = registry(home, reading=True).ls(where)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no masks match --where" if where else
                   "no masks registered yet (try `maskhub demo`)", err=True)
        return
    cols = ["name", "id", "algorithm", "seed", "dataset", "n_params", "sparsity", "created_at"]
    print_table(cols, [[r["name"], r["id"][:12], r["algorithm"], r["seed"], r["dataset"],
                        f"{r['n_params']:,}", r["sparsity"], r["created_at"]] for r in rows],
                formatters={"sparsity": pct})


@click.command()
@click.argument("mask", shell_complete=complete_masks)
@click.option("--tensor", metavar="NAME",
              help="Instead: a text density map of this tensor's mask (each cell a block of "
                   "entries: ' ' none updated, then . : - = + * # % @ up to all).")
@json_option
@home_option
def show(mask: str, tensor: str | None, as_json: bool, home: str | None) -> None:
    """Show one mask: totals, then sparsity per layer and per module (like the paper's
    Figure 3), and the tolerance sweep when one was recorded.

    \b
    Example:
      maskhub show tulu-dpo
    """
    if tensor is not None:
        _show_tensor(registry(home, reading=True).tensor_density(mask, tensor), as_json)
        return
    info = registry(home, reading=True).show(mask)
    if as_json:
        echo_json(info)
        return
    m = info["mask"]
    fields = ["name", "id", "base_model", "base_revision", "target_model", "target_revision",
              "algorithm", "seed", "dataset", "tol", "dtype", "n_params", "n_updated",
              "sparsity", "created_at", "hub_repo", "hub_revision", "tags", "operation",
              "parents", "notes", "base_fingerprint", "target_fingerprint", "edited_at"]
    shown = {**m, "parents": m.get("parent_names") or m.get("parents")}
    print_table(["field", "value"],
                [[f, pct(shown[f]) if f == "sparsity" else shown[f]] for f in fields
                 if shown.get(f) not in (None, [], "")])
    if info["by_layer"]:
        stdout.print()
        print_table(["layer", "numel", "n_updated", "sparsity"],
                    [[r["layer"], r["numel"], r["n_updated"], r["sparsity"]]
                     for r in info["by_layer"]], title="per layer", formatters={"sparsity": pct})
    stdout.print()
    print_table(["module", "param", "tensors", "numel", "n_updated", "sparsity"],
                [[r["module"], r["param_kind"], r["tensors"], r["numel"], r["n_updated"],
                  r["sparsity"]] for r in info["by_module"]], title="per module",
                formatters={"sparsity": pct})
    if info["sweep"]:
        stdout.print()
        print_table(["tol", "n_updated", "sparsity"],
                    [[r["tol"], r["n_updated"], r["sparsity"]] for r in info["sweep"]],
                    title="tolerance sweep", formatters={"sparsity": pct})
    if info["analysis"]:
        a = info["analysis"]
        stdout.print()
        rows = []
        if a["n_rank_tensors"]:
            rows += [["2-D updates with a rank", a["n_rank_tensors"]],
                     [f"mean update rank, transformer blocks ({a['n_block_rank_tensors']} "
                      "matrices; Table 2)", pct(a["mean_rank_fraction"])],
                     ["lowest update rank", pct(a["min_rank_fraction"])]]
            rows += [[f"update rank of {r['tensor']} (outside the blocks)",
                      f"{pct(r['rank_fraction'])} ({r['rank']:,} of {r['max_rank']:,})"]
                     for r in a.get("rank_other") or []]
        if a["n_stats_tensors"]:
            rows += [["sign flips", f"{a['sign_flips']:,}"],
                     ["mean |delta|", f"{a['mean_abs_delta']:.3g}"],
                     ["max |delta|", f"{a['max_abs_delta']:.3g}"],
                     ["changes below one bf16 step", f"{a['n_sub_bf16_step']:,}"]]
        print_table(["update", "value"], rows, title="update analysis (diff --rank/--stats)")


@click.command()
@click.argument("query")
@click.option("--format", "fmt_", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True, help="Output format.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@home_option
def sql(query: str, fmt_: str, as_json: bool, home: str | None) -> None:
    """Run a read-only SQL QUERY over the index (tables masks, tensors, tensor_sweep...):
    one SELECT, SHOW, DESCRIBE, SUMMARIZE, PRAGMA or EXPLAIN statement.

    \b
    Example:
      maskhub sql "select algorithm, avg(sparsity) from masks group by 1"
    """
    cols, rows = registry(home, reading=True).sql(query)
    if as_json or fmt_ == "json":
        echo_json([dict(zip(cols, r, strict=True)) for r in rows])
    elif fmt_ == "csv":
        print_csv(cols, rows)
    else:
        print_table(cols, rows)


@click.command()
@click.argument("mask", shell_complete=complete_masks)
@json_option
@home_option
def rm(mask: str, as_json: bool, home: str | None) -> None:
    """Unregister MASK (name or id prefix) and delete its store.

    \b
    Example:
      maskhub rm tulu-dpo
    """
    reg = registry(home)
    children = reg.derived_from(mask)
    removed = reg.rm(mask)
    if as_json:
        echo_json({"removed": removed.id, "name": removed.name, "derived": children})
        return
    click.echo(f"removed {removed.name} (id {removed.id[:12]})")
    if children:
        warn(f"{len(children)} mask(s) made from it stay registered, their lineage naming "
             f"id {removed.id[:12]}: {', '.join(children)}")


@click.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False),
              help="Where to write the demo checkpoints (default: HOME/demo).")
@json_option
@home_option
def demo(directory: str | None, as_json: bool, home: str | None) -> None:
    """Run the main job offline on an embedded default: train a tiny Llama-shaped model
    (SFT, then a short low-learning-rate fine-tune) in bf16, diff the two checkpoints into
    the registry and show the mask.

    \b
    Example:
      maskhub demo
    """
    reg = registry(home)
    info = reg.demo(Path(directory) if directory else None, progress_cb=None)
    mask = info["mask"]
    if as_json:
        echo_json({**_summary(mask), "base": str(info["base"]), "target": str(info["target"]),
                   "losses": info["losses"]})
        return
    stdout.print(f"checkpoints: {info['base']} and {info['target']}", highlight=False)
    _print_mask_line(mask, "registered")
    ctx = click.get_current_context()
    ctx.invoke(show, mask=mask.id, as_json=False, home=str(reg.home))


COMMANDS = [diff, ls, show, sql, rm, demo]
