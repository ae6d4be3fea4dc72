"""TRL #5417's ``checksum_sha256`` (the SHA-256 of the patched bf16 state, tensors' raw bytes
in order of name) is verified where a patch carries one: ``import PATCH --base`` checks it
against BASE + the patch, ``trajectory --patches`` against BASE + the whole chain (its last
patch); a mismatch is one line naming the patch, and nothing is registered."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from clitools import fail_line, run_json
from factory import llama_shapes, plant_updates, random_state, save
from safetensors.torch import save_file


def _trl_checksum(state: dict[str, torch.Tensor]) -> str:
    """TRL's ``compute_bf16_checksum``: raw bytes of every tensor, in order of name."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(state[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _trl_patch(path: Path, prev: dict[str, torch.Tensor], cur: dict[str, torch.Tensor],
               step: int, checksum: str) -> Path:
    tensors = {}
    for name, t in cur.items():
        idx = (t.view(torch.int16) != prev[name].view(torch.int16)).reshape(-1).nonzero()
        if idx.numel():
            idx = idx.reshape(-1)
            tensors[f"{name}.indices"] = idx.to(torch.int32)
            tensors[f"{name}.values"] = t.reshape(-1)[idx].contiguous()
    save_file(tensors, str(path), metadata={
        "format": "sparse_weight_patch", "version": "1", "model_version": str(step),
        "prev_model_version": str(step - 1), "checksum_sha256": checksum})
    return path


def _chain(root: Path) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    s0 = random_state(llama_shapes(layers=1), torch.bfloat16, seed=5)
    s1, _ = plant_updates(s0, 0.05, seed=6)
    s2, _ = plant_updates(s1, 0.05, seed=7)
    return save(s0, root / "base"), [s0, s1, s2]


def test_import_verifies_checksum(tmp_path: Path) -> None:
    base, (s0, s1, _) = _chain(tmp_path)
    good = _trl_patch(tmp_path / "good.safetensors", s0, s1, 1, _trl_checksum(s1))
    assert run_json("import", str(good), "--base", str(base), "--name", "g")["name"] == "g"
    stale = _trl_patch(tmp_path / "stale.safetensors", s0, s1, 1, _trl_checksum(s0))
    want = _trl_checksum(s0)
    got = _trl_checksum(s1)
    assert fail_line("import", str(stale), "--base", str(base), "--name", "s") == (
        f"Error: patch {stale}: its checksum_sha256 {want[:16]}... is not that of the "
        f"weights it leads to (BASE + this patch: {got[:16]}...); the patch is damaged or "
        f"{base} is not the checkpoint it patches")
    # TRL writes an empty checksum when it has none: nothing to verify
    empty = _trl_patch(tmp_path / "empty.safetensors", s0, s1, 1, "")
    run_json("import", str(empty), "--base", str(base), "--name", "e")
    assert [r["name"] for r in run_json("ls")] == ["e", "g"]


def test_chain_verifies_last_checksum(tmp_path: Path) -> None:
    base, (s0, s1, s2) = _chain(tmp_path)
    p1 = _trl_patch(tmp_path / "p1.safetensors", s0, s1, 1, _trl_checksum(s1))
    p2 = _trl_patch(tmp_path / "p2.safetensors", s1, s2, 2, _trl_checksum(s2))
    res = run_json("trajectory", "--patches", str(base), str(p1), str(p2), "--name", "c")
    assert res["name"] == "c"
    bad = _trl_patch(tmp_path / "bad.safetensors", s1, s2, 2, "ab" * 32)
    line = fail_line("trajectory", "--patches", str(base), str(p1), str(bad), "--name", "d")
    assert line == (
        f"Error: patch {bad}: its checksum_sha256 {'ab' * 8}... is not that of the weights "
        f"it leads to (BASE + the 2 patches of the chain: {_trl_checksum(s2)[:16]}...); the "
        f"patch is damaged or {base} is not the checkpoint it patches")
    assert not [r for r in run_json("ls") if r["name"].startswith("d-")]
