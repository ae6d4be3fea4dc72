"""The study's report: ``report.md`` (each table beside the paper's, with the command that
reproduces it) and ``report.json`` (the same tables as rows, the timings, the figures)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskhub.registry.api import Registry
from maskhub.study.measure import FIGURE3_RUNS, TRAJECTORY_RUNS
from maskhub.study.tables import TableSpec


@dataclass
class Table:
    """A :class:`TableSpec` with the rows the registry returned for it."""

    spec: TableSpec
    columns: list[str]
    rows: list[list[Any]]

    def to_dict(self) -> dict[str, Any]:
        """JSON form: title, paper, sql, columns, rows."""
        return {"title": self.spec.title, "paper": self.spec.paper, "sql": self.spec.sql,
                "columns": self.columns, "rows": self.rows}

    def records(self) -> list[dict[str, Any]]:
        """The rows as ``{column: value}``."""
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


@dataclass
class StudyReport:
    """Everything the report says; :meth:`write` puts it on disk."""

    prefix: str
    header: dict[str, Any]
    tables: list[Table]
    figures: dict[str, Path]
    timing: dict[str, float]
    masks: list[str]
    findings: list[str] = field(default_factory=list)
    verdicts: list[Any] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)

    def table(self, key: str) -> Table:
        """The table ``key``."""
        return next(t for t in self.tables if t.spec.key == key)

    def to_dict(self, root: Path) -> dict[str, Any]:
        """JSON form (figure paths relative to ``root``)."""
        return {"study": self.prefix, **self.header, "masks": self.masks,
                "timing": self.timing, "verdicts": [v.to_dict() for v in self.verdicts],
                "findings": self.findings,
                "figures": {k: str(p.relative_to(root)) for k, p in self.figures.items()},
                "tables": {t.spec.key: t.to_dict() for t in self.tables}}


def query_tables(registry: Registry, specs: list[TableSpec]) -> list[Table]:
    """Run every table's query."""
    tables = []
    for spec in specs:
        columns, rows = registry.sql(spec.sql)
        tables.append(Table(spec, list(columns), [list(r) for r in rows]))
    return tables


def _cell(value: Any) -> str:
    """A value as the Markdown table shows it (``None`` as an empty cell)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e-3 and value else f"{value:,.10g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _markdown_table(table: Table) -> list[str]:
    """The lines of ``table`` as a Markdown table."""
    lines = ["| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.rows]
    return lines


def _sql_command(sql: str, home: str) -> list[str]:
    """The shell lines that run ``sql`` with ``maskhub sql`` (a quoted here-document)."""
    return ["```sh", f"maskhub --home {shlex.quote(home)} sql \"$(cat <<'SQL'", sql, "SQL",
            ")\"", "```"]


#: Which figure goes with which table (the keys :meth:`Measurer.draw` gives them).
FIGURES_OF = {"figure3_layers": tuple(f"figure3-{r}" for r in FIGURE3_RUNS),
              "table4": ("table4-overlap",),
              "figure5": tuple(f"figure5-{r}" for r in TRAJECTORY_RUNS),
              "curve": ("curves",)}

DIFFERENCES = """\
- **Size.** A {n_params:,}-parameter Qwen2 on two-number addition, not 7B-70B models on
  math and chat data; the longest run here took {longest:.0f} s. The default size has
  731,264 parameters, the quick one 93,248: at ~5M parameters a training step costs ~0.5 s
  on 2 CPU cores, which does not fit a 15-minute budget with six RL runs.
- **bf16 rounding floor.** Checkpoints are bf16 (training keeps fp32 master weights), as the
  paper's are. A bf16 weight moves only when its fp32 master crosses a rounding boundary, so an
  entry is either bit-identical or moved by at least one bf16 step (2^-8 of its magnitude,
  ~1e-4 for a typical weight here). Adam moves every weight with a gradient by about the
  learning rate per step, so at this size the learning rate and the step count decide the
  sparsity: {rates_sentence} At the first rates tried (DPO 2e-4, GRPO 5e-5) the same runs
  updated 88-96% of the weights (docs/study.md has the measured sweep). The paper's 7B runs
  sit in the same regime (5e-7 for PRIME). The 1e-5 tolerance is below one bf16 step of most
  weights, so Table 6 stays flat until the tolerance reaches the step size. The precision
  null (Table 1) counts the entries that could not have moved at all at the run's largest
  |Δ|, and the equal-budget SFT controls show what plain SFT does with the same budget.
- **DPO with an SFT term.** Plain sigmoid DPO lowered this model's accuracy at every learning
  rate tried (it lowers the chosen answers' likelihood too), so the DPO runs add the NLL of the
  chosen answer (TRL `loss_type=["sigmoid", "sft"]`, as in RPO). The pairs come from θ_sft's own
  samples (chosen: the correct sum; rejected: a wrong sample), for every DPO run including the
  no-SFT one, which is therefore trained on data out of θ_pre's distribution (Table 5's setting).
- **GRPO without KL** (β = 0), a 0/1 exact-match reward, {grpo_generations} completions per
  prompt; the paper's PRIME/PPO runs use learned rewards and critics.
- **Pretraining corpus.** θ_pre is trained on a stream of noisy sums over all operand pairs;
  SFT and RL see only the train problems, accuracy is reported on held-out problems and on up
  to 200 train problems.
