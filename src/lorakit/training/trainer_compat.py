"""Training a lorakit model under Hugging Face ``transformers.Trainer``.

A lorakit model is the host model itself, with its base weights frozen and the adapter's trainable, so
Trainer trains it unchanged. What Trainer does not know is lorakit's method hooks and adapter files;
:class:`LorakitCallback` adds them:

- each forward of the model runs inside a routing context built from its batch, as in lorakit's own loop:
  ``attention_mask`` as the token mask, ``task_ids`` (popped from the batch) as the routing keys, the data's
  task names, per-example ``routing`` vectors and the supervised tokens' mask (``labels != -100``) as extras;
- a method's ``extra_loss`` (MixLoRA / MoLE / MoLA balance losses, MeteoRA's gate loss, MixDA's general-data
  MSE) is added to the loss the model returns, scaled as lorakit's loop scales it (averaged over the step's
  micro-batches): divided by the gradient-accumulation steps when Trainer gave the model
  ``num_items_in_batch`` (it then leaves the loss undivided), as is otherwise (Trainer divides it);
- ``init`` runs on the first ``init_batches`` of Trainer's own batches before the first step (not when resuming),
  and so does a data-driven init the adapter's config names and ``add_adapter`` left pending (CorDA, LoRA-GA,
  EVA …; ``lorakit.core.inits.init_pending``), after the method's, as lorakit's loop runs them. Trainer built its
  optimizer before: where the init replaced parameters (EVA changing a layer's rank) the optimizer's groups are
  pointed at the new ones (:func:`swap_replaced_parameters`; with a procedure, whose optimizer may hold more than
  its groups, a ConfigError says to run ``lorakit.init_adapter`` before building it). Under distributed Trainer
  such an init is refused (each process's loader gives other batches); run ``lorakit.init_adapter`` before Trainer
  there. When resuming,
  Trainer's checkpoint (``model.safetensors``: base and adapter) already holds the init's result, so it does not
  run again. What Trainer's model state lacks the callback adds to the checkpoints Trainer saves (only there, not
  to a user's ``model.state_dict()``): each adapter's init record
  (``lorakit.core.inits.init_record_tensors``: the base edits as low-rank factors, the adapter's config after the
  init), restored when Trainer loads the checkpoint. So the resumed model's ``restore_base`` / ``save_adapter(...,
  original_base=True)`` undo the base edits as the straight run's do, and an init that reshaped the adapter (EVA's
  ranks) has its shapes rebuilt before Trainer copies the tensors in (a user-built optimizer is pointed at the new
  parameters). A checkpoint without that record (written by an older lorakit) resuming a base-editing init
  (CorDA, LoRA-GA …) is refused with a ConfigError: the edits could no longer be undone. (The record rides on
  ``model.state_dict`` / ``load_state_dict``, which Trainer uses for plain and DDP runs; FSDP and DeepSpeed load
  their own checkpoint formats and are not covered). A sharded checkpoint (a model above save_pretrained's shard
  size) loads shard by shard in no fixed order: the record's pieces are gathered across shards and an adapter's
  tensors are held back until its record is installed (its rebuild done), so the order does not matter. Resuming
  accepts from the checkpoint only the config fields the init rewrites (``Init.rewrites``: EVA's targets and
  patterns) and refuses any other difference, naming it, before changing the model;
- the adapter config's ``check_examples`` runs on a lorakit dataset's examples (``TokenizedDataset``) before
  anything else in ``train()``, as in lorakit's loop;
- ``on_step`` runs after every optimizer step;
- the adapter is saved in PEFT format into each Trainer checkpoint folder and, at the end, into
  ``output_dir/adapter`` (Trainer's own ``model.safetensors`` holds the base under the host's names, which
  ``from_pretrained`` reads as the base model, and the adapter's tensors, which only a lorakit model loads back).

A method's ``param_groups`` reach Trainer through its ``optimizers`` argument:
``Trainer(..., optimizers=(make_optimizer(model, name, train_config)[0], None))``. The routing context and the
extra loss come from wrapping the model's ``forward`` from Trainer's construction to the end of ``train()``, which
unwraps it on any exit, a raise included (and wraps it again for a second ``train()``).
Where Trainer computes the loss itself (``label_smoother`` / ``compute_loss_func``: the model returns no
loss), the extra loss cannot be added; the callback then warns once.

A training procedure (``lorakit.training.procedures``) is one instance shared by the optimizer and the
callback: ``proc = get_procedure(name).build(train_config)``, ``optimizers=(make_optimizer(model, name,
train_config, procedure=proc)[0], None)``, ``callbacks=[LorakitCallback(name, procedure=proc)]``. The callback
adds its ``extra_loss`` as the method's, calls its ``on_gradients`` before each optimizer step (after
Trainer's clipping), ``on_step`` after it and ``finish`` at the end; ``train_config.grad_accum`` must equal
``gradient_accumulation_steps``. Its ``state_dict`` is not saved in Trainer checkpoints.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from dataclasses import replace
from typing import Any

import torch
from transformers import TrainerCallback

from ..core.checkpointing import replay_routing_in_checkpoints
from ..core.errors import AdapterError, ConfigError
from ..core.inits import (RECORD_KEY, BaseSwap, Init, InitRecord, init_adapter, init_pending, init_record_tensors,
                          pop_init_records, requested_init)
from ..core.model import (adapter_layers, adapter_state, attach_plan, discard_adapter, plan_adapter,
                          refresh_trainable, set_adapter)
from ..core.registry import get_method
from ..io.peft_format import save_adapter
from ..mixtures.base import pop_aux_records
from .loop import step_hooks
from .objectives import batch_routing
from .procedures import Procedure


# Item columns (lorakit.data.TokenizedDataset) the collator turns into the batch's ``task_ids`` / ``routing``.
ROUTING_COLUMNS = ("task_id", "routing")


class LorakitCallback(TrainerCallback):
    """Method hooks and PEFT-format adapter saving for ``transformers.Trainer``."""

    def __init__(self, adapter_name: str = "default", init_batches: int = 4, procedure: Procedure | None = None) -> None:
        self.adapter_name = adapter_name
        self.init_batches = init_batches
        self.procedure = procedure
        self._shard_records: dict[str, torch.Tensor] = {}  # a sharded checkpoint's record tensors, gathered
        self._held: dict[str, torch.Tensor] = {}  # its adapter tensors held until their adapter's record is in

    def _method(self, model: torch.nn.Module):
        return get_method(adapter_state(model).configs[self.adapter_name])

    def on_init_end(self, args, state, control, model=None, **kwargs: Any):
        # Wrapped before Trainer builds its data loader: the wrapper's signature names the routing columns of
        # lorakit's dataset items (``task_id``, ``routing``), so Trainer's column removal
        # (``remove_unused_columns``, applied to the items before collation) keeps them.
        if model is not None:
            self._wrap_forward(model)
            self._hook_state(model, kwargs.get("optimizer"))
            self._unwrap_after_train(_caller_self(_trainer_code("__init__")), model)

    def _unwrap_after_train(self, trainer, model: torch.nn.Module) -> None:
        """Make ``trainer.train()`` wrap ``model``'s forward for its run and unwrap it on any exit, a raise included
        (Trainer has no callback event for a run that raises, so only a try/finally around ``train`` sees it)."""
        if trainer is None or "train" in trainer.__dict__:  # not built by Trainer.__init__, or already done
            return
        run = trainer.train

        @functools.wraps(run)
        def train(*args, **kwargs):
            self._wrap_forward(model)
            try:
                return run(*args, **kwargs)
            finally:
                self._restore_forward()

        trainer.train = train

    def _hook_state(self, model: torch.nn.Module, optimizer) -> None:
        """Carry the adapters' init records in the model state Trainer checkpoints and resumes from."""
        self._optimizer = optimizer  # a user-built one (Trainer(optimizers=...)); None when Trainer builds its own
        hooked = getattr(self, "_state_hooks", None)
        if hooked is not None and hooked[0] is not model:  # one callback for a second Trainer: hook its model
            for handle in hooked[1:]:
                handle.remove()
            hooked = None
        if hooked is None:
            self._shard_records.clear()
            self._held.clear()
            # torch marks a state_dict hook with an attribute, which a bound method cannot take: plain functions
            def save_records(module, state_dict, prefix, local_metadata):
                self._save_records(module, state_dict, prefix, local_metadata)

            def load_records(module, state_dict, prefix, *rest):
                self._load_records(module, state_dict, prefix, *rest)

            self._state_hooks = (model, model.register_state_dict_post_hook(save_records),
                                 model.register_load_state_dict_pre_hook(load_records))

    def _save_records(self, module, state_dict, prefix, local_metadata) -> None:
        # only inside Trainer's own checkpoint save: a user's model.state_dict() (before, after, or after a train()
        # that raised half-way) keeps the model's own keys, so a strict load into a plain model works
        if _called_from(_trainer_code("_save_checkpoint")):
            state_dict.update(init_record_tensors(module, prefix))

    def _load_records(self, module, state_dict, prefix, *args) -> None:
        """Before Trainer's load_state_dict copies a checkpoint in: take the init records out, rebuild an adapter
        the init reshaped, install the records. Every check runs before anything changes: a refused resume leaves
        the model as it was (its forward is unwrapped by the ``train`` that raised: ``_unwrap_after_train``)."""
        # Trainer's load_sharded_checkpoint calls this once per shard, in set order: a record (or part of it) may
        # come after the adapter tensors it reshapes, so it is gathered across shards, and the tensors of an adapter
        # whose init is still pending are held back until its record is installed (or, never, at on_train_begin)
        sharded = _called_from(_load_sharded_code())
        if sharded:
            head = prefix + RECORD_KEY
            ours = [k for k in state_dict if k.startswith(head)]
            self._shard_records.update({k: state_dict.pop(k) for k in ours})
            records = pop_init_records(self._shard_records, prefix, partial=True)
        else:
            records = pop_init_records(state_dict, prefix)
        plans = {name: self._check_record(module, name, record, config)
                 for name, (record, config) in records.items()}
        state = adapter_state(module)
        for name, (record, _) in records.items():
            if plans[name] is not None:
                self._rebuild_adapter(module, name, plans[name])
            layers = dict(adapter_layers(module))
            for path, edit in record.edits.items():
                weight = layers[path].base_layer.weight
                if isinstance(edit, BaseSwap):
                    edit.original = edit.original.to(weight.device)
                else:
                    edit.A, edit.B = edit.A.to(weight.device), edit.B.to(weight.device)
            state.inits[name] = record
            self._copy_held(module, name)
        if sharded:
            for name in state.configs:
                if init_pending(module, name):
                    mark = f".adapters.{name}."
                    self._held.update({k: state_dict.pop(k) for k in [k for k in state_dict if mark in k]})

    def _copy_held(self, model: torch.nn.Module, name: str | None = None) -> None:
        """Copy the adapter tensors held back from earlier shards (of adapter ``name``; None: all) into the model.
        ConfigError naming them where they do not fit (another adapter config than the checkpoint's)."""
        mark = None if name is None else f".adapters.{name}."
        keys = [k for k in self._held if mark is None or mark in k]
        if not keys:
            return
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        bad = [k for k in keys if k not in tensors or tensors[k].shape != self._held[k].shape]
        if bad:
            shown = ", ".join(f"{k} {tuple(self._held[k].shape)}" for k in bad[:3])
            raise ConfigError(f"the checkpoint's adapter tensors ({shown}{' …' if len(bad) > 3 else ''}) do not fit "
                              "this model's adapter; resume with the adapter config the checkpoint was trained with.")
        with torch.no_grad():
            for k in keys:
                tensors[k].copy_(self._held.pop(k))

    def _check_record(self, model: torch.nn.Module, name: str, record: InitRecord, config):
        """ConfigError where adapter ``name`` cannot take the checkpoint's record; the plan of the adapter rebuilt
        with the checkpoint's ``config`` where its pending init (EVA) reshaped it, else None.

        Only the fields that init rewrites (``Init.rewrites``) may differ from the config this model was given."""
        state = adapter_state(model)
        if name not in state.configs:
            raise ConfigError(f"the checkpoint records adapter {name!r}'s init {record.init!r}, but this model has "
                              f"no adapter {name!r} (it has {list(state.configs)}); add the adapter the checkpoint "
                              "was trained with before resuming.")
        ours, theirs = state.configs[name].to_dict(), config.to_dict()
        diff = sorted(k for k in {*ours, *theirs} if ours.get(k) != theirs.get(k))
        pending = requested_init(model, name) if init_pending(model, name) else None
        allowed = pending.rewrites if pending is not None and pending.name == record.init else ()
        refused = [k for k in diff if k not in allowed]
        if refused:
            fields = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, this model {ours.get(k)!r}" for k in refused[:6])
            why = f" (init {record.init!r} rewrites only {', '.join(allowed)})" if allowed else ""
            raise ConfigError(f"the checkpoint's adapter {name!r} was trained with another config than this model's "
                              f"({fields}{' …' if len(refused) > 6 else ''}){why}; resume with the adapter config "
                              "the checkpoint was trained with.")
        if diff and self.procedure is not None:
            # the rebuild gives the adapter new parameters; a procedure's optimizer may hold more than its groups
            raise ConfigError(
                f"resuming: adapter {name!r}'s init {record.init!r} reshaped it in the run that wrote the checkpoint "
                f"({', '.join(diff)}), so its parameters must be rebuilt to the checkpoint's shapes, after procedure "
                f"{type(self.procedure).__name__}'s optimizer was built on the old ones. Build the adapter with the "
                "checkpoint's config, dataclasses.replace(lorakit.read_adapter_config(<checkpoint folder>), "
                "inference_mode=False), then the optimizer "
                "(make_optimizer) and Trainer, and resume.")
        layers = dict(adapter_layers(model))
        for path in record.edits:
            if path not in layers:
                raise ConfigError(f"the checkpoint records a base edit of {path!r} by adapter {name!r}'s init "
                                  f"{record.init!r}, but this model does not adapt {path!r}; resume with the model "
                                  "and adapter config the checkpoint was trained with.")
        if not diff:
            return None
        # planned under a spare name while the adapter is still there: a plan that fails leaves the model as it was
        return replace(plan_adapter(model, config, f"{name}__resume"), name=name)

    def _rebuild_adapter(self, model: torch.nn.Module, name: str, plan) -> None:
        """Give adapter ``name`` the shapes of the checkpoint's config (what its pending init, e.g. EVA, made of it),
        so that Trainer's load finds them; the tensors come from the checkpoint. A user-built optimizer is pointed at
        the new parameters."""
        active = list(adapter_state(model).active)
        before = dict(model.named_parameters())
        discard_adapter(model, name)  # no other adapter gets activated in its place
        attach_plan(model, plan)
        set_adapter(model, active)
        self._point_optimizer(self._optimizer, before, dict(model.named_parameters()))

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, optimizer=None,
                       **kwargs: Any):
        method = self._method(model)
        # as lorakit's loop before step 0: data the method cannot train on (RecLoRA rows without user vectors, a
        # task without an expert) is refused before any init or step, not at the first forward. Only a lorakit
        # dataset (TokenizedDataset) keeps its Examples; another dataset's rows are not Examples and are not checked
        examples = getattr(getattr(train_dataloader, "dataset", None), "examples", None)
        if examples is not None:
            adapter_state(model).configs[self.adapter_name].check_examples(examples)
        task_to_id = getattr(getattr(train_dataloader, "dataset", None), "task_to_id", None)
        self._task_names = None if task_to_id is None else [n for n, _ in sorted(task_to_id.items(), key=lambda kv: kv[1])]
        self._grad_accum = args.gradient_accumulation_steps
        self._wrap_forward(model)
        # Trainer turned checkpointing on (args.gradient_checkpointing) before this: its recomputes in backward run
        # after the routed forward has returned, so they must replay its routing (core.checkpointing)
        replay_routing_in_checkpoints(model)
        if self._shard_records or self._held:
            self._finish_sharded_load(model)
        pending = requested_init(model, self.adapter_name) if init_pending(model, self.adapter_name) else None
        if pending is not None and state.global_step > 0:
            self._resume_without_record(model, pending, state.global_step)
            pending = None
        if state.global_step == 0 and train_dataloader is not None and (method.init is not None or pending is not None):
            self._run_inits(model, method, pending, args, train_dataloader, optimizer)

    def _finish_sharded_load(self, model: torch.nn.Module) -> None:
        """After Trainer loaded every shard: a record left incomplete is refused; adapter tensors held for a record
        that never came (a checkpoint without records) are copied in as Trainer would have."""
        try:
            if self._shard_records:
                raise AdapterError(f"the sharded checkpoint holds lorakit init tensors of no complete record "
                                   f"({', '.join(sorted(self._shard_records)[:3])}): a shard is missing or was "
                                   "written by another run.")
            self._copy_held(model)
        except BaseException:
            self._shard_records.clear()
            self._held.clear()
            raise

    def _resume_without_record(self, model: torch.nn.Module, pending: Init, step: int) -> None:
        """Resuming from a checkpoint that carries no record of the pending init, which ran in the run that wrote it
        (the callback runs it before step 1) and left its result in the checkpoint's model state. An init that left
        the base alone is counted as run; one that edited the base is refused, as its edits could not be undone."""
        if pending.changes_base:
            raise ConfigError(
                f"resuming at step {step}: adapter {self.adapter_name!r}'s init {pending.name!r} edited the base "
                "weights in the run that wrote the checkpoint, and the checkpoint holds no record of those edits "
                "(it was written without LorakitCallback or by an older lorakit), so restore_base and "
                "save_adapter(..., original_base=True) could not undo them on the resumed model. Train again from "
                "step 0, or resume a checkpoint this lorakit wrote.")
        adapter_state(model).inits[self.adapter_name] = InitRecord(init=pending.name, spec=str(
            adapter_state(model).configs[self.adapter_name].requested_init()))

    def _run_inits(self, model: torch.nn.Module, method, pending: Init | None, args, train_dataloader,
                   optimizer) -> None:
        """The method's init, then the pending one, on Trainer's first batches; the optimizer pointed at what they
        left. ConfigError where Trainer cannot give the pending init what lorakit's loop gives it."""
        if pending is not None:
            self._check_pending_init(pending, args)
        batches = self._init_batches(model, train_dataloader)
        before = dict(model.named_parameters())
        if method.init is not None:
            method.init(model, self.adapter_name, batches)
        if pending is not None:  # a data-driven init named by the config, as lorakit's loop runs it after the method's
            init_adapter(model, self.adapter_name, batches)
        self._point_optimizer(optimizer, before, dict(model.named_parameters()))

    def _point_optimizer(self, optimizer, before: dict[str, torch.nn.Parameter],
                         after: dict[str, torch.nn.Parameter]) -> None:
        """Point ``optimizer`` at the parameters an init (or a resume's rebuild) left; ConfigError under a procedure."""
        replaced = sorted(n for n, p in before.items() if after.get(n) is not p)
        if replaced and self.procedure is not None:
            # a procedure's optimizer may hold more than param_groups (GaLore's per-parameter gradient hooks)
            raise ConfigError(f"adapter {self.adapter_name!r}'s init replaced parameters ({', '.join(replaced[:3])}"
                              f"{' …' if len(replaced) > 3 else ''}: e.g. EVA changed a layer's rank) after procedure "
                              f"{type(self.procedure).__name__}'s optimizer was built on them. Run the init "
                              f"first, lorakit.init_adapter(model, {self.adapter_name!r}, batches), then build "
                              "the optimizer (make_optimizer) and Trainer.")
        if optimizer is not None:
            swap_replaced_parameters(optimizer, before, after)

    def _check_pending_init(self, init: Init, args) -> None:
        """ConfigError before anything runs where Trainer cannot give the pending init what lorakit's loop gives it."""
        if init.needs_data and self.init_batches < 1:
            raise ConfigError(f"LorakitCallback(init_batches={self.init_batches}), but adapter {self.adapter_name!r}'s "
                              f"init {init.name!r} is data-driven: give it at least one batch (default 4).")
        if init.needs_data and args.world_size > 1:
            # each process's loader gives its own shard: the processes would initialise (and, for EVA, shape) the
            # adapter differently and train apart; lorakit's loop gives every process the same batches
            raise ConfigError(f"adapter {self.adapter_name!r}'s init {init.name!r} is data-driven, and under "
                              f"distributed Trainer ({args.world_size} processes) each process's data loader gives "
                              "other batches, so the processes would start from different adapters. Run it before "
                              f"Trainer on the same batches in every process: lorakit.init_adapter(model, "
                              f"{self.adapter_name!r}, batches), or train with lorakit.training.train.")

    def _init_batches(self, model: torch.nn.Module, train_dataloader) -> list[dict[str, Any]]:
        """The first ``init_batches`` batches of Trainer's loader, on the model's device (warns when it has fewer)."""
        device = next(model.parameters()).device
        batches: list[dict[str, Any]] = []
        for batch in train_dataloader:
            if len(batches) == self.init_batches:
                break
            batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        if len(batches) < self.init_batches:  # the loader ran out: say so rather than init on less in silence
            warnings.warn(f"LorakitCallback(init_batches={self.init_batches}): the training data loader gave only "
                          f"{len(batches)} batch{'es' if len(batches) != 1 else ''}; adapter {self.adapter_name!r}'s "
                          f"init runs on those {len(batches)}. Give more training data or a lower init_batches.",
                          stacklevel=3)
        return batches

    def _wrap_forward(self, model: torch.nn.Module) -> None:
        """Run each forward in the batch's routing context and add the method's extra loss to its loss."""
        saved = getattr(self, "_saved_forward", None)
        if saved is not None and saved[0] is model:
            return
        self._restore_forward()  # one callback, a second Trainer: the first one's model (not training now) unwrapped
        forward = model.forward
        self._saved_forward = (model, model.__dict__.get("forward"))
        warned: list[bool] = []

        def routed_forward(*fargs, task_ids=None, routing=None, **fkwargs):
            fkwargs.pop("task_id", None)  # only named in the signature, for Trainer's column filter
            task_names = getattr(self, "_task_names", None)
            ids = fkwargs.get("input_ids", fargs[0] if fargs else None)
            batch = {"input_ids": ids, "attention_mask": fkwargs.get("attention_mask"), "labels": fkwargs.get("labels"),
                     "task_ids": task_ids, "routing": routing}
            with batch_routing(batch, extras={"task_names": task_names} if task_names else None):
                out = forward(*fargs, **fkwargs)
            method = self._method(model)
            procedure_loss = self.procedure is not None and type(self.procedure).extra_loss is not Procedure.extra_loss
            if (method.extra_loss is None and not procedure_loss) or not (model.training and torch.is_grad_enabled()):
                return out
            loss = out.get("loss") if isinstance(out, dict) else None
            if loss is None:
                pop_aux_records(model, self.adapter_name, for_loss=False)
                if not warned:
                    warned.append(True)
                    warnings.warn(f"method {method.name!r} or the procedure has an extra_loss, but the model returned no loss to add "
                                  "it to (Trainer computes the loss itself: label_smoother / compute_loss_func); it "
                                  "is not applied.", stacklevel=2)
                return out
            terms = [method.extra_loss(model, self.adapter_name) if method.extra_loss is not None else None,
                     self.procedure.extra_loss(model, self.adapter_name) if procedure_loss else None]
            extra = sum(t for t in terms if t is not None)
            if fkwargs.get("num_items_in_batch") is not None:  # Trainer will not divide this loss by grad_accum
                extra = extra / getattr(self, "_grad_accum", 1)
            out["loss"] = loss + extra
            return out

        signature = inspect.signature(forward)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
                   for n in ("task_ids", *ROUTING_COLUMNS)
                   if n not in signature.parameters]
        params += [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
        routed_forward.__signature__ = signature.replace(parameters=params)
        model.forward = routed_forward

    def _restore_forward(self) -> None:
        saved = getattr(self, "_saved_forward", None)
        if saved is None:
            return
        model, previous = saved
        if previous is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = previous
        self._saved_forward = None

    def on_step_end(self, args, state, control, model=None, **kwargs: Any):
        method = self._method(model)
        pop_aux_records(model, self.adapter_name, for_loss=False)  # nothing of a finished step's routing is kept
        if step_hooks(model, self.adapter_name, method, self.procedure, state.global_step, state.max_steps):
            # as lorakit's loop: a hook that froze parts (LaMDA's B) stops their gradients, so AdamW (which skips a
            # parameter without a gradient) no longer moves them by weight decay or momentum
            refresh_trainable(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs: Any):
        if self.procedure is not None:
            self.procedure.on_gradients(model, self.adapter_name, state.global_step)

    def on_save(self, args, state, control, model=None, **kwargs: Any):
        save_adapter(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), self.adapter_name)

    def on_train_end(self, args, state, control, model=None, **kwargs: Any):
        self._restore_forward()
        if self.procedure is not None:
            self.procedure.finish(model, self.adapter_name)
        save_adapter(model, os.path.join(args.output_dir, "adapter"), self.adapter_name)


