"""Core commands: diff, ls, show, sql, rm, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from maskhub.cli.common import (
    byte_progress,
    complete_masks,
    echo,
    echo_json,
    home_option,
    json_option,
    pct,
    print_csv,
    print_table,
    ray_option,
    registry,
    say,
    store_option,
    warn,
)
from maskhub.errors import UsageError
from maskhub.registry.api import Mask
from maskhub.storage.sandbox import DEFAULT_TIMEOUT_S


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
            "n_updated": r["n_updated"], "sparsity": r["sparsity"], "tol": r["tol"],
            **{k: r.get(k) for k in ("null_budget", "null_budget_source", "n_null",
                                     "null_share", "sparsity_movable")}}


def _print_mask_line(mask: Mask, verb: str) -> None:
    say(f"{verb} ", (mask.name, "bold"), f" (id {mask.id[:12]}): {mask.n_updated:,} of "
        f"{mask.n_params:,} parameters updated, sparsity {pct(mask.sparsity)}")


@click.command()
@click.argument("base")
@click.argument("target")
@click.option("--name", help="Name of the new mask (default: from the target's name).")
@click.option("--algorithm", help="RL algorithm of the run (dpo, grpo, ppo...).")
@click.option("--seed", type=int, help="Seed of the run.")
@click.option("--dataset", help="Training dataset of the run.")
@click.option("--tol", type=float, default=None,
              help="Updated iff |target - base| > tol (0: any change).  [default: 1e-05; 0 "
              "with --patch]")
@click.option("--sweep", help="Comma-separated extra tolerances whose per-tensor counts are "
              "recorded in the same pass, e.g. 0,1e-8,1e-7,1e-6,1e-5.")
@click.option("--device", default="auto", show_default=True,
              help="auto (the CPU: checkpoint reads are faster there than through a GPU), cpu, "
              "or cuda[:N].")
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
@click.option("--patch", is_flag=True,
              help="Also store the target's values at the updated entries, so that `maskhub "
              "apply` rebuilds TARGET from BASE bit for bit (at --tol 0, the default then).")
@click.option("--budget", type=float,
              help="Movement budget of the precision null, e.g. lr*steps (default: the "
              "largest |delta| observed).")
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
         notes: str | None, rank: bool, stats: bool, patch: bool, budget: float | None,
         force: bool, ray_address: str | None, store: str | None, as_json: bool,
         home: str | None) -> None:
    """Diff TARGET against BASE and register the mask of updated parameters.

    BASE and TARGET are each a .safetensors file, a directory of safetensors (single file or
    sharded with model.safetensors.index.json), or a Hub repo id with an optional @revision.

    \b
    Example:
      maskhub diff ./tulu-sft ./tulu-dpo --algorithm dpo --seed 42 \\
          --dataset tulu-pref --name tulu-dpo --sweep 0,1e-8,1e-7,1e-6,1e-5
      maskhub diff /shared/sft /shared/rl --ray --store s3://bucket/maskhub
      maskhub diff ./qwen-sft ./qwen-grpo --patch --name qwen-grpo-patch
    """
    reg = registry(home, store)
    with byte_progress("diff") as progress:
        mask = reg.diff(base, target, name=name, algorithm=algorithm, seed=seed,
                        dataset=dataset, tol=tol, sweep=_parse_sweep(sweep), device=device,
                        allow_missing=allow_missing, base_model=base_model,
                        target_model=target_model, tags=tags, notes=notes, rank=rank,
                        stats=stats, ray=ray_address, force=force, progress=progress,
                        warn=warn, patch=patch, budget=budget)
    if as_json:
        echo_json({**_summary(mask), "already_registered": mask.reused})
    elif mask.reused:
        _print_mask_line(mask, "already registered as")
        click.echo("(the same diff: same base and target bytes, same tol; nothing registered; "
                   "--force registers a copy, `maskhub edit` fixes its metadata)", err=True)
    else:
        _print_mask_line(mask, "registered")
        _print_null_line(mask)


def _print_null_line(mask: Mask) -> None:
    r = mask.row
    if r.get("n_null") is None:
        return
    movable = "" if r.get("sparsity_movable") is None else \
        f", sparsity among the rest {pct(r['sparsity_movable'])}"
    say(
        f"precision null at budget {r['null_budget']:.3g} ({r['null_budget_source']}): "
        f"{r['n_null']:,} parameters ({pct(r['null_share'])}) could not have changed"
        f"{movable}")


#: Rows ``maskhub ls`` prints in a table when ``--limit`` is not given.
LS_DEFAULT_LIMIT = 50


def timeout_option(f: Any) -> Any:
    """``--timeout SECONDS``: stop a user's query after that long (0: no limit)."""
    return click.option("--timeout", type=click.FloatRange(min=0), default=DEFAULT_TIMEOUT_S,
                        show_default=True, metavar="SECONDS",
                        help="Stop the query after this many seconds (0: no limit).")(f)


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
@click.option("--where", help="SQL filter on the masks table, e.g. \"algorithm = 'dpo'\" "
              "(runs in the SQL sandbox, like maskhub sql).")
