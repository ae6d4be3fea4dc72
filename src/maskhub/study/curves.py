"""The per-checkpoint curves of the recorded runs: held-out accuracy and held-out answer
loss at every point of the live trajectory (graded on the bf16 weights each point's
checkpoint would hold), drawn as one figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Draw ``curves`` (run -> ``[{"step", "heldout_acc", "heldout_loss"}, ...]``) as two
    panels, held-out accuracy (%) and held-out loss against the step; write PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 4))
    for run, points in curves.items():
        steps = [p["step"] for p in points]
        acc.plot(steps, [100 * p["heldout_acc"] for p in points], marker="o", label=run)
        loss.plot(steps, [p["heldout_loss"] for p in points], marker="o", label=run)
    acc.set(xlabel="step", ylabel="held-out accuracy (%)", title="Held-out accuracy")
    loss.set(xlabel="step", ylabel="held-out answer loss (NLL)", title="Held-out loss")
    acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
