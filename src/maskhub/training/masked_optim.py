"""AdamW that keeps state only for a mask's entries: ``maskhub.torch.MaskedAdamW``.

:func:`~maskhub.training.masking.apply_mask` masks gradients and restores frozen entries,
so a masked run costs *more* memory than a full one (dense AdamW state plus a snapshot).
:class:`MaskedAdamW` keeps, per parameter, the flat indices of the trainable entries (int32
below 2^31 entries) and compact ``exp_avg``, ``exp_avg_sq`` and, for bf16/fp16 parameters, an
fp32 master copy of just those entries. A step gathers the trainable gradient entries, runs
the op sequence of ``torch.optim.AdamW(foreach=False)`` on the compact tensors and scatters
the new values into the parameter; frozen entries are never written, so they stay
bit-identical to θ0 without a snapshot. Parameters whose mask is all zero get no state and
``requires_grad_(False)``, so autograd skips their weight gradients. Because every AdamW op is
elementwise, the trainable entries of an fp32 parameter get exactly the bits that dense
AdamW with gradient masking and the exact freeze gives them.

Optimizer state per trainable entry: m + v (+ an fp32 master for low-precision parameters)
+ a 4-byte index, i.e. ~12 (fp32) or ~16 bytes (bf16 with masters) per *trainable* entry,
against 8 (fp32) or 12 (bf16 with masters) bytes per entry of the whole model for dense
AdamW.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from maskhub.errors import UsageError
from maskhub.schemas.metadata import BITORDER
from maskhub.training.masking import (
    POLICIES_EXTRA,
    POLICIES_MISSING,
    DTensor,
    NameMap,
    _local,
    _local_bits,
    match_parameters,
    resolve_mask,
)

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class _MaskedOptimizer(torch.optim.Optimizer):
    """An optimizer over the trainable entries of a mask only: the compact-state machinery
    shared by :class:`MaskedAdamW` and :class:`MaskedSGD` (which supply the update)."""

    def _init_masked(self, model: nn.Module, mask: Any, defaults: dict[str, Any], *,
                     master_weights: bool | None, strip_prefix: str | None,
                     add_prefix: str | None, name_map: NameMap | None, missing: str,
                     extra: str, home: str | os.PathLike[str] | None,
                     fused_backward: bool) -> None:
        """Match ``mask`` onto ``model``'s parameters and set up the compact state."""
        if missing not in POLICIES_MISSING:
            raise UsageError(f"missing must be one of {', '.join(POLICIES_MISSING)}, "
                             f"not {missing!r}")
        if extra not in POLICIES_EXTRA:
            raise UsageError(f"extra must be one of {', '.join(POLICIES_EXTRA)}, not {extra!r}")
        source = resolve_mask(mask, home)
        match = match_parameters(model, source, strip_prefix=strip_prefix,
                                 add_prefix=add_prefix, name_map=name_map, missing=missing,
                                 extra=extra)
        #: The model's parameter, its trainable flat indices and the tensor the optimizer
        #: updates (the parameter itself, or its fp32 master), keyed by that tensor.
        self._targets: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        self.frozen: list[str] = []
        trained: list[torch.Tensor] = []
        entries = [(name, param, source.packed(names[0]) if len(names) == 1 else
                    np.bitwise_or.reduce([source.packed(n) for n in names]))
                   for name, param, names in match.params.values()]
        if missing == "freeze":
            entries += [(n, p, None) for n, p in zip(match.missing, match.missing_params,
                                                     strict=True)]
        elif missing == "train":
            entries += [(n, p, np.packbits(np.ones(p.numel(), bool), bitorder=BITORDER))
                        for n, p in zip(match.missing, match.missing_params, strict=True)]
        for name, param, bits in entries:
            if bits is None or not bits.any():  # frozen on every rank: no gradient, no state
                param.requires_grad_(False)
                self.frozen.append(name)
                continue
            # FSDP2: this rank keeps the state of its own shard's trainable entries only.
            local = _local(param)
            idx = _indices(_local_bits(bits, tuple(param.shape), param), local)
            if idx.numel() == 0:
                continue  # trainable elsewhere, not in this rank's shard
            use_master = param.dtype in _LOW_PRECISION if master_weights is None \
                else master_weights
            if use_master:
                target = local.detach().reshape(-1).index_select(0, idx).to(torch.float32)
            else:
                target = param
            self._targets[id(target)] = (param, idx)
            trained.append(target)
        if not trained:
            raise UsageError("the mask leaves nothing to train in this model")
        torch.optim.Optimizer.__init__(self, trained, defaults)
        self.fused_backward = fused_backward
        #: ``fused_backward``: the trainable entries' gradients gathered (and summed over the
        #: backward passes since the last :meth:`step`), keyed by ``id(target)``.
        self._compact_grads: dict[int, torch.Tensor] = {}
        self._hooks = []
        if fused_backward:
            for group in self.param_groups:
                for target in group["params"]:
                    param = self._targets[id(target)][0]
                    self._hooks.append(param.register_post_accumulate_grad_hook(
                        self._hook(target)))

    def _hook(self, target: torch.Tensor) -> Callable[[Any], None]:
        # Weak references: the hook lives on the model's parameter, and a strong one to the
        # optimizer (whose state holds the parameter) made a cycle through torch's C hook
        # table that gc cannot see, so a dropped model and optimizer were never freed (their
        # GPU memory with them). Once the optimizer is gone the hook does nothing.
        opt_ref, target_ref = weakref.ref(self), weakref.ref(target)

        def on_grad(param: torch.Tensor) -> None:
            opt, tgt = opt_ref(), target_ref()
            if opt is None or tgt is None:
                return
            with torch.no_grad():
                opt._gather(tgt)
            param.grad = None  # the dense gradient is freed as soon as it is gathered
        return on_grad

    def _gather(self, target: torch.Tensor) -> None:
        """Add the trainable entries of ``target``'s parameter's gradient to its compact
        gradient (the same dtype and the same elementwise add as autograd's accumulation of
        the dense gradient, so the sums have the same bits)."""
        param, idx = self._targets[id(target)]
        if param.grad is None:
            return
        grad = _local(param.grad).reshape(-1).index_select(0, idx)
        acc = self._compact_grads.get(id(target))
        if acc is None:
            self._compact_grads[id(target)] = grad
        else:
            acc.add_(grad)

    def remove_hooks(self) -> None:
        """Detach the ``fused_backward`` hooks from the model."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step on the trainable entries; frozen entries are never written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for target in group["params"]:
                self._update(group, target)
        return loss

    def _update(self, group: dict[str, Any], target: torch.Tensor) -> None:
        """One update of one parameter's trainable entries (no-op without a gradient)."""
        param, idx = self._targets[id(target)]
        if self.fused_backward:
            grad = self._compact_grads.pop(id(target), None)
        elif param.grad is not None:
            grad = _local(param.grad).reshape(-1).index_select(0, idx)
        else:
            grad = None
        if grad is None:
            return
        local = _local(param).detach()
        master = target is not param
        value = target if master else local.reshape(-1).index_select(0, idx)
        if master:
            grad = grad.to(torch.float32)
        self._compact_update(value, grad, self.state[target], group)
        local.view(-1)[idx] = value.to(param.dtype)  # int32 indices are fine here

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the trainable entries' gradients to a global L2 norm of ``max_norm`` (the
        frozen entries' gradients are never used, so they do not count); returns the norm
        before clipping. With ``fused_backward``, call it between the last backward and
        :meth:`step`: it clips the gathered compact gradients."""
        if DTensor is not None and any(isinstance(p, DTensor) for p, _ in
                                       self._targets.values()):
            raise UsageError("clip_grad_norm_ of MaskedAdamW does not reduce across FSDP2 "
                             "shards yet")
        if self.fused_backward:  # in the parameters' order (not backward's), as below: the
            # same sum, to the last bit, with or without fused_backward
            grads = [self._compact_grads[k] for k in self._targets if k in self._compact_grads]
        else:
            grads = [param.grad.reshape(-1).index_select(0, idx)
                     for param, idx in self._targets.values() if param.grad is not None]
        squares = [g.float().pow(2).sum() for g in grads]
        norm = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
        if norm > max_norm > 0:
            scale = max_norm / (norm + 1e-6)
            if self.fused_backward:
                for g in grads:
                    g.mul_(scale)
            else:
                for param, _ in self._targets.values():
                    if param.grad is not None:
                        param.grad.mul_(scale)
        return norm

    def _targets_in_order(self) -> list[torch.Tensor]:
        return [t for group in self.param_groups for t in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()`` plus the fp32 master weights (which are
        this optimizer's parameters, so the base class would not save them)."""
        sd = super().state_dict()
        sd["maskhub_masters"] = {i: t.detach().clone() for i, t in
                                 enumerate(self._targets_in_order())
                                 if t is not self._targets[id(t)][0]}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: moments, steps and the fp32 master weights."""
        state_dict = dict(state_dict)
        masters = state_dict.pop("maskhub_masters", {})
        super().load_state_dict(state_dict)
        targets = self._targets_in_order()
        with torch.no_grad():
            for i, value in masters.items():
                targets[int(i)].copy_(value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the model's trained parameters (with ``fused_backward``,
        the gathered compact gradients)."""
        self._compact_grads.clear()
        for param, _ in self._targets.values():
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def trainable_entries(self) -> int:
        """Entries this optimizer updates."""
        return sum(int(idx.numel()) for _, idx in self._targets.values())

    def state_bytes(self) -> int:
        """Bytes of optimizer state: indices, fp32 masters and every state tensor (m, v,
        momentum buffers; scalar step counters not counted)."""
        total = 0
        for target in (p for g in self.param_groups for p in g["params"]):
            param, idx = self._targets[id(target)]
            total += idx.numel() * idx.element_size()
            if target is not param:
                total += target.numel() * target.element_size()
            for t in self.state[target].values():
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    total += t.numel() * t.element_size()
        return total

    def compact_grad_bytes(self) -> int:
        """Bytes of the compact gradients gathered since the last :meth:`step` (with
        ``fused_backward``: one value per trainable entry, in the parameter's dtype, alive
        from the first backward to the step)."""
        return sum(g.numel() * g.element_size() for g in self._compact_grads.values())

    def parameters_iter(self) -> Iterable[nn.Parameter]:
        """The model parameters this optimizer trains."""
        return (param for param, _ in self._targets.values())

    def _compact_update(self, value: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                        group: dict[str, Any]) -> None:
        """Update the compact ``value`` in place from ``grad`` (the optimizer's rule)."""
        raise NotImplementedError