def _trainer_code(name: str):
    from transformers import Trainer

    return getattr(Trainer, name).__code__


def _load_sharded_code():
    from transformers.trainer_utils import load_sharded_checkpoint

    return load_sharded_checkpoint.__code__


def _running_frame(code):
    """The innermost frame on the call stack running this code object, else None."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame


def _caller_self(code):
    """The ``self`` of the innermost call running this code object (Trainer.__init__ around on_init_end), else None."""
    frame = _running_frame(code)
    return None if frame is None else frame.f_locals.get("self")


def _called_from(code) -> bool:
    """Whether a function with this code object is on the call stack (a Trainer method around a state_dict call;
    a subclass that overrides it without calling it is not seen)."""
    return _running_frame(code) is not None


def swap_replaced_parameters(optimizer: torch.optim.Optimizer, before: dict[str, torch.nn.Parameter],
                             after: dict[str, torch.nn.Parameter]) -> None:
    """Point ``optimizer``'s groups at the parameters an init left (``before`` / ``after``: the model's named
    parameters around it). An init that sets tensors in place leaves the same objects; EVA builds new modules
    where it changes a layer's rank and drops rank-0 layers, whose old parameters Trainer's optimizer (built
    before ``on_train_begin``) would otherwise keep updating instead of the model's. Each parameter keeps its
    group (lr, weight decay); one no longer in the model, or no longer trainable, leaves the optimizer. Only
    before the first step: the optimizer has no state yet."""
    name_of = {id(p): n for n, p in before.items()}
    for group in optimizer.param_groups:
        kept = []
        for p in group["params"]:
            name = name_of.get(id(p))
            now = p if name is None else after.get(name)
            if now is not None and now.requires_grad:
                kept.append(now)
        group["params"][:] = kept
