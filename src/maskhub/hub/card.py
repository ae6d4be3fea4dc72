"""What a pushed repo says about its mask: ``tensors.parquet`` (per-tensor stats and
analysis) and the model card.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskhub.hub.layout import (
    BASE_TAGS,
    METADATA_FILE,
    STORE_DIR,
    TENSORS_FILE,
    is_hub_repo_id,
)
from maskhub.schemas.analysis import TensorAnalysis
from maskhub.schemas.metadata import MaskMetadata, TensorStats

if TYPE_CHECKING:
    import duckdb

#: The ``diff --rank/--stats`` figures of the ``analysis`` column, with their DuckDB types
#: (int64 and float64 in Parquet).
ANALYSIS_FIELDS = (("rank", "BIGINT"), ("max_rank", "BIGINT"), ("rank_rtol", "DOUBLE"),
                   ("sign_flips", "BIGINT"), ("mean_abs_delta", "DOUBLE"),
                   ("max_abs_delta", "DOUBLE"), ("mean_rel_delta", "DOUBLE"),
                   ("max_rel_delta", "DOUBLE"), ("n_sub_bf16_step", "BIGINT"))

#: One row of ``tensors.parquet`` as a DuckDB type. In Parquet: string, int32, string,
#: list<int64>, int64, int64, float64, string, string, list<struct<float64, int64>>,
#: struct<...>, list<struct<int32, int64, int64>> (the columns of docs/hub.md).
TENSORS_ROW = (
    "STRUCT(tensor VARCHAR, layer INTEGER, module VARCHAR, shape BIGINT[], numel BIGINT, "
    "n_updated BIGINT, sparsity DOUBLE, base_dtype VARCHAR, target_dtype VARCHAR, "
    "sweep STRUCT(tol DOUBLE, n_updated BIGINT)[], "
    f"analysis STRUCT({', '.join(f'{f} {t}' for f, t in ANALYSIS_FIELDS)}), "
    "strata STRUCT(stratum INTEGER, numel BIGINT, n_updated BIGINT)[])")


def tensors_rows(stats: Sequence[TensorStats],
                 sweep: Sequence[tuple[str, float, int]] = (),
                 analysis: Sequence[TensorAnalysis] = (),
                 strata: Sequence[tuple[str, int, int, int]] = ()) -> list[dict[str, Any]]:
    """The rows of ``tensors.parquet``, one per tensor in ``stats`` order (columns as in
    :data:`TENSORS_ROW`); ``analysis`` fills the nullable ``analysis`` column for the tensors
    it covers, ``strata`` (rows of ``tensor_strata``) the ``strata`` column."""
    by_name = {a.tensor: {f: getattr(a, f) for f, _ in ANALYSIS_FIELDS} for a in analysis}
    by_stratum: dict[str, list[dict[str, int]]] = {}
    for tensor, stratum, numel, n in sorted(strata, key=lambda s: (s[0], s[1])):
        by_stratum.setdefault(tensor, []).append(
            {"stratum": int(stratum), "numel": int(numel), "n_updated": int(n)})
    by_tensor: dict[str, list[dict[str, Any]]] = {}
    for tensor, tol, n in sorted(sweep, key=lambda s: (s[0], s[1])):
        by_tensor.setdefault(tensor, []).append({"tol": float(tol), "n_updated": int(n)})
    return [{"tensor": t.tensor, "layer": t.layer, "module": t.module, "shape": list(t.shape),
             "numel": t.numel, "n_updated": t.n_updated, "sparsity": t.sparsity,
             "base_dtype": t.base_dtype, "target_dtype": t.target_dtype,
             "sweep": by_tensor.get(t.tensor, []), "analysis": by_name.get(t.tensor),
             "strata": by_stratum.get(t.tensor, [])}
            for t in stats]


def write_tensors_parquet(con: duckdb.DuckDBPyConnection, path: Path,
                          rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (:func:`tensors_rows`) to the Parquet file ``path`` (zstd) with DuckDB's
    writer on ``con`` (any connection, a read-only one too), so that a push imports no
    pyarrow. The rows are bound as one typed parameter: NaN and infinities pass as they are,
    and the bytes depend on the rows (and DuckDB's version) only, no timestamps."""
    target = str(path).replace("'", "''")
    con.execute(f"COPY (SELECT r.* FROM (SELECT unnest(?::{TENSORS_ROW}[]) AS r)) TO "
                f"'{target}' (FORMAT parquet, COMPRESSION zstd)", [rows])


