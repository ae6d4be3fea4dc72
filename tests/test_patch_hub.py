"""A patch on the Hub: push carries the values, the card gives the command that rebuilds the
target, pull verifies the values like every other file, and ``maskhub apply org/repo BASE
OUT`` pulls and rebuilds the target bit for bit (local Hub server, real huggingface_hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clitools import fail_line, run_json
from hubserver import HubServer
from test_patch import make_pair, tensor_bits

pytest_plugins = ["hub_fixture"]
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>'.*:DeprecationWarning")

REPO = "alice/toy-grpo-patch"


@pytest.fixture
def pushed(hub_server: HubServer, tmp_path: Path) -> tuple[Path, Path]:
    base, target = make_pair(tmp_path)
    run_json("diff", str(base), str(target), "--patch", "--name", "p", "--base-model",
             "toy/base", "--target-model", "toy/grpo")
    run_json("push", "p", REPO)
    return base, target


def test_push_carries_values_and_card_says_how_to_rebuild(
        pushed: tuple[Path, Path], hub_server: HubServer) -> None:
    manifest = json.loads(hub_server.file_bytes(REPO, "maskhub.json"))
    values = sorted(p for p in manifest["files"] if p.startswith("mask.zarr/values/"))
    assert "mask.zarr/values/special/c/0" in values
    assert "mask.zarr/values/h.0.mixed/zarr.json" in values
    assert manifest["mask"]["has_values"] is True
    card = hub_server.file_bytes(REPO, "README.md").decode()
    assert ("This repo is a patch: it also holds the values of `toy/grpo` at the updated "
            "entries, so it rebuilds `toy/grpo` from `toy/base` bit for bit, one tensor at a "
            "time:") in card
    # issue 26: the install line is the project's own (no `pip install maskhub`: that name
    # on a package index is not this project's)
    assert "pip install maskhub" not in card
    assert (f"# maskhub 0.1.0 is not published on a package index: install it from its "
            f"source tree (pip install -e .)\nmaskhub apply {REPO} toy/base ./grpo") in card
    assert "tags:\n- maskhub\n- update-mask\n- patch\n" in card


def test_apply_hub_id_pulls_and_rebuilds(pushed: tuple[Path, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    base, target = pushed
    monkeypatch.setenv("MASKHUB_HOME", str(tmp_path / "fresh"))
    res = run_json("apply", REPO, str(base), str(tmp_path / "out"))
    assert res["mask"] == "p" and res["exact"] is True
    assert tensor_bits(tmp_path / "out") == tensor_bits(target / "model.safetensors")
    assert [r["has_values"] for r in run_json("ls")] == [True]


def test_pull_refuses_a_tampered_values_chunk(pushed: tuple[Path, Path], tmp_path: Path,
                                              hub_server: HubServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    base, _ = pushed
    path = "mask.zarr/values/emb.weight/c/0"
    bad = bytearray(hub_server.file_bytes(REPO, path))
    bad[len(bad) // 2] ^= 0x01
    hub_server.tamper(REPO, path, bytes(bad))
    monkeypatch.setenv("MASKHUB_HOME", str(tmp_path / "fresh"))
    line = fail_line("apply", REPO, str(base), str(tmp_path / "out"))
    assert f"checksum mismatch for {path}" in line
    assert not (tmp_path / "out").exists()
