"""``maskhub study``: the paper in miniature (wraps :func:`maskhub.study.study`)."""

from __future__ import annotations

import click

from maskhub.cli.common import command_home, echo_json, home_option, json_option, say


@click.command()
@click.option("--out", "output", type=click.Path(file_okay=True), default="maskhub-study",
              show_default=True, help="New (or empty) directory for checkpoints, figures and "
              "the report.")
@click.option("--quick", is_flag=True, help="The small size (what CI runs); same as --size quick.")
@click.option("--size", type=click.Choice(["default", "quick"]),
              help="The model and task size (default: default).")
@click.option("--lr", type=float, help="The RL learning rate (DPO, GRPO and the equal-budget "
              "SFT controls), instead of the size's (default 2e-6; quick 5e-6).")
@click.option("--steps", type=int, help="The RL steps (DPO, GRPO and the equal-budget SFT "
              "controls), instead of the size's (default 60 DPO / 80 GRPO; quick 20).")
@click.option("--seeds", type=int,
              help="Train DPO, GRPO and the equal-budget SFT control from θ_sft with this many "
              "seeds (1-10; default 2, quick 1; DPO always has two); the seeds table and the "
              "verdicts give the mean and min-max across them.")
@click.option("--from-hub", "from_hub", metavar="PAIRS",
              help="No training: the checkpoint-only tables (1, 2, 4, 6) of 'paper' (the "
              "paper's public pairs, docs/study.md) or of comma-separated BASE:TARGET pairs "
              "(Hub repo ids org/name[@revision] or local checkpoints).")
@click.option("--name", help="Prefix of the registered masks (default: the first free "
              "study, study-2...).")
@json_option
@home_option
def study(output: str, quick: bool, size: str | None, lr: float | None, steps: int | None,
          seeds: int | None, from_hub: str | None, name: str | None, as_json: bool,
          home: str | None) -> None:
    """Train the paper's runs in miniature (a small Qwen2 on a synthetic addition task:
    pretraining, SFT, DPO x2 seeds, GRPO, DPO without SFT, DPO on the first run's mask, and
    the controls: equal-budget SFT, a random mask, each run's fp32 masters), with TRL, offline
    on the CPU (a GPU when torch sees one); measure everything with maskhub into the
    registry; write OUT/report.md (verdicts first) with every table, figure and the command
    that reproduces it.

    Needs the study extra: pip install 'maskhub[study]'.

    \b
    Example:
      maskhub study --quick --out study-quick
      maskhub study --lr 1e-5 --steps 40 --out study-lr1e-5
      maskhub study --from-hub paper --out paper-tables
    """
    from maskhub.study import study as run_study

    report = run_study(output, quick=quick, size=size, lr=lr, steps=steps, seeds=seeds,
                       from_hub=from_hub, name=name, home=command_home(home),
                       say=lambda line: say(line, err=True))
    if as_json:
        echo_json({"markdown": str(report.paths["markdown"]), "json": str(report.paths["json"]),
                   "masks": report.masks, "timing": report.timing,
                   "findings": report.findings})
        return
    for line in report.findings:
        say(f"- {line}")
    say(f"report: {report.paths['markdown']}")


COMMANDS = [study]
