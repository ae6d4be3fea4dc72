"""``maskhub study --from-hub``: the checkpoint-only tables on models from the Hub, through the
real huggingface_hub client and the local Hub server, with tiny bf16 models uploaded there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import fail_line, run_json
from safetensors.torch import save

from maskhub import Registry
from maskhub.study.hub import PAPER_PAIRS, parse_pairs

pytest.importorskip("trl")

pytest_plugins = ["hub_fixture"]

SHAPES = {"model.embed_tokens.weight": (32, 16), "model.layers.0.self_attn.q_proj.weight": (16, 16),
          "model.layers.0.mlp.up_proj.weight": (24, 16), "model.layers.1.self_attn.q_proj.weight":
          (16, 16), "model.norm.weight": (16,)}


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in SHAPES.items()}


def _moved(model: dict[str, torch.Tensor], seed: int, share: float) -> dict[str, torch.Tensor]:
    """``model`` with a ``share`` of each tensor's entries moved by 0.5 (far above 1e-5)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.items():
        pick = torch.rand(v.shape, generator=g) < share
        out[k] = torch.where(pick, v + 0.5, v).to(torch.bfloat16)
    return out


def _upload(server, repo: str, weights: dict[str, torch.Tensor]) -> None:
    server.commit_files(repo, {"model.safetensors": save(weights),
                               "config.json": b'{"model_type": "llama"}'})


def _sparsity(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    n = sum(v.numel() for v in a.values())
    changed = sum(int(((b[k].float() - a[k].float()).abs() > 1e-5).sum()) for k in a)
    return round(100 * (1 - changed / n), 2)


def test_from_hub_runs_the_checkpoint_only_tables(hub_server, tmp_path: Path,
                                                   maskhub_home: Path) -> None:
    base = _model(0)
    sft = _moved(base, 1, 0.9)
    rl1, rl2 = _moved(sft, 2, 0.2), _moved(sft, 3, 0.3)
    for repo, weights in (("org/base", base), ("org/sft", sft), ("org/rl1", rl1),
                          ("org/rl2", rl2)):
        _upload(hub_server, repo, weights)
    out = tmp_path / "hub"
    summary = run_json("study", "--from-hub", "org/base:org/sft, org/sft:org/rl1,org/sft:org/rl2",
                       "--out", str(out))
    names = ["hub-1-sft", "hub-2-rl1", "hub-3-rl2"]
    assert summary["masks"] == names
    report = json.loads((out / "report.json").read_text())
    assert list(report["tables"]) == ["pairs", "table1", "table6", "table2", "table4"]
    pairs = [dict(zip(report["tables"]["pairs"]["columns"], r, strict=True))
             for r in report["tables"]["pairs"]["rows"]]
    assert [(p["name"], p["base_model"], p["target_model"], p["sparsity_pct"]) for p in pairs] == [
        ("hub-1-sft", "org/base", "org/sft", _sparsity(base, sft)),
        ("hub-2-rl1", "org/sft", "org/rl1", _sparsity(sft, rl1)),
        ("hub-3-rl2", "org/sft", "org/rl2", _sparsity(sft, rl2))]
    assert all(p["base_revision"] and p["paper_sparsity_pct"] is None for p in pairs)
    # the overlap of the two masks that share org/sft: the entries both moved
    table4 = report["tables"]["table4"]
    row = dict(zip(table4["columns"], table4["rows"][0], strict=True))
    both = sum(int((((rl1[k].float() - sft[k].float()).abs() > 1e-5)
                    & ((rl2[k].float() - sft[k].float()).abs() > 1e-5)).sum()) for k in sft)
    n1 = Registry(maskhub_home).get("hub-2-rl1").n_updated
    assert (row["name_a"], row["name_b"], row["o1"]) == ("hub-2-rl1", "hub-3-rl2",
                                                         round(100 * both / n1, 2))
    # every table is its query over the registry
    for key, table in report["tables"].items():
        rows = run_json("--home", str(maskhub_home), "sql", table["sql"])
        assert [list(r.values()) for r in rows] == table["rows"], key
    md = (out / "report.md").read_text()
    assert "## The pairs: update sparsity (%) at tol 1e-5 beside the paper's" in md
    assert report["command"].endswith("--from-hub org/base:org/sft,org/sft:org/rl1,"
                                      f"org/sft:org/rl2 --name hub --out {out}")


def test_from_hub_pairs_and_errors(tmp_path: Path) -> None:
    pairs = parse_pairs("paper")
    assert pairs == list(PAPER_PAIRS) and len(pairs) == 7
    tulu = parse_pairs("allenai/Llama-3.1-Tulu-3-8B-SFT:allenai/Llama-3.1-Tulu-3-8B-DPO")
    assert [(p.stage, p.paper_sparsity) for p in tulu] == [("rl", 81.38)]
    assert fail_line("study", "--from-hub", "org/a", "--out", str(tmp_path / "x")) == (
        "Error: --from-hub takes 'paper' or comma-separated BASE:TARGET pairs (e.g. "
        "allenai/Llama-3.1-Tulu-3-8B-SFT:allenai/Llama-3.1-Tulu-3-8B-DPO), not 'org/a'")
    assert fail_line("study", "--from-hub", "paper", "--lr", "1e-5", "--out",
                     str(tmp_path / "x")) == \
        "Error: --from-hub trains nothing; it cannot go with --lr"
    assert fail_line("study", "--from-hub", "a:b", "--name", "no/slash", "--out",
                     str(tmp_path / "x")).startswith(
        "Error: --name 'no/slash' cannot prefix the study's masks: invalid mask name")
    assert not (tmp_path / "x").exists()
