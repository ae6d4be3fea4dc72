"""``maskhub sql`` for shells and notebooks: CSV with plain LF line endings (shell
substitution keeps a CR), and the ``mask_tensors`` view joining masks and tensors without
ambiguous column names."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from test_overlap import register_bits

from maskhub import Registry

Q = "model.layers.1.self_attn.q_proj.weight"
H = "lm_head.weight"


def test_csv_lines_end_in_lf_only() -> None:
    register_bits(Registry(), "m", {Q: np.array([1, 0, 1, 1], bool), H: np.zeros(4, bool)})
    out = subprocess.run([sys.executable, "-c", "from maskhub.entry import run; run()", "sql",
                          "select tensor, n_updated from tensors order by tensor",
                          "--format", "csv"], capture_output=True, env=os.environ, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"tensor,n_updated\n{H},0\n{Q},3\n".encode()


def test_mask_tensors_names_every_column_once() -> None:
    reg = Registry()
    register_bits(reg, "a", {Q: np.array([1, 0, 1, 1], bool), H: np.zeros(4, bool)},
                  algorithm="dpo")
    register_bits(reg, "b", {Q: np.array([0, 0, 0, 1], bool), H: np.ones(4, bool)})
    cols, rows = reg.sql("select mask_name, algorithm, tensor, layer, module, param_kind, "
                         "numel, tensor_n_updated, tensor_sparsity, mask_n_updated, "
                         "mask_sparsity from mask_tensors order by mask_name, tensor")
    assert rows == [("a", "dpo", H, None, "lm_head", "weight", 4, 0, 1.0, 3, 0.625),
                    ("a", "dpo", Q, 1, "self_attn.q_proj", "weight", 4, 3, 0.25, 3, 0.625),
                    ("b", None, H, None, "lm_head", "weight", 4, 4, 0.0, 5, 0.375),
                    ("b", None, Q, 1, "self_attn.q_proj", "weight", 4, 1, 0.75, 5, 0.375)]
    all_cols = reg.sql("select * from mask_tensors limit 0")[0]
    assert len(all_cols) == len(set(all_cols)) == 21
