"""Figures of masks: a layer x module sparsity heatmap, an overlap matrix heatmap, and the
update rate per exponent of |θ0| with the precision null.

matplotlib is an optional extra (``pip install 'maskhub[plot]'``), imported only here and only
when a figure is drawn. Figures are drawn with the object-oriented API (no pyplot, no global
backend change) and written aside, then renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskhub.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from maskhub.analytics.overlap import OverlapMatrix
    from maskhub.core.home import Home
    from maskhub.core.record import MaskRecord

DPI = 100
BASELINES = ("magnitude", "stratified", "uniform")


def parse_size(text: str) -> tuple[int, int]:
    """``"1200x800"`` -> ``(1200, 800)`` pixels."""
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size takes WIDTHxHEIGHT in pixels, e.g. 1200x800, not {text!r}"
                         ) from None
    if not (100 <= w <= 20000 and 100 <= h <= 20000):
        raise UsageError(f"--size {text}: each side must be between 100 and 20000 pixels")
    return w, h


def _figure(size: tuple[int, int]) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UsageError("plots need matplotlib: pip install 'maskhub[plot]'") from exc
    w, h = size
    return Figure(figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")


def _save(fig: Figure, output: str | os.PathLike[str]) -> Path:
    out = Path(output)
    fmt = out.suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise UsageError(f"cannot write a {fmt!r} figure; use .png, .svg or .pdf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        fig.savefig(tmp, dpi=DPI, format=fmt)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def sparsity_grid(registry: Home, mask: MaskRecord) -> dict[str, Any]:
    """Sparsity per (module, layer) of a mask's weight matrices (biases and other parameter
    kinds left out: Figure 3 is per matrix), from the ``tensors`` table.

    Returns ``{"layers", "modules", "grid" (modules x layers, None where absent),
    "other" [(module, sparsity)] for tensors outside the layers}``.
    """
    with registry.index.connect(write=False) as con:
        rows = registry.index.rows(con, """
            SELECT layer, module, 1 - sum(n_updated) / sum(numel) AS sparsity,
                   min(rowid) AS first
            FROM tensors WHERE mask_id = ? AND numel > 0
                AND coalesce(param_kind, 'weight') = 'weight'
            GROUP BY layer, module ORDER BY first""", [mask.id])
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    modules: list[str] = []
    for r in rows:
        if r["layer"] is not None and r["module"] not in modules:
            modules.append(r["module"])
    cell = {(r["module"], r["layer"]): float(r["sparsity"]) for r in rows}
    grid = [[cell.get((m, layer)) for layer in layers] for m in modules]
    other = [(r["module"], float(r["sparsity"])) for r in rows if r["layer"] is None]
    return {"layers": layers, "modules": modules, "grid": grid, "other": other}


def plot_sparsity(registry: Home, mask: MaskRecord, output: str | os.PathLike[str],
                  size: tuple[int, int] | None = None) -> Path:
    """Layer x module sparsity heatmap of one mask (the paper's Figure 3) into ``output``."""
    import numpy as np

    data = sparsity_grid(registry, mask)
    layers, modules = data["layers"], data["modules"]
    if size is None:
        size = (max(800, 260 + 34 * len(layers)), max(450, 200 + 42 * len(modules)))
    fig = _figure(size)
    ax = fig.add_subplot()
    title = (f"{mask.name}: update sparsity {100 * mask.sparsity:.2f}% "
             f"({mask.n_updated:,} of {mask.n_params:,} updated)")
    if not layers:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no per-layer tensors", ha="center", va="center")
    else:
        values = np.array([[np.nan if v is None else 100 * v for v in row]
                           for row in data["grid"]])
        im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(layers)), [str(x) for x in layers],
                      fontsize=8 if len(layers) <= 48 else 6)
        ax.set_yticks(range(len(modules)), modules, fontsize=9)
        ax.set_xlabel("layer")
        fig.colorbar(im, ax=ax, label="sparsity (%)")
        if len(layers) <= 40 and len(modules) <= 16:
            lo, hi = np.nanmin(values), np.nanmax(values)
            mid = (lo + hi) / 2
            for (i, j), v in np.ndenumerate(values):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center",
                            fontsize=9 if len(layers) <= 16 else 7,
                            color="white" if v < mid else "black")
    if data["other"]:
        shown = "   ".join(f"{m}: {100 * s:.1f}%" for m, s in data["other"][:8])
        title += f"\noutside the layers: {shown}"
    ax.set_title(title, fontsize=10, loc="left")
    return _save(fig, output)


