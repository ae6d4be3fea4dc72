"""``maskhub study --from-hub PAIRS``: the checkpoint-only tables of the paper (1, 2, 4, 6) on
real models from the Hub, no training.

Each pair ``BASE:TARGET`` (Hub repo ids, ``org/name[@revision]``, or local checkpoint paths)
is diffed with the study's tolerance, sweep, update rank and |Δ| statistics (with the precision
null), registered as ``PREFIX-N-TARGETNAME`` with the pair's facts as JSON notes; pairs that
share a base are overlapped (Table 4, with every baseline). ``paper`` names the paper's public
pairs (:data:`PAPER_PAIRS`). The report is ``OUT/report.md`` and ``report.json``: each table
the output of the ``maskhub sql`` query under it, as in the miniature study.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from maskhub.errors import NameTakenError, UsageError
from maskhub.registry.api import Registry
from maskhub.schemas.names import invalid_mask_name_message, valid_mask_name
from maskhub.study.measure import SWEEP, TOL, StudyNames
from maskhub.study.report import Table, _markdown_table, _sql_command, query_tables
from maskhub.study.tables import TableSpec, table_specs


@dataclass(frozen=True)
class HubPair:
    """One pair of checkpoints: ``base`` -> ``target``; ``stage`` (``sft`` or ``rl``) and the
    paper's update sparsity at tol 1e-5 (%, Tables 1 and 6 and Figure 1) when it has one."""

    base: str
    target: str
    stage: str | None = None
    paper_sparsity: float | None = None


#: The paper's public pairs (Appendix C, Tables 1 and 6): SFT from the pretrained models, and
#: RL from the SFT models. ``--from-hub paper`` runs them all (eleven repos, about 540 GB
#: of bf16 weights, three 70B models among them; each pair is downloaded, then diffed).
PAPER_PAIRS = (
    HubPair("meta-llama/Llama-3.1-8B", "allenai/Llama-3.1-Tulu-3-8B-SFT", "sft"),
    HubPair("meta-llama/Llama-3.1-70B", "allenai/Llama-3.1-Tulu-3-70B-SFT", "sft"),
    HubPair("Qwen/Qwen2.5-Math-7B", "PRIME-RL/Eurus-2-7B-SFT", "sft"),
    HubPair("allenai/Llama-3.1-Tulu-3-8B-SFT", "allenai/Llama-3.1-Tulu-3-8B-DPO", "rl", 81.38),
    HubPair("allenai/Llama-3.1-Tulu-3-70B-SFT", "allenai/Llama-3.1-Tulu-3-70B-DPO", "rl",
            95.24),
    HubPair("PRIME-RL/Eurus-2-7B-SFT", "PRIME-RL/Eurus-2-7B-PRIME", "rl", 77.04),
    HubPair("deepseek-ai/deepseek-math-7b-instruct", "deepseek-ai/deepseek-math-7b-rl", "rl",
            68.53),
)


def parse_pairs(text: str) -> list[HubPair]:
    """``--from-hub``'s value: ``paper`` (:data:`PAPER_PAIRS`), or comma-separated
    ``BASE:TARGET`` pairs (a Hub repo id ``org/name[@revision]`` or a local path on each
    side; a paper pair given this way keeps its paper figures). One-line
    :class:`~maskhub.errors.UsageError` for a malformed list."""
    if text.strip() == "paper":
        return list(PAPER_PAIRS)
    known = {(p.base, p.target): p for p in PAPER_PAIRS}
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        base, sep, target = item.partition(":")
        if not item or not sep or not base.strip() or not target.strip() or ":" in target:
            raise UsageError(f"--from-hub takes 'paper' or comma-separated BASE:TARGET pairs "
                             f"(e.g. allenai/Llama-3.1-Tulu-3-8B-SFT:"
                             f"allenai/Llama-3.1-Tulu-3-8B-DPO), not {item!r}")
        base, target = base.strip(), target.strip()
        pairs.append(known.get((base, target), HubPair(base, target)))
    return pairs


def _slug(ref: str) -> str:
    """The name part of a repo id or path, as mask-name characters."""
    last = ref.split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-._") or "model"


