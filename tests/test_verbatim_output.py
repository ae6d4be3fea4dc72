"""Every table and line maskhub prints shows data verbatim and harmless: no markup, no emoji
codes, control and bidi characters escaped, long values cut; ``--json`` and ``--format csv``
keep values exact (issue 21, item 2). Also ``ls --limit/--sort`` (issue 25, item 5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner, Result

from maskhub import Registry
from maskhub.cli import main
from maskhub.cli.text import visible

ESC_NOTES = "a[/]b [bold]x[/bold] :x: \x1b[31mred\x1b[0m\nline2\x07\r\u202eevil"
ESC_SHOWN = "a[/]b [bold]x[/bold] :x: \\x1b[31mred\\x1b[0m\\nline2\\x07\\r\\u202eevil"


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def ok(*args: str) -> Result:
    res = cli(*args)
    assert res.exit_code == 0 and res.exception is None, res.output
    return res


def add(reg: Registry, name: str, seed: int, **kwargs: object) -> None:
    rng = np.random.default_rng(seed)
    reg.add({"model.layers.0.mlp.up_proj.weight": rng.random((4, 8)) < 0.25 + 0.05 * seed},
            name=name, base_model="org/sft", seed=seed, **kwargs)


@pytest.fixture
def reg() -> Registry:
    """Three masks whose text fields hold markup, emoji codes and terminal escapes."""
    reg = Registry()
    add(reg, "plain", 1, algorithm="dpo")
    add(reg, "marked", 2, algorithm="grpo[beta=0.04]", dataset=":x: \x1b]0;title\x07",
        tags=["[red]t[/red]"], notes=ESC_NOTES)
    add(reg, "long", 3, algorithm="ppo", notes="n" * 100_000)
    return reg


def test_visible_escapes_what_acts_on_a_terminal() -> None:
    assert visible("a\x1bb\x07\x08\t\r\n\x00\x7f\x9b\u202e\u2066\u200f\u2028\ufeffz") == (
        "a\\x1bb\\x07\\x08\\t\\r\\n\\x00\\x7f\\x9b\\u202e\\u2066\\u200f\\u2028\\ufeffz")
    assert visible("[bold]:x: 漢字 é \\n") == "[bold]:x: 漢字 é \\n"


def test_sql_tables_show_values_as_typed() -> None:
    out = ok("sql", "select 'a[/]b' as x, 'grpo[beta=0.04]' as \"[red]c\", ':x:' as e").stdout
    assert out.splitlines() == ["x     ┃ [red]c          ┃ e",
                                "━━━━━━╇━━━━━━━━━━━━━━━━━╇━━━━",
                                "a[/]b │ grpo[beta=0.04] │ :x:"]
    out = ok("sql", "select 'a' || chr(27) || '[31mb' || chr(10) || 'c' || chr(7) || chr(13) "
                    "|| chr(8238) || 'd' as v").stdout
    assert out.splitlines()[2] == "a\\x1b[31mb\\nc\\x07\\r\\u202ed"
    lines = ok("sql", "select repeat('x', 100000) as v").stdout.splitlines()
    assert len(lines) == 3 and lines[2] == "x" * 119 + "…"


def test_show_ls_and_summarize_with_hostile_text(reg: Registry) -> None:
    lines = ok("show", "marked").stdout.splitlines()
    assert "algorithm    │ grpo[beta=0.04]" in lines
    assert "dataset      │ :x: \\x1b]0;title\\x07" in lines
    assert "tags         │ [red]t[/red]" in lines
    assert f"notes        │ {ESC_SHOWN}" in lines
    assert all("\x1b" not in line and "\x07" not in line for line in lines)
    notes = next(line for line in ok("show", "long").stdout.splitlines()
                 if line.startswith("notes"))
    assert notes == "notes        │ " + "n" * 119 + "…"
    out = ok("ls").stdout
    assert len(out.splitlines()) == 5
    assert "grpo[beta=0.04] │ 2    │ :x: \\x1b]0;title\\x07" in out
    summary = ok("sql", "summarize masks").stdout
    n_columns = reg.sql("select count(*) from (describe masks)")[1][0][0]
    assert "\x1b" not in summary and len(summary.splitlines()) == 2 + n_columns
    # Machine output keeps the raw values.
    rows = {r["name"]: r for r in json.loads(ok("ls", "--json").stdout)}
    assert rows["marked"]["notes"] == ESC_NOTES and rows["long"]["notes"] == "n" * 100_000
    assert json.loads(ok("show", "marked", "--json").stdout)["mask"]["dataset"] == (
        ":x: \x1b]0;title\x07")


def test_csv_and_json_keep_values_exact(reg: Registry) -> None:
    query = ("select 1.0/3 as third, 0.1234567890123456789::decimal(38,19) as d, "
             "[0.1, 2.0]::double[] as l, 'a' || chr(10) || 'b' as nl, 1e300 * 10 as big")
    assert ok("sql", query, "--format", "csv").stdout == (
        'third,d,l,nl,big\n0.3333333333333333,0.1234567890123456789,"[0.1, 2.0]","a\nb",'
        "1e+301\n")
    assert json.loads(ok("sql", query, "--json").stdout) == [
        {"third": 1 / 3, "d": "0.1234567890123456789", "l": [0.1, 2.0], "nl": "a\nb",
         "big": 1e301}]
    csv_notes = ok("sql", "select notes from masks where name = 'marked'", "--format",
                   "csv").stdout
    assert csv_notes == 'notes\n"' + ESC_NOTES + '"\n'


def test_error_lines_are_one_harmless_line(reg: Registry) -> None:
    res = cli("ls", "--where", '"a\x1b[31m\x07\u202eb" = 1')
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr.splitlines() == [
        'Error: SQL error: Binder Error: Referenced column "a\\x1b[31m\\x07\\u202eb" not found '
        "in FROM clause!"]
    res = cli("show", "no\nsuch\x1b")
    assert res.exit_code == 1 and res.stderr.splitlines() == [
        "Error: no mask named 'no\\nsuch\\x1b' (see `maskhub ls`)"]


def test_ls_limit_sort_and_footer(reg: Registry) -> None:
    for i in range(4):
        add(reg, f"extra-{i}", 10 + i, algorithm="dpo")
    res = ok("ls", "--limit", "2", "--sort", "name")
    assert [line.split(" │ ")[0].strip() for line in res.stdout.splitlines()[2:]] == [
        "extra-0", "extra-1"]
    assert res.stderr == "2 of 7 masks shown, 5 more: --limit 0 shows all\n"
    res = ok("ls", "--sort=-name", "--limit", "3")
    assert [line.split(" │ ")[0].strip() for line in res.stdout.splitlines()[2:]] == [
        "plain", "marked", "long"]
    res = ok("ls", "--sort", "name", "--desc", "--limit", "1", "--where", "algorithm = 'dpo'")
    assert res.stdout.splitlines()[2].startswith("plain ")
    assert res.stderr == "1 of 5 masks shown, 4 more: --limit 0 shows all\n"
    res = ok("ls", "--limit", "0")
    assert len(res.stdout.splitlines()) == 2 + 7 and res.stderr == ""
    assert len(json.loads(ok("ls", "--json").stdout)) == 7  # --json: all unless --limit
    seeds = [r["seed"] for r in json.loads(ok("ls", "--json", "--sort", "seed",
                                              "--limit", "3").stdout)]
    assert seeds == [1, 2, 3]
    assert [r["name"] for r in reg.ls(sort="-seed", limit=2)] == ["extra-3", "extra-2"]
    assert reg.ls(limit=2).total == 7
    res = cli("ls", "--sort", "bogus")
    assert res.exit_code == 1 and res.stderr == (
        "Error: cannot sort by 'bogus': not a column of masks (one of id, name, base_model, "
        "base_revision, target_model, target_revision, algorithm, seed, dataset, tol, dtype, "
        "n_params, n_updated, sparsity, created_at, hub_repo, hub_revision, tags, n_tensors, "
        "format_version, operation, parents, notes)\n")
    res = cli("ls", "--where", "name = 'nothing'")
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == "no masks match --where\n"
