"""Trajectory figures: sparsity against step, and the never / cancelled / subnetwork split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from maskhub.errors import UsageError


def plot_trajectory(data: dict[str, Any], path: str | Path, dpi: int = 100) -> Path:
    """Write a two-panel PNG for a trajectory (``TrajectoryResult.to_dict()``): sparsity
    against step with the Figure 6 curve, and the never / cancelled / subnetwork split."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("plots need matplotlib: pip install 'maskhub[plot]'") from exc
    pts = data["points"][1:]
    steps = [p["step"] for p in pts]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=dpi,
                                   gridspec_kw={"width_ratios": [3, 1]})
    ax1.plot(steps, [100 * p["sparsity_vs_first"] for p in pts], "o-", label="vs first")
    if all(p["sparsity_vs_prev"] is not None for p in pts):  # a live run may not keep it
        ax1.plot(steps, [100 * p["sparsity_vs_prev"] for p in pts], "s--",
                 label="vs previous")
    ax1.plot(steps, [100 * p["sparsity_ever"] for p in pts], "^:", label="ever updated")
    ax3 = ax1.twinx()
    ax3.plot(steps, [100 * p["frac_not_in_final"] for p in pts], "d-.", color="#9c27b0",
             label="updated at k, not in final (right axis)")
    ax3.set_ylabel("% of parameters not in the final subnetwork")
    ax1.set_xlabel("step")
    ax1.set_ylabel("sparsity (%)")
    ax1.set_title(f"{data['name']}: sparsity along training (tol {data['tol']:g})")
    lines = ax1.get_legend_handles_labels()
    extra = ax3.get_legend_handles_labels()
    ax1.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8)
    ax1.grid(alpha=0.3)
    parts = [("never", "#bbbbbb"), ("cancelled", "#f4a261"), ("subnetwork", "#2a9d8f")]
    bottom = 0.0
    for key, color in parts:
        value = 100 * data[f"frac_{key}"]
        ax2.bar([0], [value], bottom=[bottom], color=color, label=f"{key} {value:.1f}%")
        bottom += value
    ax2.set_xticks([])
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("% of parameters")
    ax2.set_title("split")
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
