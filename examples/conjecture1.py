"""Conjecture 1 of the paper (section 4), small and offline.

Train a tiny Llama-shaped model (built from a config, nothing downloaded) in two runs from
the same θ0, on the same data, with the same seed and hyperparameters:

1. full fine-tuning → θ_full; its mask = entries with |θ_full − θ0| > 1e-5 in bf16;
2. the same run with gradients multiplied by that mask (maskhub.torch.apply_mask, exact
   mode) → θ_sub.

Reports the fraction of parameters equal between θ_sub and θ_full at 1e-5 and 1e-4 (the
paper: 94% and 100% for DPO), both losses, and checks the exactness guarantee: every entry
outside the mask is bit-identical to θ0 (in memory, and per ``maskhub verify`` on fp32
checkpoints). A third run with gradient masking only (exact=False) shows what weight decay
does to frozen entries without the exact freeze.

    python examples/conjecture1.py            # default size, about a minute on 2 cores
    python examples/conjecture1.py --json --hidden 128 --layers 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from maskhub import Registry
from maskhub.demo.pair import save_checkpoint
from maskhub.demo.tinymodel import TinyConfig, TinyLlama, synthetic_batches, train
from maskhub.torch import MaskedAdamW, apply_mask

TOLS = (1e-5, 1e-4)


def _outside_changed(model: torch.nn.Module, theta0: dict[str, torch.Tensor], mask: Any) -> int:
    """Entries outside the mask whose bits differ from θ0."""
    n = 0
    for name, p in model.state_dict().items():
        frozen = ~torch.from_numpy(mask[name])
        n += int((p.view(torch.int32) != theta0[name].view(torch.int32))[frozen].sum())
    return n


def run(workdir: Path, cfg: TinyConfig | None = None, sft_steps: int = 40, steps: int = 12,
        lr: float = 2e-5, weight_decay: float = 0.01, batch: int = 16, seq: int = 32,
        seed: int = 0, optimizer: str = "adamw") -> dict[str, Any]:
    """Run the experiment under ``workdir`` (checkpoints and a private registry); return the
    report as a dict. ``optimizer``: ``adamw`` (torch's AdamW with ``apply_mask``) or
    ``masked-adamw`` (``MaskedAdamW``: state only for the mask's entries) for θ_sub."""
    workdir = Path(workdir)
    reg = Registry(workdir / "home")
    cfg = cfg or TinyConfig()
    started = time.perf_counter()

    # θ0: a briefly pre-trained ("SFT") model whose weights are bf16 values, as a bf16
    # checkpoint would hold them.
    torch.manual_seed(seed)
    model = TinyLlama(cfg)
    train(model, synthetic_batches(cfg, sft_steps, batch, seq, seed=seed + 1), lr=3e-3,
          seed=seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_checkpoint(model, workdir / "theta0")
    save_checkpoint(model, workdir / "theta0-fp32", dtype=torch.float32)

    data = synthetic_batches(cfg, steps, batch, seq, seed=seed + 2)
    full_losses = train(model, data, lr=lr, weight_decay=weight_decay, seed=seed + 2)
    save_checkpoint(model, workdir / "full")
    mask = reg.diff(workdir / "theta0", workdir / "full", name="full-run", tol=1e-5,
                    algorithm="conjecture1-full", seed=seed)

    def masked_run(exact: bool) -> tuple[list[float], int]:
        model.load_state_dict(theta0)
        with apply_mask(model, mask, exact=exact):
            losses = train(model, data, lr=lr, weight_decay=weight_decay, seed=seed + 2)
        return losses, _outside_changed(model, theta0, mask)

    def masked_adamw_run() -> tuple[list[float], int]:
        model.load_state_dict(theta0)
        torch.manual_seed(seed + 2)
        opt = MaskedAdamW(model, mask, lr=lr, weight_decay=weight_decay)
        losses = []
        for ids in data:
            opt.zero_grad()
            loss = model.loss(ids)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        for p in model.parameters():  # MaskedAdamW froze the all-frozen ones
            p.requires_grad_(True)
        return losses, _outside_changed(model, theta0, mask)

    if optimizer not in ("adamw", "masked-adamw"):
        raise ValueError(f"optimizer must be adamw or masked-adamw, not {optimizer!r}")
    sub_losses, outside = masked_run(exact=True) if optimizer == "adamw" \
        else masked_adamw_run()
    save_checkpoint(model, workdir / "sub")
    save_checkpoint(model, workdir / "sub-fp32", dtype=torch.float32)
    verified = reg.verify(mask, workdir / "theta0-fp32", workdir / "sub-fp32", tol=0.0)
    _, outside_grad_only = masked_run(exact=False)

    # θ_sub vs θ_full, both in bf16 as in the paper: "equal at tol" means |Δ| <= tol.
    cmp = reg.diff(workdir / "full", workdir / "sub", name="sub-vs-full", tol=TOLS[0],
                   sweep=TOLS)
    sweep = {float(r["tol"]): int(r["n_updated"]) for r in reg.show(cmp.id)["sweep"]}
    return {
        "config": {"hidden": cfg.hidden_size, "layers": cfg.num_layers, "vocab": cfg.vocab_size,
                   "n_params": mask.n_params, "steps": steps, "lr": lr,
                   "weight_decay": weight_decay, "optimizer": optimizer},
        "mask": {"n_updated": mask.n_updated, "density": mask.density},
        "equal_fraction": {str(t): 1 - sweep[t] / cmp.n_params for t in TOLS},
        "losses": {"full": full_losses, "masked": sub_losses},
        "exact": {"outside_changed": outside, "verify_outside": verified.n_outside,
                  "verify_changed": verified.n_changed},
        "gradient_masking_only": {"outside_changed": outside_grad_only},
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="keep checkpoints and registry here")
    ap.add_argument("--optimizer", choices=("adamw", "masked-adamw"), default="adamw",
                    help="θ_sub's optimizer: AdamW + apply_mask, or MaskedAdamW")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    a = ap.parse_args(argv)
    cfg = TinyConfig(hidden_size=a.hidden, num_layers=a.layers,
                     intermediate_size=a.hidden * 172 // 64)
    with tempfile.TemporaryDirectory() as tmp:
        report = run(a.workdir or Path(tmp), cfg, a.sft_steps, a.steps, a.lr, a.weight_decay,
                     seed=a.seed, optimizer=a.optimizer)
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    c, m = report["config"], report["mask"]
    print(f"TinyLlama hidden={c['hidden']} layers={c['layers']}: {c['n_params']:,} parameters, "
          f"{c['steps']} AdamW steps, lr {c['lr']}, weight decay {c['weight_decay']}")
    print(f"mask of the full run (tol 1e-5, bf16): {m['n_updated']:,} updated "
          f"({m['density']:.1%} density)")
    for tol, frac in report["equal_fraction"].items():
        print(f"θ_sub vs θ_full: {frac:.2%} of parameters equal at tol {tol}")
    print(f"final loss: full {report['losses']['full'][-1]:.4f}, "
          f"masked {report['losses']['masked'][-1]:.4f}")
    e, g = report["exact"], report["gradient_masking_only"]
    print(f"exactness: {e['outside_changed']} entries outside the mask differ from θ0 "
          f"(maskhub verify: {e['verify_outside']}); gradient masking alone: "
          f"{g['outside_changed']:,}")
    print(f"({report['seconds']} s)")
    return 0 if e["outside_changed"] == 0 and e["verify_outside"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
