"""CLI helpers shared by the tests: run a command through click's runner and check the
outcome the way a user sees it."""

from __future__ import annotations

import json

from click.testing import CliRunner, Result

from maskhub.cli import main


def run_json(*args: str) -> dict | list:
    """Run ``maskhub ARGS --json``; it must succeed; return the parsed output."""
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def fail_line(*args: str) -> str:
    """Run ``maskhub ARGS``; it must fail with exit 1 and one ``Error:`` line; return it."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def cli(*args: str) -> Result:
    """Run ``maskhub ARGS`` through click's runner; return the result unchecked."""
    return CliRunner().invoke(main, list(args))


def ok(*args: str) -> str:
    """Run ``maskhub ARGS``; it must succeed; return its stdout."""
    res = cli(*args)
    assert res.exit_code == 0 and res.exception is None, res.output
    return res.stdout