- **Trajectories recorded live.** The trajectories of Figures 2 and 5-7 were recorded while
  their runs trained (`maskhub.torch.Recorder` in a Trainer callback, every {record_every}
  steps and at the last step): no intermediate checkpoint was written; each run saved only
  its start and final bf16 checkpoints (graded, diffed, verified). The recorder watched a bf16
  view of the fp32 master weights (the same cast as the checkpoints), so each point is the
  mask the bf16 checkpoint of that step would give, bit for bit, and "vs previous" counts the
  entries changed since the previous point. Recording took {record_seconds:.1f} s in all
  (counted as maskhub time).
- **fp32 controls.** The unmasked RL runs and the equal-budget controls also saved their
  fp32 master weights at the last step (`checkpoints/RUN/fp32-step-NNNN`, and
  `checkpoints/pre-fp32`, `sft-fp32` for the starts); the diff of those is each run's fp32
  control (`PREFIX-RUN-fp32`, tagged `fp32-control`), set beside its bf16 mask in the fp32
  table and the verdict table (`maskhub show MASK --control MASK-fp32` does it for one mask).
  The paper measures bf16 checkpoints only.
- **Loss/accuracy curves.** At each recorded point of the trajectory runs the bf16 view is
  also graded (held-out accuracy and held-out answer loss; {curve_seconds:.1f} s in all,
  inside the training time); the last point is the run's saved checkpoint.
- **Masked runs.** θ_sub repeats dpo-s0 (same seed, pairs, order and hyperparameters) with
  dpo-s0's own mask, once through the masked optimizer and once through the Trainer callback.
"""


def _rates(size: dict[str, Any], flags: list[str]) -> str:
    """The sentence on the RL learning rates: only the default size's were chosen by a
    sweep (the quick size's are not tuned; ``--lr`` sets them)."""
    rates = f"{size['dpo_lr']:g} for DPO, {size['grpo_lr']:g} for GRPO"
    if "--lr" in flags:
        return (f"the RL rates here ({rates}) were set with --lr (the {size['name']} size's "
                "own were not used).")
    if size["name"] == "default":
        return (f"the RL rates here ({rates}) were chosen on this size as the sparsest that "
                "still raised the held-out accuracy by over 5 points when chosen.")
    return (f"the RL rates of the {size['name']} size ({rates}) were not tuned; they make "
            "runs of a few steps move at all.")


def write_report(report: StudyReport, output: Path, home: str) -> dict[str, Path]:
    """Write ``report.md`` and ``report.json`` under ``output``; return their paths."""
    h = report.header
    lines = [f"# The paper in miniature: study `{report.prefix}`", "",
             f"`{h['command']}`, size **{h['size']['name']}**: a Qwen2 causal LM of "
             f"{h['n_params']:,} parameters (hidden {h['size']['hidden']}, "
             f"{h['size']['layers']} layers), task `a+b=` with operands "
             f"0..{h['size']['max_operand'] - 1} ({h['n_train']} train problems, "
             f"{h['n_heldout']} held out), seed {h['seed']}, "
             f"{h['size'].get('seeds', 1)} seed(s) of the RL runs from θ_sft, trained on "
             f"{'the CPU' if h.get('device', 'cpu') == 'cpu' else 'the GPU'}.",
             "",
             f"Wall time {report.timing['total_seconds']:.1f} s: training "
             f"{report.timing['training_seconds']:.1f} s, maskhub measurements "
             f"{report.timing['maskhub_seconds']:.1f} s, other (library imports, "
             "tokenizer, set-up) "
             f"{report.timing['other_seconds']:.1f} s.", "",
             f"Everything below is in the registry `{home}` (masks tagged `{h['tag']}`): each "
             "table is the output of the `maskhub sql` command under it, and each run's facts "
             "are the JSON `notes` of its mask.", "",
             "## Verdicts", "",
             "Each claim of the paper beside this run and its control (rules: "
             "`maskhub.study.verdicts`; percent throughout).", "",
             "| claim | paper | this run | control | verdict | why |",
             "|---|---|---|---|---|---|",
             *[f"| {v.claim} | {v.paper} | {v.this_run} | {v.control} | **{v.verdict}** | "
               f"{v.why} |" for v in report.verdicts], "",
             "## What this run found", "",
             "These are this run's results, not invariants; they can differ with the size, the "
             "seed and the machine.", ""]
    lines += [f"- {f}" for f in report.findings]
    lines += ["", "## Where the miniature differs from the paper", "",
              DIFFERENCES.format(n_params=h["n_params"],
                                 rates_sentence=_rates(h["size"], h.get("flags", [])),
                                 longest=max(v for k, v in report.timing.items()
                                             if k.startswith("train_")),
                                 grpo_generations=h["size"]["grpo_generations"],
                                 record_every=h["size"]["record_every"],
                                 record_seconds=report.timing["record_seconds"],
                                 curve_seconds=report.timing.get("curve_seconds", 0.0))]
    for table in report.tables:
        lines += [f"## {table.spec.title}", "", f"Paper: {table.spec.paper}.", ""]
        lines += _markdown_table(table)
        lines.append("")
        for key in FIGURES_OF.get(table.spec.key, ()):
            if key in report.figures:
                rel = report.figures[key].relative_to(output)
                lines += [f"![{key}]({rel})", ""]
        lines += _sql_command(table.spec.sql, home)
        lines.append("")
    lines += ["## Reproduce the measurements", "",
              "The registry holds every mask; these commands recompute what the tables show "
              "(paths relative to the study directory):", "", "```sh"]
    lines += [c for c in h["commands"]]
    lines += ["```", ""]
    md = output / "report.md"
    md.write_text("\n".join(lines))
    js = output / "report.json"
    js.write_text(json.dumps(report.to_dict(output), indent=2, sort_keys=False) + "\n")
    report.paths = {"markdown": md, "json": js}
    return report.paths
