"""Training a lorakit model under Hugging Face ``transformers.Trainer``.

A lorakit model is the host model itself, with its base weights frozen and the adapter's trainable, so
Trainer trains it unchanged. What Trainer does not know is lorakit's method hooks and adapter files;
:class:`LorakitCallback` adds them:

- ``init`` runs on a few of Trainer's own batches before the first step (not when resuming);
- ``on_step`` runs after every optimizer step;
- the adapter is saved in PEFT format into each Trainer checkpoint folder and, at the end, into
  ``output_dir/adapter`` (Trainer's own ``model.safetensors`` has lorakit's wrapped module names, which
  ``from_pretrained`` cannot read).

A method's ``param_groups`` reach Trainer through its ``optimizers`` argument:
``Trainer(..., optimizers=(make_optimizer(model, name, train_config)[0], None))``. A method's
``extra_loss`` cannot be added from a callback; such methods warn here, and train with
:func:`lorakit.training.train`.

A training procedure (``lorakit.training.procedures``) is one instance shared by the optimizer and the
callback: ``proc = get_procedure(name).build(train_config)``, ``optimizers=(make_optimizer(model, name,
train_config, procedure=proc)[0], None)``, ``callbacks=[LorakitCallback(name, procedure=proc)]``. The callback
calls its ``on_gradients`` before each optimizer step (after Trainer's clipping), ``on_step`` after it and
``finish`` at the end; ``train_config.grad_accum`` must equal ``gradient_accumulation_steps``. Its
``extra_loss`` is not added (warning), nor its ``state_dict`` saved in Trainer checkpoints.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from ..core.model import adapter_state
from ..core.registry import get_method
from ..io.peft_format import save_adapter
from .procedures import Procedure


class LorakitCallback(TrainerCallback):
    """Method hooks and PEFT-format adapter saving for ``transformers.Trainer``."""

    def __init__(self, adapter_name: str = "default", init_batches: int = 4, procedure: Procedure | None = None) -> None:
        self.adapter_name = adapter_name
        self.init_batches = init_batches
        self.procedure = procedure

    def _method(self, model: torch.nn.Module):
        return get_method(adapter_state(model).configs[self.adapter_name])

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs: Any):
        method = self._method(model)
        if method.extra_loss is not None:
            warnings.warn(f"method {method.name!r} has an extra_loss that transformers.Trainer does not add; "
                          "train with lorakit.training.train to include it.", stacklevel=2)
        if self.procedure is not None and type(self.procedure).extra_loss is not Procedure.extra_loss:
            warnings.warn(f"procedure {type(self.procedure).__name__} has an extra_loss that transformers.Trainer "
                          "does not add; train with lorakit.training.train to include it.", stacklevel=2)
        if method.init is not None and state.global_step == 0 and train_dataloader is not None:
            device = next(model.parameters()).device
            batches = []
            for batch in train_dataloader:
                batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
                if len(batches) == self.init_batches:
                    break
            method.init(model, self.adapter_name, batches)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs: Any):
        if self.procedure is not None:
            self.procedure.on_gradients(model, self.adapter_name, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs: Any):
        method = self._method(model)
        # Trainer never calls extra_loss: drop the routing records mixtures kept for it, so no graph piles up.
        from ..mixtures.base import pop_aux_records
        pop_aux_records(model, self.adapter_name)
        if method.on_step is not None:
            method.on_step(model, self.adapter_name, state.global_step, state.max_steps)
        if self.procedure is not None:
            self.procedure.on_step(model, self.adapter_name, state.global_step, state.max_steps)

    def on_save(self, args, state, control, model=None, **kwargs: Any):
        save_adapter(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), self.adapter_name)

    def on_train_end(self, args, state, control, model=None, **kwargs: Any):
        if self.procedure is not None:
            self.procedure.finish(model, self.adapter_name)
        save_adapter(model, os.path.join(args.output_dir, "adapter"), self.adapter_name)