def plot_overlap(matrix: OverlapMatrix, output: str | os.PathLike[str],
                 baseline: str = "magnitude", size: tuple[int, int] | None = None) -> Path:
    """Overlap matrix heatmap of several masks, each cell with its random baseline.

    Cell (row i, column j) is the share of mask i's updated parameters that mask j updated
    too (o1 with i as I1); the bracket gives the same share expected at random (uniform,
    stratified or magnitude-stratified baseline; the latter is blank for masks recorded
    without magnitude strata).
    """
    import numpy as np

    if baseline not in BASELINES:
        raise UsageError(f"--baseline must be one of {', '.join(BASELINES)}, not {baseline!r}")
    names = [m.name for m in matrix.masks]
    n = len(names)
    observed = matrix.matrix("o1")
    expected = matrix.matrix({"magnitude": "o1_magnitude", "stratified": "o1_stratified",
                              "uniform": "o1_random"}[baseline])
    if size is None:
        side = max(600, 260 + 110 * n)
        size = (side + 120, side)
    fig = _figure(size)
    ax = fig.add_subplot()
    values = np.array([[np.nan if (v is None or i == j) else 100 * v
                        for j, v in enumerate(row)] for i, row in enumerate(observed)])
    im = ax.imshow(values, cmap="magma", vmin=0, vmax=100, interpolation="nearest")
    ax.set_xticks(range(n), names, rotation=35, ha="right", fontsize=9)
    ax.set_yticks(range(n), names, fontsize=9)
    ax.set_xlabel("I2 (column mask)")
    ax.set_ylabel("I1 (row mask)")
    fig.colorbar(im, ax=ax, label="o1 = |I1 ∩ I2| / |I1|  (%)")
    fontsize = 9 if n <= 8 else 7 if n <= 14 else 5
    for i in range(n):
        for j in range(n):
            if i == j:
                ax.text(j, i, "—", ha="center", va="center", fontsize=fontsize, color="grey")
                continue
            o, e = observed[i][j], expected[i][j]
            text = "n/a" if o is None else f"{100 * o:.1f}%"
            if e is not None:
                text += f"\n({100 * e:.1f}%)"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                    color="white" if o is None or o < 0.6 else "black")
    ax.set_title(f"subnetwork overlap; in brackets: {baseline} random baseline",
                 fontsize=10, loc="left")
    return _save(fig, output)


def plot_exponents(registry: Home, mask: MaskRecord, output: str | os.PathLike[str],
                   size: tuple[int, int] | None = None) -> Path:
    """Update rate per exponent of |θ0| of one mask (``show``'s table as bars): one bar per
    binade, shaded where the binade is in the precision null (its smallest step exceeds the
    budget), with the entries per binade on a second axis. Needs the mask's strata."""
    from maskhub.analytics.summary import mask_summary

    rows = [r for r in mask_summary(registry, mask.id)["by_exponent"]
            if r["exponent"] is not None or r["stratum"] == 0]
    if not rows:
        raise UsageError(f"{mask.name} has no magnitude strata (an imported or combined mask): "
                         "nothing to plot per exponent")
    fig = _figure(size or (1000, 500))
    ax = fig.add_subplot()
    labels = ["0/sub" if r["stratum"] == 0 else f"2^{r['exponent']}" for r in rows]
    x = list(range(len(rows)))
    for i, r in enumerate(rows):
        if r["null"]:
            ax.axvspan(i - 0.5, i + 0.5, color="#e0e0e0", zorder=0)
    ax.bar(x, [100 * r["rate"] for r in rows], color="#1f77b4", zorder=2)
    ax.set_xticks(x, labels, rotation=90, fontsize=7)
    ax.set_ylabel("updated (%)")
    ax.set_xlabel("|θ0| binade (shaded: precision null, could not have changed)")
    ax.set_ylim(0, 100)
    twin = ax.twinx()
    twin.plot(x, [r["numel"] for r in rows], color="#d62728", marker=".", linewidth=1)
    twin.set_yscale("log")
    twin.set_ylabel("entries", color="#d62728")
    budget = mask.row.get("null_budget")
    ax.set_title(f"{mask.name}: update rate per exponent of |θ0|"
                 + ("" if budget is None else f" (budget {budget:.3g})"), fontsize=10)
    return _save(fig, output)
