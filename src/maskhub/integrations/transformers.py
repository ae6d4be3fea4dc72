"""Train only a mask's subnetwork with ``transformers.Trainer`` and the TRL trainers.

:class:`MaskCallback` (gradient masking + exact freeze over the Trainer's own optimizer), or
:func:`masked_optimizer` (a :class:`~maskhub.training.masked_optim.MaskedAdamW` with state only
for the subnetwork, and the Trainer's learning-rate schedule) for ``Trainer(optimizers=...)``::

    trainer = Trainer(model=model, args=args, ...,
                      optimizers=masked_optimizer(model, "tulu-dpo", args))

Works for ``Trainer`` and the TRL trainers (DPO, GRPO, PPO... subclass ``Trainer``)::

    from maskhub.integrations.transformers import MaskCallback

    trainer = DPOTrainer(..., callbacks=[MaskCallback("org/tulu-dpo-mask")])

The mask is applied at ``on_train_begin``, after the Trainer has wrapped the model (DDP,
FSDP2) and built its optimizer, and removed at ``on_train_end``.
"""

from __future__ import annotations

import os
from typing import Any

from maskhub.errors import UsageError
from maskhub.training.masked_optim import MaskedAdamW
from maskhub.training.masking import MaskHandle, apply_mask, resolve_mask

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("maskhub.integrations.transformers needs transformers: "
                      "pip install 'maskhub[train]'") from exc


class MaskCallback(TrainerCallback):
    """Apply a mask (gradient masking + exact freeze) to the Trainer's model at train begin.

    ``mask``: a :class:`~maskhub.Mask`, a registry name or id prefix, a Hub repo id
    ``org/name[@revision]`` (fetched with ``maskhub.Mask.from_hub``), a mask store path or a
    ``{name: bool array}`` mapping. ``home``: the registry for names (default
    ``$MASKHUB_HOME``). Other keyword arguments go to :func:`maskhub.torch.apply_mask`
    (``exact``, ``snapshot_device``, ``strip_prefix``, ``add_prefix``, ``name_map``,
    ``missing``, ``extra``).
    """

    def __init__(self, mask: Any, *, home: str | os.PathLike[str] | None = None,
                 **apply_kwargs: Any) -> None:
        """Remember what to apply; nothing is loaded until training begins."""
        self.mask = mask
        self.home = home
        self.apply_kwargs = apply_kwargs
        self.handle: MaskHandle | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        """Resolve the mask and apply it to ``model``."""
        if model is None:
            raise UsageError("MaskCallback got no model at train begin")
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        source = resolve_mask(self.mask, self.home)
        self.handle = apply_mask(model, source, **self.apply_kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the hooks and free the mask and snapshot."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def masked_optimizer(model: Any, mask: Any, args: Any, *,
                     num_training_steps: int | None = None,
                     home: str | os.PathLike[str] | None = None,
                     **optimizer_kwargs: Any) -> tuple[MaskedAdamW, Any]:
    """``(MaskedAdamW, scheduler)`` for ``Trainer(optimizers=...)``: AdamW's hyperparameters
    (learning rate, betas, epsilon, weight decay) and the schedule (``lr_scheduler_type``,
    warm-up) from the ``TrainingArguments`` ``args``, over ``num_training_steps`` (default
    ``args.max_steps``). ``optimizer_kwargs`` go to :class:`MaskedAdamW` (``master_weights``,
    ``fused_backward``, name matching...). Call it with the model the Trainer will train,
    before building the Trainer. ``fused_backward=True`` needs ``max_grad_norm=0`` (the
    Trainer's clipping reads dense gradients that it frees); gradient accumulation works."""
    from transformers import get_scheduler

    steps = num_training_steps or getattr(args, "max_steps", 0)
    if not steps or steps <= 0:
        raise UsageError("masked_optimizer needs the number of training steps: set "
                         "max_steps in the TrainingArguments or pass num_training_steps")
    if optimizer_kwargs.get("fused_backward") and (args.max_grad_norm or 0) > 0:
        # The Trainer clips the dense gradients, which fused_backward has already freed: it
        # would find none and silently not clip.
        raise UsageError(f"fused_backward=True frees the dense gradients that the Trainer's "
                         f"max_grad_norm={args.max_grad_norm} clipping reads: set "
                         f"max_grad_norm=0 in the TrainingArguments")
    optimizer = MaskedAdamW(model, mask, lr=args.learning_rate,
                            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                            weight_decay=args.weight_decay, home=home, **optimizer_kwargs)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                              num_warmup_steps=args.get_warmup_steps(steps),
                              num_training_steps=steps)
    return optimizer, scheduler


class RecordCallback(TrainerCallback):
    """Record the run's update masks while a ``Trainer`` (or a TRL trainer) trains: no
    checkpoint is written to get the mask or its trajectory.

    ``run``: masks are registered as ``RUN-step-N`` (every ``record_every`` optimizer steps,
    and with ``on_save=True`` at each checkpoint save, and at the end) and ``RUN-ever`` with
    the trajectory rows at train end (``self.result``). Other keyword arguments go to
    :class:`~maskhub.training.recorder.Recorder` (``keep``, ``base``, ``tol``, ``per_step``,
    ``algorithm``...). θ0 is the model at train begin, after the Trainer wrapped it, so it
    works beside :class:`MaskCallback` and :class:`~maskhub.torch.MaskedAdamW`.
    """

    def __init__(self, run: str, *, record_every: int | None = None, on_save: bool = False,
                 home: str | os.PathLike[str] | None = None, **recorder_kwargs: Any) -> None:
        """Remember the schedule; nothing is kept until training begins."""
        if record_every is not None and record_every <= 0:
            raise UsageError("record_every must be a positive number of steps")
        self.run = run
        self.record_every = record_every
        self.on_save_ = on_save
        self.home = home
        self.recorder_kwargs = recorder_kwargs
        self.recorder: Any = None
        self.result: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        """Keep θ0 (the model as the Trainer starts training it)."""
        from maskhub.training.recorder import Recorder

        if model is None:
            raise UsageError("RecordCallback got no model at train begin")
        self.recorder = Recorder(model, self.run, home=self.home, step=state.global_step,
                                 **self.recorder_kwargs)

    def _record(self, state: Any) -> None:
        if self.recorder is not None and state.global_step > self.recorder.last_step:
            self.recorder.record(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record every ``record_every`` optimizer steps."""
        if self.record_every and state.global_step % self.record_every == 0:
            self._record(state)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """With ``on_save=True``: record at each checkpoint save."""
        if self.on_save_:
            self._record(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record the last step (if not yet) and register the trajectory."""
        if self.recorder is None:
            return
        self._record(state)
        self.result = self.recorder.finish()
        self.recorder = None