def mask_names(prefix: str, pairs: list[HubPair]) -> list[str]:
    """``PREFIX-N-TARGETNAME`` for the N-th pair (1-based)."""
    return [f"{prefix}-{i}-{_slug(p.target)}"[:200] for i, p in enumerate(pairs, 1)]


def choose_prefix(registry: Registry, name: str | None, pairs: list[HubPair]) -> str:
    """``name`` if every mask name it makes is valid and free, else the first free ``hub``,
    ``hub-2``...; one-line errors as the miniature study's."""
    existing = {r["name"] for r in registry.ls(None)}
    if name is not None:
        for mask in mask_names(name, pairs):
            if not valid_mask_name(mask):
                raise UsageError(f"--name {name!r} cannot prefix the study's masks: "
                                 f"{invalid_mask_name_message(mask)}")
            try:
                registry.check_new_name(mask)
            except NameTakenError:
                raise UsageError(f"the registry already has a mask named {mask!r}; choose "
                                 "another --name or remove its masks") from None
        return name
    for k in range(1, 1000):
        prefix = "hub" if k == 1 else f"hub-{k}"
        if not existing & set(mask_names(prefix, pairs)):
            return prefix
    raise UsageError("no free study name from hub to hub-999; pass --name")


def hub_table_specs(names: StudyNames, masks: list[str], groups: list[list[str]]
                    ) -> list[TableSpec]:
    """The report's tables: the pairs beside the paper's figure, then the miniature study's
    Table 1, Table 6 and Table 2 queries (the same SQL, on these masks), and Table 4 for the
    masks that share a base."""
    tagged = f"list_contains(tags, '{names.tag}') AND notes IS NOT NULL"
    specs = [TableSpec(
        "pairs", "The pairs: update sparsity (%) at tol 1e-5 beside the paper's", "Tables 1, 6 "
        "and Appendix C",
        "SELECT name, base_model, base_revision, target_model, target_revision,\n"
        "       json_extract_string(notes, '$.stage') AS stage,\n"
        "       round(100 * sparsity, 2) AS sparsity_pct,\n"
        "       CAST(json_extract(notes, '$.paper_sparsity') AS DOUBLE) AS paper_sparsity_pct\n"
        f"FROM masks\nWHERE {tagged}\n"
        "ORDER BY CAST(json_extract(notes, '$.order') AS INTEGER)")]
    specs += [t for t in table_specs(names) if t.key in ("table1", "table6", "table2")]
    shared = [m for g in groups for m in g]
    if shared:
        listed = ", ".join(f"'{m}'" for m in shared)
        specs.append(TableSpec(
            "table4", "Overlap (%) between the masks of pairs that share a base, with the "
            "uniform, per-tensor (stratified) and magnitude baselines", "Table 4",
            "SELECT name_a, name_b, round(100 * o1, 2) AS o1, round(100 * o2, 2) AS o2,\n"
            "       round(100 * o1_random, 2) AS o1_uniform, "
            "round(100 * o1_stratified, 2) AS o1_stratified,\n"
            "       round(100 * o1_magnitude, 2) AS o1_magnitude, "
            "round(z_score, 1) AS z_stratified\n"
            f"FROM overlap_summary\nWHERE name_a IN ({listed}) AND name_b IN ({listed})\n"
            "  AND name_a < name_b\nORDER BY name_a, name_b"))
    return specs


@dataclass
class HubStudy:
    """What ``--from-hub`` measured and wrote."""

    prefix: str
    pairs: list[HubPair]
    masks: list[str]
    tables: list[Table]
    timing: dict[str, float]
    paths: dict[str, Path]
    findings: list[str]

    def table(self, key: str) -> Table:
        """The table ``key``."""
        return next(t for t in self.tables if t.spec.key == key)