class MaskedAdamW(_MaskedOptimizer):
    """AdamW over the trainable entries of a mask only (see the module docstring).

    ``MaskedAdamW(model, mask, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)``;
    ``mask`` as :func:`~maskhub.training.masking.apply_mask` takes it (a Mask, a registry
    name, a Hub repo id, a store path, ``{name: bool array}``), with the same name matching
    (``strip_prefix``, ``add_prefix``, ``name_map``, tied weights: the union) and policies
    (``missing``: ``error``/``freeze``/``train``; ``extra``: ``error``/``ignore``).
    ``master_weights`` (default: for bf16/fp16 parameters) keeps an fp32 copy of their
    trainable entries that the update runs on. Weight decay applies to trainable entries only.
    ``state_dict()``/``load_state_dict()`` round-trip (the indices are rebuilt from the mask).
    DDP: build it before wrapping; FSDP2: after ``fully_shard`` (each rank keeps the state of
    its own shard's trainable entries).
    """

    def __init__(self, model: nn.Module, mask: Any, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, master_weights: bool | None = None,
                 strip_prefix: str | None = None, add_prefix: str | None = None,
                 name_map: NameMap | None = None, missing: str = "error",
                 extra: str = "error", home: str | os.PathLike[str] | None = None,
                 fused_backward: bool = False) -> None:
        """Match ``mask`` onto ``model``'s parameters and set up the compact state.

        ``fused_backward``: in a post-accumulate-grad hook, gather each parameter's
        trainable gradient entries into a compact gradient as soon as its dense gradient is
        ready, and drop the dense gradient right after, so that at most one dense gradient
        exists at a time; :meth:`step` updates from the compact gradients (summed over every
        backward since the last step: gradient accumulation works, bit for bit as without
        it), and :meth:`clip_grad_norm_` clips them.
        """
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and 0 <= betas[0] < 1
                and 0 <= betas[1] < 1):
            raise UsageError(f"invalid AdamW hyperparameters: lr={lr}, betas={betas}, "
                             f"eps={eps}, weight_decay={weight_decay}")
        self._init_masked(model, mask, {"lr": lr, "betas": betas, "eps": eps,
                                        "weight_decay": weight_decay},
                          master_weights=master_weights, strip_prefix=strip_prefix,
                          add_prefix=add_prefix, name_map=name_map, missing=missing,
                          extra=extra, home=home, fused_backward=fused_backward)

    def _compact_update(self, value: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                        group: dict[str, Any]) -> None:
        """AdamW's update (:func:`_adamw_update`), state made on the first step."""
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(value)
            state["exp_avg_sq"] = torch.zeros_like(value)
        beta1, beta2 = group["betas"]
        _adamw_update(value, grad, state, group["lr"], beta1, beta2, group["eps"],
                      group["weight_decay"])


