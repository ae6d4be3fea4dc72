"""Plots: a mask's layer x module sparsity heatmap and an overlap matrix, as PNG files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from test_overlap import fail, register_bits, run

from maskhub import Registry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _llama_masks(reg: Registry, n: int) -> None:
    rng = np.random.default_rng(4)
    shapes = {"model.embed_tokens.weight": (32, 16), "model.norm.weight": (16,),
              "lm_head.weight": (32, 16)}
    for layer in range(4):
        for module, shape in (("input_layernorm", (16,)), ("self_attn.q_proj", (16, 16)),
                              ("self_attn.v_proj", (16, 16)), ("mlp.up_proj", (24, 16))):
            shapes[f"model.layers.{layer}.{module}.weight"] = shape
    core = {k: rng.random(s) < 0.15 for k, s in shapes.items()}
    for i in range(n):
        bits = {k: (core[k] | (rng.random(s) < 0.05 * (i + 1))) & ("norm" not in k)
                for k, s in shapes.items()}
        register_bits(reg, f"run{i}", bits)


def test_sparsity_heatmap_png(tmp_path: Path):
    reg = Registry()
    _llama_masks(reg, 1)
    out = tmp_path / "figs" / "run0.png"
    info = run("plot", "run0", "-o", str(out), "--size", "900x500", "--json")
    assert info == {"path": str(out), "kind": "sparsity", "bytes": out.stat().st_size}
    assert out.stat().st_size > 10_000
    assert png_size(out) == (900, 500)
    default = tmp_path / "default.png"
    reg.plot(["run0"], default)
    assert png_size(default) == (800, 450)  # 4 layers x 4 modules: the minimum size
    assert not list((tmp_path / "figs").glob(".*partial"))


def test_overlap_matrix_png(tmp_path: Path):
    reg = Registry()
    _llama_masks(reg, 3)
    out = tmp_path / "overlap.png"
    text = run("plot", "run0", "run1", "run2", "-o", str(out), "--size", "1000x800",
               "--baseline", "uniform")
    assert text.strip() == f"wrote {out}"
    assert png_size(out) == (1000, 800) and out.stat().st_size > 10_000
    assert reg.sql('SELECT count(*) FROM "overlaps"')[1] == [(3,)]  # the pass was stored
    by_model = tmp_path / "by-model.png"
    run("plot", "--base-model", "org/base-model", "-o", str(by_model))
    assert png_size(by_model) == (720, 600)  # default for 3 masks: 600 high, 120 wider
    svg = tmp_path / "overlap.svg"
    run("plot", "run0", "run1", "-o", str(svg))
    assert svg.read_text().lstrip().startswith("<?xml")


def test_plot_errors(tmp_path: Path):
    reg = Registry()
    _llama_masks(reg, 2)
    assert "--size takes WIDTHxHEIGHT" in fail("plot", "run0", "--size", "big")
    assert "between 100 and 20000" in fail("plot", "run0", "--size", "50x50")
    assert "exactly one mask" in fail("plot", "run0", "run1", "--kind", "sparsity")
    assert "cannot write a 'xyz' figure" in fail("plot", "run0", "-o",
                                                 str(tmp_path / "a.xyz"))
    assert "name a mask" in fail("plot")
    assert not (tmp_path / "a.xyz").exists()