def study_from_hub(output: Path, pairs: list[HubPair], *, registry: Registry, prefix: str,
                   say: Callable[[str], None]) -> HubStudy:
    """Diff each pair into ``registry`` as ``PREFIX-N-TARGETNAME`` (``prefix`` from
    :func:`choose_prefix`), overlap the pairs that share a base, write ``output/report.md``
    and ``report.json`` (``output``: a new or empty directory, prepared by the caller)."""
    started = time.perf_counter()
    names = StudyNames(prefix)
    masks = mask_names(prefix, pairs)
    say(f"study {prefix!r} from the Hub: {len(pairs)} pair(s) into {output}")
    for i, (pair, mask) in enumerate(zip(pairs, masks, strict=True)):
        say(f"maskhub diff {pair.base} {pair.target}")
        notes = {"study": prefix, "order": i, "from_hub": True, **asdict(pair)}
        registry.diff(pair.base, pair.target, name=mask, tol=TOL, sweep=SWEEP, rank=True,
                      stats=True, tags=("maskhub-study", names.tag, "from-hub"),
                      notes=json.dumps(notes, sort_keys=True),
                      algorithm=pair.stage)
    by_base: dict[str, list[str]] = {}
    for pair, mask in zip(pairs, masks, strict=True):
        by_base.setdefault(pair.base, []).append(mask)
    groups = [g for g in by_base.values() if len(g) >= 2]
    for group in groups:
        say("maskhub overlap " + " ".join(group))
        registry.overlap_all(group)
    tables = query_tables(registry, hub_table_specs(names, masks, groups))
    total = time.perf_counter() - started
    result = HubStudy(prefix, pairs, masks, tables, {"total_seconds": round(total, 1)}, {},
                      [])
    result.findings = _findings(result)
    _write(result, output, str(registry.home))
    say(f"wrote {result.paths['markdown']}")
    return result


def _findings(result: HubStudy) -> list[str]:
    """One sentence per pair: this sparsity beside the paper's, and the precision null."""
    out = []
    t1 = {r["name"]: r for r in result.table("table1").records()}
    for r in result.table("pairs").records():
        paper = "" if r["paper_sparsity_pct"] is None else \
            f" (paper: {r['paper_sparsity_pct']}%)"
        null = t1.get(r["name"], {})
        extra = "" if null.get("null_share_pct") is None else \
            (f"; {null['null_share_pct']}% of the entries could not have moved at its largest "
             f"|Δ|, and among the others the sparsity is {null['sparsity_movable_pct']}%")
        out.append(f"{r['target_model']} from {r['base_model']}: {r['sparsity_pct']}% "
                   f"sparse at tol 1e-5{paper}{extra}.")
    return out


def _write(result: HubStudy, output: Path, home: str) -> None:
    """``report.md`` and ``report.json`` of a ``--from-hub`` study."""
    pairs = ",".join(f"{p.base}:{p.target}" for p in result.pairs)
    command = shlex.join(["maskhub", "--home", home, "study", "--from-hub", pairs, "--name",
                          result.prefix, "--out", str(output)])
    lines = [f"# The paper's checkpoint-only tables on Hub models: study `{result.prefix}`",
             "", f"`{command}`", "",
             f"Wall time {result.timing['total_seconds']:.1f} s (downloads included). No "
             "training: these are the tables that need only the published checkpoints "
             "(Tables 1, 2, 4 and 6). Every table is the output of the `maskhub sql` command "
             f"under it, over the registry `{home}` (masks tagged `study:{result.prefix}`).",
             "", "## What this run found", ""]
    lines += [f"- {f}" for f in result.findings]
    lines.append("")
    for table in result.tables:
        lines += [f"## {table.spec.title}", "", f"Paper: {table.spec.paper}.", ""]
        lines += _markdown_table(table)
        lines.append("")
        lines += _sql_command(table.spec.sql, home)
        lines.append("")
    md, js = output / "report.md", output / "report.json"
    md.write_text("\n".join(lines))
    js.write_text(json.dumps({
        "study": result.prefix, "command": command, "from_hub": [asdict(p) for p in result.pairs],
        "masks": result.masks, "timing": result.timing, "findings": result.findings,
        "tables": {t.spec.key: t.to_dict() for t in result.tables}}, indent=2) + "\n")
    result.paths = {"markdown": md, "json": js}