class MaskedSGD(_MaskedOptimizer):
    """SGD (with momentum, dampening, Nesterov, L2 weight decay) over a mask's trainable
    entries only: ``torch.optim.SGD(foreach=False)``'s op sequence on compact tensors, a
    compact momentum buffer; otherwise as :class:`MaskedAdamW` (masters, fused_backward,
    name matching, state_dict)."""

    def __init__(self, model: nn.Module, mask: Any, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 *, master_weights: bool | None = None, strip_prefix: str | None = None,
                 add_prefix: str | None = None, name_map: NameMap | None = None,
                 missing: str = "error", extra: str = "error",
                 home: str | os.PathLike[str] | None = None,
                 fused_backward: bool = False) -> None:
        """Match ``mask`` onto ``model``'s parameters and set up the compact state."""
        if not (lr >= 0 and momentum >= 0 and weight_decay >= 0) or \
                (nesterov and (momentum <= 0 or dampening != 0)):
            raise UsageError(f"invalid SGD hyperparameters: lr={lr}, momentum={momentum}, "
                             f"dampening={dampening}, weight_decay={weight_decay}, "
                             f"nesterov={nesterov}")
        self._init_masked(model, mask, {"lr": lr, "momentum": momentum,
                                        "dampening": dampening, "weight_decay": weight_decay,
                                        "nesterov": nesterov},
                          master_weights=master_weights, strip_prefix=strip_prefix,
                          add_prefix=add_prefix, name_map=name_map, missing=missing,
                          extra=extra, home=home, fused_backward=fused_backward)

    def _compact_update(self, value: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                        group: dict[str, Any]) -> None:
        """SGD's update, op for op as torch's single-tensor implementation."""
        if group["weight_decay"] != 0:
            grad = grad.add(value, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        value.add_(grad, alpha=-group["lr"])


def _indices(bits: np.ndarray, param: torch.Tensor) -> torch.Tensor:
    """Flat indices of the set bits of a parameter's packed mask, on its device (int32 when
    the parameter has fewer than 2^31 entries)."""
    flat = np.flatnonzero(np.unpackbits(bits, count=param.numel(), bitorder=BITORDER))
    dtype = torch.int32 if param.numel() < 2 ** 31 else torch.int64
    return torch.from_numpy(flat.astype(np.int32 if dtype == torch.int32 else np.int64)
                            ).to(param.device)


def _adamw_update(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """``torch.optim.AdamW(foreach=False)``'s update of one tensor, op for op (the same bits
    on the same entries), on compact tensors."""
    step_t = state["step"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    step_t += 1
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = step_t.item()
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def dense_adamw_bytes(model: nn.Module, master_weights: bool = True) -> int:
    """Bytes of dense AdamW state for ``model``: m and v in the parameter dtype (fp32 with
    masters for low-precision parameters) plus the fp32 masters."""
    total = 0
    for p in model.parameters():
        low = p.dtype in _LOW_PRECISION and master_weights
        total += p.numel() * (12 if low else 2 * p.element_size())
    return total


__all__ = ["MaskedAdamW", "MaskedSGD", "dense_adamw_bytes"]
