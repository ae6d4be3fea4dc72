"""Diffing checkpoints that live on the Hub, through the real huggingface_hub client and the
test Hub server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from factory import make_pair
from safetensors.torch import save

from maskhub import Registry
from maskhub.cli import main

pytest_plugins = ["hub_fixture"]


def _upload_dir(server, repo_id: str, directory: Path, message: str = "weights") -> str:
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    files["config.json"] = b'{"model_type": "llama"}'
    files["pytorch_model.bin"] = b"never downloaded"
    return server.commit_files(repo_id, files, message=message)


def test_diff_hub_repos_records_commit_shas(hub_server, tmp_path: Path) -> None:
    base, target, planted = make_pair(tmp_path, density=0.1, shards=2)
    base_sha = _upload_dir(hub_server, "org/sft", base)
    target_sha = _upload_dir(hub_server, "org/dpo", target)
    res = CliRunner().invoke(main, ["diff", "org/sft", "org/dpo@main", "--name", "hubdiff",
                                    "--algorithm", "dpo", "--json"])
    assert res.exit_code == 0, res.output
    mask = Registry().get("hubdiff")
    row = mask.row
    assert (row["base_model"], row["base_revision"]) == ("org/sft", base_sha)
    assert (row["target_model"], row["target_revision"]) == ("org/dpo", target_sha)
    for name, expect in planted.items():
        assert np.array_equal(mask[name], expect), name
    # Only safetensors, the index and config were fetched: never the pickle file.
    fetched = [p for m, p in hub_server.requests if m == "GET" and "/resolve/" in p]
    assert fetched and not any(p.endswith(".bin") for p in fetched)


def test_diff_pins_an_older_revision(hub_server, tmp_path: Path) -> None:
    base, target, planted = make_pair(tmp_path, density=0.1)
    _upload_dir(hub_server, "org/base", base)
    first = _upload_dir(hub_server, "org/run", target, "step 100")
    _upload_dir(hub_server, "org/run", base, "reverted")  # main now equals the base
    reg = Registry()
    now = reg.diff("org/base", "org/run", name="now")
    assert now.n_updated == 0
    old = reg.diff("org/base", f"org/run@{first}", name="old")
    assert old.n_updated == sum(int(m.sum()) for m in planted.values())
    assert old.row["target_revision"] == first


def _one_line_error(args: list[str], *needles: str) -> None:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    # huggingface_hub's download bars may precede it on stderr; the message is one line.
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1 and res.output.rstrip().endswith(lines[0]), res.output
    for n in needles:
        assert n in lines[0], lines[0]
    assert Registry().ls() == []


def test_unknown_hub_repo_and_revision(hub_server, tmp_path: Path) -> None:
    base, _, _ = make_pair(tmp_path)
    _upload_dir(hub_server, "org/base", base)
    _one_line_error(["diff", "org/base", "org/nope"], "org/nope", "not found")
    _one_line_error(["diff", "org/base", "org/base@v9"], "revision 'v9' not found")


def test_pickle_only_hub_repo_refused(hub_server, tmp_path: Path) -> None:
    base, _, _ = make_pair(tmp_path)
    _upload_dir(hub_server, "org/base", base)
    hub_server.commit_files("org/old", {"pytorch_model.bin": b"\x80\x04pickle",
                                        "config.json": b"{}"})
    _one_line_error(["diff", "org/base", "org/old"], "only pickle weights", "safetensors")


def test_hub_checkpoint_works_offline_once_cached(hub_server, tmp_path: Path,
                                                  monkeypatch) -> None:
    from huggingface_hub import constants

    base, target, _ = make_pair(tmp_path)
    _upload_dir(hub_server, "org/base", base)
    sha = _upload_dir(hub_server, "org/tgt", target)
    reg = Registry()
    first = reg.diff("org/base", "org/tgt", name="online")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = reg.diff("org/base", f"org/tgt@{sha}", name="offline")
    assert again.n_updated == first.n_updated
    offline_res = CliRunner().invoke(main, ["diff", "org/base", "org/other"])
    assert offline_res.exit_code == 1
    assert "HF_HUB_OFFLINE" in offline_res.output or \
        "cannot be reached" in offline_res.output


def test_single_file_on_hub(hub_server, tmp_path: Path) -> None:
    a = {"w": torch.zeros(10, dtype=torch.bfloat16)}
    b = {"w": torch.arange(10, dtype=torch.bfloat16) % 2}
    hub_server.commit_files("u/a", {"model.safetensors": save(a)})
    hub_server.commit_files("u/b", {"model.safetensors": save(b)})
    out = CliRunner().invoke(main, ["diff", "u/a", "u/b", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["n_updated"] == 5