def read_tensors_parquet(con: duckdb.DuckDBPyConnection, path: Path) -> list[dict[str, Any]]:
    """The rows of the Parquet file ``path`` as dicts of its columns, in file order, read
    with DuckDB on ``con``, so that a pull imports no pyarrow. A file written before a column
    existed has no key for it. Raises ``duckdb.Error`` for a file DuckDB cannot read."""
    cur = con.execute("SELECT * FROM read_parquet(?)", [str(path)])
    names = [d[0] for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _module_rows(stats: Sequence[TensorStats]) -> list[tuple[str, int, int, int]]:
    """``(module, tensors, numel, n_updated)`` in order of first layer, then name."""
    acc: dict[str, list[int]] = {}
    for t in stats:
        a = acc.setdefault(t.module, [0, 0, 0, t.layer if t.layer is not None else -1])
        a[0] += 1
        a[1] += t.numel
        a[2] += t.n_updated
        a[3] = min(a[3], t.layer if t.layer is not None else -1)
    order = sorted(acc, key=lambda m: (acc[m][3], m))
    return [(m, acc[m][0], acc[m][1], acc[m][2]) for m in order]


def public_name(model: str | None) -> str | None:
    """What a card may say about a checkpoint: a Hub repo id or a name given with
    ``--base-model/--target-model``, never a local path (recorded as an absolute path)."""
    if not model or not model.strip():
        return None
    if model.startswith(("/", "~", "./", "../", "\\")) or re.match(r"[A-Za-z]:[\\/]", model):
        return None
    return model


def render_card(meta: MaskMetadata, name: str, stats: Sequence[TensorStats], repo_id: str,
                repo_type: str = "model", license: str | None = None) -> str:
    """The model card (README.md): YAML front matter for the Hub's search, then a summary,
    the per-module table and a snippet to pull and apply the mask.

    Checkpoints appear by Hub id or by the name given with ``--base-model/--target-model``;
    a local path is left out (text and metadata). ``base_model`` only for a Hub id, and no
    ``base_model_relation``: the Hub's relations (adapter, merge, quantized, finetune) all
    promise weights loadable on the base, and a mask is none of them. ``datasets`` when the
    run's dataset is known. The install line and the link come from maskhub's own package
    metadata (:func:`project_source`): no package index name or URL it does not have."""
    from huggingface_hub import ModelCardData

    base, target = public_name(meta.base_model), public_name(meta.target_model)
    dataset = public_name(meta.dataset)
    algorithm = (meta.algorithm or "").strip().lower() or None
    tags = [*BASE_TAGS, *([algorithm] if algorithm else []),
            *(["patch"] if meta.has_values else [])]
    details = {"mask_id": meta.id, "name": name, "algorithm": meta.algorithm,
               "base_model": base, "base_revision": meta.base_revision,
               "target_model": target, "target_revision": meta.target_revision,
               "seed": meta.seed, "dataset": dataset, "tol": meta.tol,
               "n_params": meta.n_params, "n_updated": meta.n_updated,
               "sparsity": round(meta.sparsity, 6), "format_version": meta.format_version,
        "has_values": meta.has_values or None}
    hub_base = base if is_hub_repo_id(base) else None
    card = ModelCardData(
        library_name="maskhub", license=license, base_model=hub_base,
        datasets=[dataset] if dataset else None,
        tags=tags, maskhub={k: v for k, v in details.items() if v is not None},
    )
    url, install = project_source()
    made_with = f"[maskhub]({url})" if url else "maskhub"
    kind = f"{meta.algorithm} " if meta.algorithm else ""
    summary = [
        ("base model", _code(base, meta.base_revision)),
        ("fine-tuned model", _code(target, meta.target_revision)),
        ("algorithm", meta.algorithm), ("seed", meta.seed), ("dataset", dataset),
        ("tolerance", f"updated iff \\|θ1 − θ0\\| > {meta.tol:g}"), ("dtype", meta.dtype),
        ("parameters", f"{meta.n_params:,}"), ("updated", f"{meta.n_updated:,}"),
        ("sparsity", f"{100 * meta.sparsity:.2f}%"), ("mask id", f"`{meta.id}`"),
    ]
    of_target = f" of `{target}`" if target else ""
    to_base = f", relative to `{base}`" if base else ""
    lines = [
        "---", card.to_yaml(), "---", "",
        f"# {name}: update mask", "",
        f"Which parameters the {kind}fine-tuning{of_target} changed{to_base}: a boolean "
        f"mask per parameter tensor, made with {made_with}. "
        f"{100 * meta.density:.2f}% of the parameters were updated.", "",
        "| | |", "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in summary if v not in (None, "")), "",
        "## Per module", "",
        "| module | tensors | parameters | updated | sparsity |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for module, n, numel, upd in _module_rows(stats):
        sp = 1 - upd / numel if numel else 1.0
        lines.append(f"| {module} | {n} | {numel:,} | {upd:,} | {100 * sp:.2f}% |")
    rt = "" if repo_type == "model" else f', repo_type="{repo_type}"'
    rt_cli = "" if repo_type == "model" else f" --repo-type {repo_type}"
    load = (f'model = AutoModelForCausalLM.from_pretrained("{hub_base}", '
            'torch_dtype=torch.bfloat16)' if hub_base else
            "model = ...  # the base model this mask was made from (not a Hub repo: load it "
            "as you do)")
    lines += [
        "", "## Use it", "",
        "This repo holds a mask, not weights: it is not itself a PEFT adapter, and reading "
        "it needs maskhub (or zarr-python and numpy, see Files). Once exported as a SHiRA "
        "adapter (below), plain PEFT loads it without maskhub.", "",
        "```bash", install, "```", "",
        "Train only the parameters this mask marks (gradient masking; entries outside it "
        "stay bit-identical to the base):", "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM",
        "from maskhub import Mask",
        "from maskhub.torch import apply_mask", "",
        load,
        f'mask = Mask.from_hub("{repo_id}"{rt})',
        "apply_mask(model, mask)  # train only the entries the mask marks as updated",
        "optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)",
        "# ... your training loop (or a transformers/TRL Trainer)",
        "```", "",
        "or fetch it from the command line:", "",
        "```bash", f"maskhub pull {repo_id}{rt_cli}", "```", "",
        *_peft_lines(meta, repo_id, rt_cli, load),
        *(_patch_lines(meta, base, target, repo_id, rt_cli, install) if meta.has_values
          else []),
        "## Files", "",
        f"- `{STORE_DIR}/`: the Zarr v3 store, one packed-bit `uint8` array per tensor "
        "(attributes `shape`, `bitorder`; `np.unpackbits(a[:], count=prod(shape), "
        "bitorder=...)`), or for a low-density tensor a byte-gap code (attribute "
        "`encoding: gaps-u8`; `c = a[:].astype(np.int64)`, set indices "
        "`np.cumsum(c + (c < 255))[c < 255] - 1`).",
        *([f"- `{STORE_DIR}/values/`: the fine-tuned model's values at the updated entries, "
           "one 1-D array per tensor in flat C order of the set bits, in the tensor's dtype "
           "(bf16 as its `uint16` bits; attribute `dtype`); `flat = base.ravel().copy(); "
           "flat[np.flatnonzero(mask)] = values`."] if meta.has_values else []),
        f"- `{TENSORS_FILE}`: per-tensor counts.",
        f"- `{METADATA_FILE}`: metadata and the sha256 of every file; `maskhub pull` checks "
        "them all.", "",
    ]
    return "\n".join(lines)


def _peft_lines(meta: MaskMetadata, repo_id: str, rt_cli: str, load: str) -> list[str]:
    """The card's section on training the mask as a plain-PEFT SHiRA adapter (issue 26):
    ``maskhub export --peft`` once, then ``PeftModel.from_pretrained`` anywhere."""
    out = repo_id.rsplit("/", 1)[-1] + "-shira"
    return [
        "### As a PEFT adapter (SHiRA)", "",
        "Export the mask once as a SHiRA adapter in PEFT's own format (zero weights at "
        "exactly the mask's entries of each 2-D weight; embeddings, norms and biases are "
        "not in it); any process with PEFT (>= 0.17) then loads it, without maskhub:", "",
        "```bash", f"maskhub pull {repo_id}{rt_cli}",
        f"maskhub export {meta.id[:12]} {out} --peft", "```", "",
        "```python",
        "import torch",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM", "",
        load,
        f'model = PeftModel.from_pretrained(model, "{out}", is_trainable=True)',
        "```", "",
        "PEFT gives every layer `r * (m + n)` entries with one `r`, so a layer's extra "
        "entries repeat its own positions: a repeated position trains as many times as fast "
        "(`maskhub export` prints how many). For the mask's exact counts per layer, use "
        "`maskhub.integrations.peft.shira_adapter` or `apply_mask` above.", "",
    ]


def _patch_lines(meta: MaskMetadata, base: str | None, target: str | None, repo_id: str,
                 rt_cli: str, install: str) -> list[str]:
    """The card's section on rebuilding the fine-tuned model from the base (a patch)."""
    if is_hub_repo_id(base):
        base_arg = f"{base}@{meta.base_revision}" if meta.base_revision else str(base)
    else:
        base_arg = "BASE"
    out = "./" + (target.rstrip("/").rsplit("/", 1)[-1] if target else "rebuilt")
    what = f"`{target}`" if target else "the fine-tuned model"
    frm = f"`{base}`" if base else "its base"
    exact = (" bit for bit" if meta.tol == 0 else
             f" except for entries that moved by at most {meta.tol:g} (a lossy patch)")
    lines = ["", "## Rebuild the fine-tuned model", "",
             f"This repo is a patch: it also holds the values of {what} at the updated "
             f"entries, so it rebuilds {what} from {frm}{exact}, one tensor at a time:", "",
             "```bash", install, f"maskhub apply {repo_id}{rt_cli} {base_arg} {out}", "```",
             ""]
    if base_arg == "BASE":
        lines += ["(BASE: the base checkpoint, a directory of safetensors; `maskhub apply` "
                  "checks that it holds the tensors, shapes and dtypes the patch was made "
                  "from.)", ""]
    return lines


def _code(model: str | None, revision: str | None) -> str | None:
    if model is None:
        return None
    return f"`{model}`" + (f" @ `{revision}`" if revision else "")


def project_source() -> tuple[str | None, str]:
    """``(url, install line)`` for maskhub as its installed package metadata describes it:
    the project URL when the metadata has one (``[project.urls]``), and a ``pip install``
    line that holds: from that repository when there is one, else a comment saying the
    package is not on a package index (no ``pip install maskhub``: that name on PyPI is not
    this project's unless its metadata says so)."""
    from importlib import metadata

    try:
        meta = metadata.metadata("maskhub")
        version = meta.get("Version") or ""
    except metadata.PackageNotFoundError:
        meta, version = None, ""
    url = None
    if meta is not None:
        labelled = {}
        for entry in meta.get_all("Project-URL") or []:
            label, _, value = entry.partition(",")
            labelled[label.strip().lower()] = value.strip()
        url = next((labelled[k] for k in ("repository", "source", "homepage")
                    if labelled.get(k)), None) or meta.get("Home-page") or None
    if url and url.startswith("https://"):
        return url, f'pip install "maskhub @ git+{url}"'
    return None, (f"# maskhub {version} is not published on a package index: install it "
                  "from its source tree (pip install -e .)").replace("  ", " ")