@click.option("--sort", metavar="COLUMN",
              help="Order by this column of masks (e.g. sparsity, name, seed); a leading - "
                   "(--sort=-sparsity) or --desc for descending. Default: newest first.")
@click.option("--desc", is_flag=True, help="With --sort: descending.")
@click.option("--limit", type=click.IntRange(min=0), default=None, metavar="N",
              help=f"Show at most N masks (0: all). Default: {LS_DEFAULT_LIMIT} in a table, all "
                   "with --json.")
@timeout_option
@json_option
@home_option
def ls(where: str | None, sort: str | None, desc: bool, limit: int | None, timeout: float,
       as_json: bool, home: str | None) -> None:
    """List registered masks, newest first.

    \b
    Example:
      maskhub ls --where "algorithm = 'dpo'"
      maskhub ls --sort=-sparsity --limit 10
      maskhub ls --limit 0
    """
    if limit is None:
        limit = 0 if as_json else LS_DEFAULT_LIMIT
    rows = registry(home, reading=True).ls(where, limit=limit, sort=sort, descending=desc,
                                           timeout=timeout)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no masks match --where" if where else
                   "no masks registered yet (try `maskhub demo`)", err=True)
        return
    cols = ["name", "id", "algorithm", "seed", "dataset", "n_params", "sparsity", "created_at"]
    table = [[r["name"], r["id"][:12], r["algorithm"], r["seed"], r["dataset"],
              f"{r['n_params']:,}", r["sparsity"], r["created_at"]] for r in rows]
    if any(r.get("has_values") for r in rows):  # a patch column only when there is one
        cols.append("patch")
        for line, r in zip(table, rows, strict=True):
            line.append("values" if r.get("has_values") else "")
    print_table(cols, table, formatters={"sparsity": pct})
    more = rows.total - len(rows)
    if more > 0:
        click.echo(f"{len(rows)} of {rows.total:,} masks shown, {more:,} more: --limit 0 "
                   "shows all", err=True)


@click.command()
@click.argument("mask", shell_complete=complete_masks)
@click.option("--control", help="A second mask to set beside it, e.g. the diff of the same "
              "run's fp32 master weights.")
@click.option("--tensor", metavar="NAME",
              help="Instead: a text density map of this tensor's mask (each cell a block of "
                   "entries: ' ' none updated, then . : - = + * # % @ up to all).")
@json_option
@home_option
def show(mask: str, control: str | None, tensor: str | None, as_json: bool,
         home: str | None) -> None:
    """Show one mask: totals, then sparsity per layer and per module (like the paper's
    Figure 3), the precision null, and the tolerance sweep when one was recorded.

    \b
    Example:
      maskhub show tulu-dpo
      maskhub show tulu-dpo --control tulu-dpo-fp32
    """
    if tensor is not None:
        _show_tensor(registry(home, reading=True).tensor_density(mask, tensor), as_json)
        return
    info = registry(home, reading=True).show(mask, control=control)
    if as_json:
        echo_json(info)
        return
    if control is not None:
        _print_control(info["control"])
        return
    m = info["mask"]
    fields = ["name", "id", "base_model", "base_revision", "target_model", "target_revision",
              "algorithm", "seed", "dataset", "tol", "dtype", "n_params", "n_updated",
              "sparsity", "created_at", "hub_repo", "hub_revision", "tags", "operation",
              "parents", "notes", "base_fingerprint", "target_fingerprint", "edited_at"]
    shown = {**m, "parents": m.get("parent_names") or m.get("parents")}
    table = [[f, pct(shown[f]) if f == "sparsity" else shown[f]] for f in fields
             if shown.get(f) not in (None, [], "")]
    if m.get("has_values"):
        table.append(["patch", "holds the target's values at the updated entries "
                               "(maskhub apply rebuilds the target from the base)"])
    print_table(["field", "value"], table)
    if info["by_layer"]:
        click.echo()
        print_table(["layer", "numel", "n_updated", "sparsity"],
                    [[r["layer"], r["numel"], r["n_updated"], r["sparsity"]]
                     for r in info["by_layer"]], title="per layer", formatters={"sparsity": pct})
    click.echo()
    print_table(["module", "param", "tensors", "numel", "n_updated", "sparsity"],
                [[r["module"], r["param_kind"], r["tensors"], r["numel"], r["n_updated"],
                  r["sparsity"]] for r in info["by_module"]], title="per module",
                formatters={"sparsity": pct})
    _print_precision_null(info)
    if info["sweep"]:
        click.echo()
        print_table(["tol", "n_updated", "sparsity"],
                    [[r["tol"], r["n_updated"], r["sparsity"]] for r in info["sweep"]],
                    title="tolerance sweep", formatters={"sparsity": pct})
    if info["analysis"]:
        a = info["analysis"]
        click.echo()
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


