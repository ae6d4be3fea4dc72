"""``maskhub study``: the paper in miniature (wraps :func:`maskhub.study.study`)."""

from __future__ import annotations

import click

from maskhub.cli.common import command_home, echo_json, home_option, json_option, say


@click.command()
@click.option("--out", "output", type=click.Path(file_okay=True), default="maskhub-study",
              show_default=True, help="New (or empty) directory for checkpoints, figures and "
              "the report.")
@click.option("--quick", is_flag=True, help="The small size (a few minutes; what CI runs).")
@click.option("--name", help="Prefix of the registered masks (default: the first free "
              "study, study-2...).")
@json_option
@home_option
def study(output: str, quick: bool, name: str | None, as_json: bool, home: str | None) -> None:
    """Train the paper's runs in miniature (a small Qwen2 on a synthetic addition task:
    pretraining, SFT, DPO x2 seeds, GRPO, DPO without SFT, DPO on the first run's mask), with
    TRL, offline on the CPU; measure everything with maskhub into the registry; write
    OUT/report.md with every table, figure and the command that reproduces it.

    Needs the study extra: pip install 'maskhub[study]'.

    \b
    Example:
      maskhub study --quick --out study-quick
    """
    from maskhub.study import study as run_study

    report = run_study(output, quick=quick, name=name, home=command_home(home),
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
