"""``--home`` as a global option (``maskhub --home DIR ls``) and on each command; the
command's own wins over the global one, which wins over ``MASKHUB_HOME``."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from factory import llama_shapes, plant_updates, random_state, save

from maskhub import Registry
from maskhub.cli import main


def names(*args: str) -> list[str]:
    """Mask names listed by ``maskhub ARGS ls --json`` (with ARGS before or after ``ls``)."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return [r["name"] for r in json.loads(result.stdout)]


def test_global_and_command_home(tmp_path: Path, maskhub_home: Path) -> None:
    state = random_state(llama_shapes())
    target, _ = plant_updates(state, 0.1)
    save(state, tmp_path / "a.safetensors")
    save(target, tmp_path / "b.safetensors")
    other, third = tmp_path / "other", tmp_path / "third"
    Registry(maskhub_home).diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                                name="in-env-home")
    Registry(other).diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                         name="in-other")
    assert names("ls", "--json") == ["in-env-home"]
    assert names("--home", str(other), "ls", "--json") == ["in-other"]
    assert names("--home", str(other), "ls", "--json", "--home", str(maskhub_home)) == \
        ["in-env-home"]
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    result = CliRunner().invoke(main, ["--home", str(third), "diff", a, b, "--name", "new"])
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in Registry(third).ls()] == ["new"]
    assert names("ls", "--json") == ["in-env-home"]


def test_failed_schema_migration_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    """An index that an unexpected schema change left behind (migration 9 recorded as not
    applied while its column exists, as another maskhub version could leave it): the upgrade
    fails in one line naming the migration and the home, and the masks are untouched."""
    import duckdb
    from clitools import fail_line

    state = random_state(llama_shapes())
    target, _ = plant_updates(state, 0.1)
    save(state, tmp_path / "a.safetensors")
    save(target, tmp_path / "b.safetensors")
    home = tmp_path / "home"
    Registry(home).diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", name="kept")
    db = home / "registry.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute("DELETE FROM schema_migrations WHERE number = 9")
    line = fail_line("--home", str(home), "ls")
    assert line.startswith(f"Error: cannot use {home} as the maskhub home: its index cannot "
                           "take schema migration 9 (masks.has_values"), line
    assert "was it written by another maskhub version?" in line
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT name FROM masks").fetchall() == [("kept",)]
        assert 9 not in {r[0] for r in con.execute("SELECT number FROM schema_migrations")
                         .fetchall()}