def _print_control(c: dict[str, Any]) -> None:
    """``show --control``: the mask and its control side by side."""
    if not c["same_base"]:
        say(f"note: {c['mask']} and {c['control']} were diffed from different base "
                     "files (as a bf16 checkpoint and its fp32 masters are)")
    fractions = {"sparsity", "null_share", "sparsity_movable"}

    def fmt(f: str, v: Any) -> Any:
        if v is None:
            return "-"
        if f in fractions:
            return pct(v)
        if isinstance(v, float) and f != "tol":
            return f"{v:.3g}"
        return f"{v:,}" if isinstance(v, int) else v
    print_table(["figure", c["mask"], c["control"]],
                [[r["figure"], fmt(r["figure"], r["mask"]), fmt(r["figure"], r["control"])]
                 for r in c["figures"]], title=f"{c['mask']} beside its control {c['control']}")
    click.echo()
    print_table(["module", "param", "numel", c["mask"], c["control"]],
                [[r["module"], r["param_kind"], f"{r['numel']:,}", pct(r["sparsity"]),
                  pct(r["control_sparsity"])] for r in c["by_module"]],
                title="sparsity per module")


def _print_precision_null(info: dict[str, Any]) -> None:
    """The precision null of ``show`` and its per-exponent update rates."""
    m = info["mask"]
    if m.get("n_null") is not None:
        click.echo()
        rows = [["budget", f"{m['null_budget']:.3g} ({m['null_budget_source']})"],
                ["largest |delta| observed", "-" if m.get("max_abs_update") is None
                 else f"{m['max_abs_update']:.3g}"],
                ["could not have changed", f"{m['n_null']:,} ({pct(m['null_share'])})"],
                ["updated among them", f"{m['n_null_updated']:,}"],
                ["sparsity among the rest", "-" if m.get("sparsity_movable") is None
                 else pct(m["sparsity_movable"])]]
        print_table(["precision null", "value"], rows,
                    title="precision null (entries whose smallest bf16/fp16 step at |θ0| "
                          "exceeds the budget)")
    if info.get("by_exponent"):
        click.echo()
        print_table(
            ["dtype", "|θ0| binade", "numel", "n_updated", "update rate", "smallest step",
             "null"],
            [[r["base_dtype"] if r["base_dtype"] == r["target_dtype"]
              else f"{r['base_dtype']}->{r['target_dtype']}",
              "zero/subnormal" if r["stratum"] == 0 else
              ("inf/nan" if r["exponent"] is None else f"2^{r['exponent']}"),
              f"{r['numel']:,}", f"{r['n_updated']:,}", pct(r["rate"]),
              "-" if r["min_change"] is None else f"{r['min_change']:.3g}",
              "-" if r["null"] is None else ("yes" if r["null"] else "no")]
             for r in info["by_exponent"]],
            title="update rate per exponent of |θ0|")


@click.command()
@click.argument("query")
@click.option("--format", "fmt_", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True, help="Output format.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@timeout_option
@home_option
def sql(query: str, fmt_: str, as_json: bool, timeout: float, home: str | None) -> None:
    """Run a read-only SQL QUERY over the index (tables masks, tensors, tensor_sweep...):
    one SELECT, SHOW, DESCRIBE, SUMMARIZE, PRAGMA or EXPLAIN statement. It runs in a
    sandbox: the registry's tables and views only (no other file, no network, no
    extension, no setting), stopped after --timeout seconds.

    \b
    Example:
      maskhub sql "select algorithm, avg(sparsity) from masks group by 1"
      maskhub sql "select name, sparsity from masks" --format csv
    """
    cols, rows = registry(home, reading=True).sql(query, timeout=timeout)
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
    echo(f"removed {removed.name} (id {removed.id[:12]})")
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
    say(f"checkpoints: {info['base']} and {info['target']}")
    _print_mask_line(mask, "registered")
    ctx = click.get_current_context()
    ctx.invoke(show, mask=mask.id, as_json=False, home=str(reg.home))


COMMANDS = [diff, ls, show, sql, rm, demo]
