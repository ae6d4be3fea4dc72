"""Overlap analytics commands: overlap, combine, plot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from maskhub.analytics.overlap_results import OverlapMatrix, OverlapResult, TensorOverlap
from maskhub.analytics.plot import BASELINES, parse_size
from maskhub.cli.common import (
    byte_progress,
    complete_masks,
    echo,
    echo_json,
    home_option,
    json_option,
    pct,
    print_table,
    ray_option,
    registry,
    say,
    store_option,
)
from maskhub.errors import UsageError
from maskhub.schemas.metadata import COMBINE_OPERATIONS as OPERATIONS

METRICS = ("o1", "jaccard", "lift_magnitude", "lift_stratified", "z_magnitude", "z_score")


def _num(v: float | None, digits: int = 4) -> str:
    return "" if v is None else f"{v:,.{digits}g}"


def _significance(r: OverlapResult) -> str:
    if r.z_magnitude is not None:
        lp = r.log10_p_magnitude
        p_text = f"p = {10 ** lp:.3g}" if lp is not None and lp > -300 \
            else f"p < 1e-300 (log10 p = {lp:,.1f})"
        lift = r.lift_magnitude
        side = "below" if lift is not None and lift < 1 else "above"
        return (f"{side} random: {_num(lift, 3)}x the magnitude-stratified "
                f"expectation (z = {r.z_magnitude:,.2f}, one-sided {p_text}; the stratified "
                f"null alone would say {_num(r.lift_stratified, 3)}x)")
    if r.z_score is None:
        return "significance: undefined (no randomness under the stratified null)"
    p = r.p_value
    p_text = f"p = {p:.3g}" if p else f"p < 1e-300 (log10 p = {r.log10_p_value:,.1f})"
    return (f"significance vs the stratified null: z = {r.z_score:,.2f}, one-sided {p_text} "
            "(no magnitude strata recorded for these masks: re-diff them with this maskhub "
            "for the magnitude-stratified baseline)")


def _print_pair(r: OverlapResult) -> None:
    source = " (from the index cache)" if r.cached else ""
    say("I1 = ", (r.name_a, "bold"), ", I2 = ", (r.name_b, "bold"),
        f": {r.n_params:,} parameters in {r.n_tensors} tensors{source}")
    rows = [
        ["|I1|", f"{r.n_a:,}", "", "", ""],
        ["|I2|", f"{r.n_b:,}", "", "", ""],
        ["|I1 ∩ I2|", f"{r.n_both:,}", _num(r.expected_random, 6),
         _num(r.expected_stratified, 6), _num(r.expected_magnitude, 6)],
        ["o1 = |I1 ∩ I2| / |I1|", pct(r.o1), pct(r.o1_random), pct(r.o1_stratified),
         pct(r.o1_magnitude)],
        ["o2 = |I1 ∩ I2| / |I2|", pct(r.o2), pct(r.o2_random), pct(r.o2_stratified),
         pct(r.o2_magnitude)],
        ["Jaccard", pct(r.jaccard), "", "", ""],
        ["lift (observed / expected)", "", _num(r.lift_random), _num(r.lift_stratified),
         _num(r.lift_magnitude)],
    ]
    print_table(["", "observed", "uniform random", "stratified random",
                 "magnitude-stratified random"], rows)
    say(_significance(r))


def _group(tensors: Sequence[TensorOverlap], per: str) -> list[list[Any]]:
    groups: dict[Any, list[TensorOverlap]] = {}
    for t in tensors:
        key = {"tensor": t.tensor, "module": t.module, "layer": t.layer}[per]
        if per == "layer" and key is None:
            continue
        groups.setdefault(key, []).append(t)
    out = []
    for key, ts in groups.items():
        numel = sum(t.numel for t in ts)
        n_a, n_b = sum(t.n_a for t in ts), sum(t.n_b for t in ts)
        both = sum(t.n_both for t in ts)
        strat = sum(t.expected for t in ts)
        out.append([key, numel, n_a, n_b, both, both / n_a if n_a else None,
                    both / n_b if n_b else None, strat / n_a if n_a else None,
                    strat / n_b if n_b else None])
    return out


def _print_matrix(m: OverlapMatrix, metric: str) -> None:
    names = [x.name for x in m.masks]
    values = m.matrix(metric)
    percent = metric in ("o1", "jaccard")
    fmt = pct if percent else (lambda v: _num(v))
    rows = [[names[i]] + [("—" if i == j else fmt(v)) for j, v in enumerate(row)]
            for i, row in enumerate(values)]
    title = {"o1": "o1 (row = I1, column = I2): share of the row mask's updates also in the "
                   "column mask",
             "jaccard": "Jaccard |I1 ∩ I2| / |I1 ∪ I2|",
             "lift_magnitude": "|I1 ∩ I2| / its magnitude-stratified random expectation",
             "lift_stratified": "|I1 ∩ I2| / its stratified random expectation",
             "z_magnitude": "z-score of |I1 ∩ I2| against the magnitude-stratified null",
             "z_score": "z-score of |I1 ∩ I2| against the stratified null"}[metric]
    print_table(["I1 \\ I2", *names], rows, title=title)
    if metric == "o1":
        strict = all(r.expected_magnitude is not None for r in m.results.values())
        key = "o1_magnitude" if strict else "o1_stratified"
        base = m.matrix(key)
        rows = [[names[i]] + [("—" if i == j else pct(v)) for j, v in enumerate(row)]
                for i, row in enumerate(base)]
        click.echo()
        print_table(["I1 \\ I2", *names], rows,
                    title=f"{'magnitude-stratified' if strict else 'stratified'} random "
                          "baseline of o1")
    n_pairs = len(m.results)
    say(f"{n_pairs} pair{'' if n_pairs == 1 else 's'}, {m.cached} from the index cache")


@click.command()
@click.argument("masks", nargs=-1, shell_complete=complete_masks)
@click.option("--all", "all_pairs", is_flag=True,
              help="Every pair among MASKS (or the masks of --base-model, or all masks).")
@click.option("--base-model", help="With --all: the masks of this base model.")
@click.option("--per", type=click.Choice(["tensor", "module", "layer"]),
              help="Also print the overlap per tensor, module or layer (pairs only).")
@click.option("--metric", type=click.Choice(METRICS), default="o1", show_default=True,
              help="Which matrix --all prints.")
@click.option("--refresh", is_flag=True, help="Recount even if the index holds the result.")
@ray_option
@json_option
@home_option
def overlap(masks: tuple[str, ...], all_pairs: bool, base_model: str | None, per: str | None,
            metric: str, refresh: bool, ray_address: str | None, as_json: bool,
            home: str | None) -> None:
    """How much two masks overlap, against random baselines.

    With two MASKS (I1, I2): |I1 ∩ I2|, o1 = |I1 ∩ I2|/|I1|, o2 = |I1 ∩ I2|/|I2|, Jaccard,
    the uniform random baseline of the paper's Appendix E, the stricter stratified baseline
    (random placement inside each tensor), the strictest magnitude-stratified one (inside
    each tensor and exponent of |θ0|: small bf16 weights move more easily) and a z-score
    against it. With --all: every pair
    among the masks, read in one pass, printed as a matrix. Results are kept in the
    `overlaps` and `tensor_overlaps` tables and reused.

    \b
    Example:
      maskhub overlap tulu-dpo-s42 tulu-dpo-s123 --per module
      maskhub overlap --all --base-model allenai/Llama-3.1-Tulu-3-8B-SFT
      maskhub overlap --all dpo-s42 dpo-s123 prime --metric jaccard --json
      maskhub overlap --all --base-model allenai/Llama-3.1-Tulu-3-8B-SFT --ray
    """
    reg = registry(home)
    if all_pairs:
        if per:
            raise UsageError("--per applies to a pair of masks, not to --all")
        with byte_progress("overlap --all") as progress:
            m = reg.overlap_all(masks, base_model=base_model, refresh=refresh,
                                progress=progress, ray=ray_address)
        if as_json:
            echo_json(m.to_dict(metric))
        else:
            _print_matrix(m, metric)
        return
    if base_model:
        raise UsageError("--base-model applies to --all")
    if ray_address is not None:
        raise UsageError("--ray applies to --all (one pair is counted locally)")
    if len(masks) != 2:
        raise UsageError(f"overlap takes two masks (or --all), got {len(masks)}")
    with byte_progress("overlap") as progress:
        r = reg.overlap(masks[0], masks[1], refresh=refresh, progress=progress)
    if as_json:
        echo_json(r.to_dict(with_tensors=True))
        return
    _print_pair(r)
    if per:
        click.echo()
        print_table([per, "numel", "|I1|", "|I2|", "|I1 ∩ I2|", "o1", "o2", "o1 stratified",
                     "o2 stratified"], _group(r.tensors, per), title=f"per {per}",
                    formatters={c: pct for c in ("o1", "o2", "o1 stratified",
                                                 "o2 stratified")})


@click.command()
@click.argument("operation", type=click.Choice([*OPERATIONS, "random"]))
@click.argument("masks", nargs=-1, shell_complete=complete_masks)
@click.option("--min-count", type=int,
              help="consensus: keep parameters updated in at least K masks "
                   "(default: a strict majority).")
@click.option("--like", help="random: the mask whose counts the random mask keeps.")
@click.option("--per", type=click.Choice(["tensor", "magnitude"]), default="tensor",
              show_default=True, help="random: keep the count per tensor, or per tensor and "
              "exponent of |theta0| (reads the base checkpoint).")
@click.option("--seed", type=int, help="random: seed of the positions (default 0).")
@click.option("--base", help="random --per magnitude: the base checkpoint (default: the mask's "
              "recorded base model).")
@click.option("--name", help="Name of the new mask (default: OPERATION-MASK1-MASK2...).")
@click.option("--notes", help="Free-text notes stored with the new mask.")
@store_option
@json_option
@home_option
def combine(operation: str, masks: tuple[str, ...], min_count: int | None, like: str | None,
            per: str, seed: int | None, base: str | None, name: str | None,
            notes: str | None, store: str | None, as_json: bool, home: str | None) -> None:
    """Combine MASKS into a new registered mask, recording its lineage.

    \b
    intersect   parameters updated in every mask
    union       parameters updated in any mask
    difference  parameters updated in the first mask and in none of the others
    consensus   parameters updated in at least --min-count masks: a reusable
                subnetwork built from several runs
    random      a control: --like MASK's count per tensor (or per tensor and
                |theta0| exponent: --per magnitude) at random positions, seeded

    \b
    Example:
      maskhub combine consensus dpo-s1 dpo-s2 dpo-s3 --min-count 2 --name dpo-consensus
      maskhub combine difference dpo prime --name dpo-only
      maskhub combine random --like dpo --per magnitude --seed 1 --name dpo-random
    """
    reg = registry(home, store)
    with byte_progress(operation) as progress:
        mask = reg.combine(operation, masks, name=name, min_count=min_count, notes=notes,
                           progress=progress, like=like, per=per, seed=seed, base=base)
    if as_json:
        r = mask.row
        echo_json({"id": mask.id, "name": mask.name, "operation": r["operation"],
                   "parents": r["parents"], "min_count": mask.metadata.extra.get("min_count"),
                   "base_model": r["base_model"], "tol": r["tol"], "n_params": mask.n_params,
                   "n_updated": mask.n_updated, "sparsity": mask.sparsity,
                   **({"seed": r["seed"], "per": mask.metadata.extra.get("random_per")}
                      if operation == "random" else {})})
        return
    if operation == "random":
        say("registered ", (mask.name, "bold"), f" (id {mask.id[:12]}) = random "
            f"placement like {like} (per {per}, seed {mask.row['seed']}): "
            f"{mask.n_updated:,} of {mask.n_params:,} parameters, sparsity "
            f"{pct(mask.sparsity)}")
        return
    say("registered ", (mask.name, "bold"), f" (id {mask.id[:12]}) = {operation} of "
        f"{', '.join(masks)}: {mask.n_updated:,} of {mask.n_params:,} parameters, "
        f"sparsity {pct(mask.sparsity)}")


@click.command()
@click.argument("masks", nargs=-1, shell_complete=complete_masks)
@click.option("--kind", type=click.Choice(["sparsity", "overlap", "exponents"]),
              help="sparsity: layer x module heatmap of one mask; overlap: overlap matrix; "
                   "exponents: one mask's update rate per |theta0| exponent with its "
                   "precision null. Default: sparsity for one mask, overlap for several.")
@click.option("--base-model", help="Overlap plot of every mask of this base model.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Image file (.png, .svg, .pdf). Default: <mask>-sparsity.png or "
                   "overlap.png in the current directory.")
@click.option("--size", help="WIDTHxHEIGHT in pixels, e.g. 1600x900.")
@click.option("--baseline", type=click.Choice(BASELINES), default="magnitude",
              show_default=True, help="Random baseline shown in the overlap cells.")
@click.option("--refresh", is_flag=True, help="Recount overlaps even if cached.")
@json_option
@home_option
def plot(masks: tuple[str, ...], kind: str | None, base_model: str | None,
         output: str | None, size: str | None, baseline: str, refresh: bool, as_json: bool,
         home: str | None) -> None:
    """Draw a mask's sparsity per layer and module (the paper's Figure 3), or the overlap
    matrix of several masks with its random baseline. Needs matplotlib
    (pip install 'maskhub[plot]').

    \b
    Example:
      maskhub plot tulu-dpo -o tulu-dpo.png
      maskhub plot tulu-dpo --kind exponents -o tulu-dpo-exponents.png
      maskhub plot dpo-s42 dpo-s123 prime -o overlap.png --baseline uniform
      maskhub plot --base-model allenai/Llama-3.1-Tulu-3-8B-SFT -o overlap.png
    """
    reg = registry(home)
    if not masks and not base_model and kind != "overlap":
        raise UsageError("name a mask to plot, several masks, or --base-model")
    effective = kind or ("sparsity" if len(masks) == 1 and not base_model else "overlap")
    if output is None:
        output = f"{masks[0]}-{effective}.png" if effective != "overlap" else "overlap.png"
    dims = parse_size(size) if size else None
    with byte_progress("overlap --all") as progress:
        path = reg.plot(masks, output, kind=effective, base_model=base_model,
                        baseline=baseline, size=dims, refresh=refresh, progress=progress)
    if as_json:
        echo_json({"path": str(path), "kind": effective, "bytes": path.stat().st_size})
    else:
        echo(f"wrote {path}")


COMMANDS = [overlap, combine, plot]
