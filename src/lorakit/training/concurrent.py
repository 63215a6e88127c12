"""Concurrent training of several adapters on one base model (m-LoRA / ASPEN style).

Each step concatenates one micro-batch per job on the batch dimension and runs ONE forward: the frozen base
computes once for all rows, and every row goes through its own job's adapter (``routing(adapter_names=...)``,
a stacked gathered bmm for plain LoRA deltas). A job trains as ``lorakit.train`` would train it alone, through
the loop's own helpers (``training.loop``): the model head's objective, the job's data order and ``grad_accum``
micro-batches, its task loss normalised by its own supervised tokens (so jobs do not dilute each other), its
optimizer from ``make_optimizer`` (the method's ``param_groups`` / per-group learning rates, a procedure's groups
and optimizer), ``schedule_lr``, clipping, and its method's and training procedure's hooks (``init``,
``extra_loss``, ``on_gradients``, ``on_step``, ``finish``; Flexora's held-out split). The forward gets the loop's
routing context (``objectives.batch_routing``: task keys, token mask, supervised mask, routing vectors) plus each
row's adapter name; a delta serving some rows of the batch sees only those rows' routing (``core.routing.
rows_routing``). A job that has finished its steps leaves the batch. Alone, a job gets the same adapter as
``lorakit.train`` with the same seed; beside other jobs, random draws in training (``lora_dropout``, GGPO's noise)
come from one stream seeded by the first job's seed, so such a job matches ``lorakit.train`` in distribution only.

Beside other jobs, refused up front (ConfigError / AdapterError naming the job; train such a job alone): a method
whose delta replaces a whole layer's forward (MixLoRA-style FFN experts, γ-MoD's blocks: they route every row of
the batch) or is computed from the whole batch (X-LoRA: ``Delta.whole_batch``), a procedure that does not declare
``shares_batch`` (it hooks the whole model, its logits or base weights), an init still to run that rewrites the
base weights (LoRA-GA, CorDA: ``Init.changes_base``), an optimizer holding parameters outside
the job's adapter (every job's rows would put gradients in them), and jobs of which only some have task keys.
Refused for any job: ``resume_from``. Not done here (use ``lorakit.train``): checkpoints (``save_every``),
evaluation during training (``eval_every``; ``eval_examples`` are scored once at the end), logging callbacks and
data-parallel runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..core.errors import AdapterError, ConfigError
from ..core.inits import init_adapter, init_pending, requested_init
from ..core.layer import AdapterLayer
from ..core.model import (active_adapters, adapter_names, adapter_parameters, adapter_state, refresh_trainable,
                          set_adapter)
from ..core.registry import get_method
from ..core.routing import ADAPTER_EXTRAS_KEY
from ..data import IGNORE_INDEX, Example, save_task_index
from ..io.peft_format import save_adapter
from .config import TrainConfig
from .loop import DataStream, check_init_batches, hook_losses, make_optimizer, schedule_lr, split_validation, step_hooks
from .objectives import batch_routing, objective_for
from .procedures import get_procedure


@dataclass
class Job:
    """One adapter to train: its name (already added to the model), data and training settings."""

    adapter_name: str
    examples: Sequence[Example]
    config: TrainConfig
    eval_examples: Sequence[Example] | None = None


@dataclass
class JobResult:
    adapter_name: str
    losses: list[float] = field(default_factory=list)
    final_metrics: dict[str, Any] | None = None
    adapter_dir: str | None = None


def _pad_cat(batches: list[dict[str, Any]], pad_id: int, names: Sequence[str]) -> dict[str, Any]:
    """One batch of the jobs' micro-batches ``batches`` (job ``names[i]``'s is ``batches[i]``), rows in order:
    token tensors right-padded to the longest; per-row ``task_ids`` and ``routing`` vectors concatenated. A routing
    vector a job's data lacks is zeros on its rows (only the job's own adapter reads its rows' routing,
    ``core.routing.rows_routing``); ConfigError when two jobs give one vector name different shapes."""
    length = max(b["input_ids"].shape[1] for b in batches)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    out = {"input_ids": torch.cat([pad(b["input_ids"], pad_id) for b in batches]),
           "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches]),
           "labels": torch.cat([pad(b["labels"], IGNORE_INDEX) if b["labels"].dim() == 2 else b["labels"]
                                for b in batches])}
    if any("task_ids" in b for b in batches):  # all jobs have keys (_check_shared), each from its own task index
        out["task_ids"] = torch.cat([b["task_ids"] for b in batches])
    shapes: dict[str, tuple[str, torch.Tensor]] = {}
    for name, b in zip(names, batches):
        for key, vector in (b.get("routing") or {}).items():
            seen = shapes.setdefault(key, (name, vector))
            if seen[1].shape[1:] != vector.shape[1:]:
                raise ConfigError(f"routing vector {key!r} has shape {tuple(seen[1].shape[1:])} per row in job "
                                  f"{seen[0]!r}'s data and {tuple(vector.shape[1:])} in job {name!r}'s: give it one "
                                  "shape, or train the jobs separately")
    if shapes:
        out["routing"] = {key: torch.cat([(b.get("routing") or {}).get(key, vector.new_zeros(
            b["input_ids"].shape[0], *vector.shape[1:])) for b in batches]) for key, (_, vector) in shapes.items()}
    return out


def _refuse_shared_batch(model: torch.nn.Module, jobs: Sequence[Job]) -> None:
    """Up front, before any init runs: what cannot share a batch with other jobs."""
    names = [j.adapter_name for j in jobs]
    for _, layer in model.named_modules():
        if not isinstance(layer, AdapterLayer):
            continue
        whole = [n for n in names if n in layer.adapters and layer.adapters[n].replaces_base]
        if whole:
            raise AdapterError(f"concurrent training needs per-row adapters; job {whole[0]!r}'s method replaces a "
                               "whole layer's forward (FFN-level mixture, γ-MoD block), which routes every row of "
                               "the batch: train that job alone (train_concurrent with one job, or lorakit.train)")
        batch_wide = [n for n in names if n in layer.adapters and layer.adapters[n].whole_batch]
        if batch_wide:
            raise AdapterError(f"concurrent training needs per-row adapters; job {batch_wide[0]!r}'s method computes "
                               "its delta from the whole batch (X-LoRA's scaling pass over every row): train that "
                               "job alone (train_concurrent with one job, or lorakit.train)")
    keyed = [j.adapter_name for j in jobs if any(ex.task is not None for ex in j.examples)]  # (TokenizedDataset's rule)
    if keyed and len(keyed) < len(jobs):
        plain = next(n for n in names if n not in keyed)
        raise ConfigError(f"job {keyed[0]!r}'s data has task keys and job {plain!r}'s has none; rows of one batch "
                          "either all carry a key or none do: give every example a task, or train them separately")
    for job in jobs:
        init = requested_init(model, job.adapter_name)
        if init is not None and init.changes_base and init_pending(model, job.adapter_name):
            raise ConfigError(f"job {job.adapter_name!r}: its init {init.name!r} rewrites the base weights every job's "
                              "rows go through (W - s·B·A), so the other jobs would train on another base than alone: "
                              "train that job alone (train_concurrent with one job, or lorakit.train)")
        name = job.config.procedure
        if name is not None and not get_procedure(name).cls.shares_batch:
            raise ConfigError(f"job {job.adapter_name!r}: training procedure {name!r} acts on the whole model (its "
                              "forward, logits, base weights or optimizer), not only on the job's adapter, so it "
                              "cannot share a batch with other jobs: train that job alone (train_concurrent with "
                              "one job, or lorakit.train)")


def train_concurrent(model: torch.nn.Module, tokenizer: Any, jobs: Sequence[Job], *, output_dir: str | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Train every job's adapter at once on one base model; returns ``{"jobs": {name: JobResult}, "wall_time_s",
    "tokens_per_s", "steps"}``. Raises ValueError for no jobs or duplicate jobs, AdapterError for an unknown adapter, and
    AdapterError / ConfigError naming the job for what cannot share a batch (see the module docstring)."""
    names = [j.adapter_name for j in jobs]
    if not names:
        raise ValueError("train_concurrent needs at least one job")
    if len(set(names)) != len(names):
        raise ValueError(f"each job needs its own adapter; got {names}")
    for n in names:
        if n not in adapter_names(model):
            raise AdapterError(f"no adapter {n!r} on the model; add_adapter it before train_concurrent")
    for job in jobs:
        check_init_batches(model, job.adapter_name, job.config)
        if job.config.resume_from is not None:
            raise ConfigError(f"job {job.adapter_name!r}: train_concurrent writes no checkpoints and cannot resume "
                              f"from {job.config.resume_from!r}; resume that job with lorakit.train")
    if len(jobs) > 1:
        _refuse_shared_batch(model, jobs)
    found_active, found_training = active_adapters(model), model.training
    try:
        return _train_concurrent(model, tokenizer, jobs, names, output_dir, progress)
    finally:  # leave the model as found: same active adapters, same train/eval mode
        set_adapter(model, found_active)
        model.train(found_training)


class _JobRun:
    """One job's part of the run: data, method, procedure, optimizer and position, set up as lorakit.train does."""

    def __init__(self, model, tokenizer, job: Job, objective, device) -> None:
        c = self.config = job.config
        self.job, self.name, self.device = job, job.adapter_name, device
        self.method = get_method(adapter_state(model).configs[self.name])
        self.procedure = get_procedure(c.procedure).build(c) if c.procedure is not None else None
        examples, validation = split_validation(self.procedure, c, job.examples)
        if not examples:
            raise ValueError(f"job {self.name!r} has no training examples")
        self.dataset = objective.dataset(examples, tokenizer, c.max_length)
        self.collate = objective.collator(tokenizer)
        self.stream = DataStream(len(self.dataset), c.seed)
        self.position, self.step, self.result = 0, 0, JobResult(self.name)
        set_adapter(model, self.name)  # the init and the optimizer see only this job's adapter, as when alone
        if self.method.init is not None or init_pending(model, self.name):
            batches = [self.to_device(self.micro_batch(i * c.batch_size)) for i in range(c.init_batches)]
            if self.method.init is not None:
                self.method.init(model, self.name, batches)
            if init_pending(model, self.name):
                init_adapter(model, self.name, batches)
        if validation:
            val_set = objective.dataset(validation, tokenizer, c.max_length, task_to_id=self.dataset.task_to_id)
            self.procedure.set_validation(lambda idx: self.to_device(self.collate([val_set[i] for i in idx])),
                                          len(val_set))
        self.optimizer, self.params = make_optimizer(model, self.name, c, self.method, self.procedure)

    def micro_batch(self, position: int) -> dict[str, Any]:
        return self.collate([self.dataset[i] for i in self.stream.indices(position, self.config.batch_size)])

    def to_device(self, batch: dict) -> dict:
        return {k: ({n: t.to(self.device) for n, t in v.items()} if isinstance(v, dict) else v.to(self.device))
                for k, v in batch.items()}


def _check_shared(model, runs: list[_JobRun]) -> None:
    """Beside other jobs, once the optimizers are built: each holds only its job's adapter's parameters."""
    for run in runs:
        own = adapter_parameters(model, run.name)
        outside = [n for n in run.params if n not in own]
        if outside:
            raise ConfigError(f"job {run.name!r} trains parameters outside its adapter ({outside[0]!r}"
                              f"{f' and {len(outside) - 1} more' if len(outside) > 1 else ''}); every job's rows "
                              "pass through them, so the jobs' gradients would mix: train that job alone")


def _train_concurrent(model, tokenizer, jobs, names, output_dir, progress) -> dict[str, Any]:
    device = next(model.parameters()).device
    objective = objective_for(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(jobs[0].config.seed)  # as lorakit.train: before the inits, so a lone job draws alike
    model.train()
    runs = [_JobRun(model, tokenizer, job, objective, device) for job in jobs]
    if len(runs) > 1:
        _check_shared(model, runs)
    # Each row's key id indexes its own job's sorted task names: the names reach each job's deltas as per-adapter
    # extras (core.routing.rows_routing), as the loop's ``task_names`` reach a lone job's.
    key_names = {ADAPTER_EXTRAS_KEY: {r.name: {"task_names": [n for n, _ in sorted(
        r.dataset.task_to_id.items(), key=lambda kv: kv[1])]} for r in runs if r.dataset.task_to_id is not None}}
    indices = {tuple(sorted(r.dataset.task_to_id.items())) for r in runs if r.dataset.task_to_id is not None}
    if len(indices) == 1:  # one task index for every row (a lone job): also for readers of the whole batch
        key_names["task_names"] = key_names[ADAPTER_EXTRAS_KEY][runs[0].name]["task_names"]
    set_adapter(model, names)  # all trainable; each row still uses only its own adapter
    total = max(j.config.steps for j in jobs)
    start, tokens = time.perf_counter(), 0
    bar = tqdm(total=total, desc="train x%d" % len(jobs), disable=not progress, dynamic_ncols=True)
    for _ in range(total):
        live = [r for r in runs if r.step < r.config.steps]
        step_batches, supervised, step_loss = {}, {}, {}
        for r in live:
            c = r.config
            step_batches[r.name] = [r.micro_batch(r.position + i * c.batch_size) for i in range(c.grad_accum)]
            r.position += c.batch_size * c.grad_accum
            supervised[r.name] = max(sum(objective.count(b) for b in step_batches[r.name]), 1)
            step_loss[r.name] = 0.0
            schedule_lr(r.optimizer, c, r.step)  # before backward, as the loop (GaLore per layer)
        for micro in range(max(r.config.grad_accum for r in live)):
            members = [r for r in live if micro < r.config.grad_accum]
            parts = [step_batches[r.name][micro] for r in members]
            batch = members[0].to_device(_pad_cat(parts, pad_id, [r.name for r in members]))
            rows = [r.name for r, part in zip(members, parts) for _ in range(part["input_ids"].shape[0])]
            tokens += int(batch["attention_mask"].sum())
            with batch_routing(batch, extras=key_names, adapter_names=rows):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, offset = 0.0, 0
            for r, part in zip(members, parts):
                n = part["input_ids"].shape[0]
                job_loss = objective.loss_sum(logits[offset:offset + n],
                                              {"labels": batch["labels"][offset:offset + n]}) / supervised[r.name]
                step_loss[r.name] += float(job_loss.detach())
                extra = hook_losses(model, r.name, r.method, r.procedure, r.config.grad_accum)
                loss = loss + job_loss + (extra if extra is not None else 0.0)
                offset += n
            loss.backward()
        changed = False
        for r in live:
            c = r.config
            if r.procedure is not None:
                r.procedure.on_gradients(model, r.name, r.step)
            torch.nn.utils.clip_grad_norm_(list(r.params.values()), c.max_grad_norm or math.inf)
            r.optimizer.step()
            r.optimizer.zero_grad(set_to_none=True)
            r.step += 1
            r.result.losses.append(step_loss[r.name])
            changed = step_hooks(model, r.name, r.method, r.procedure, r.step, c.steps) or changed
        if changed:
            refresh_trainable(model)  # a hook changed what an adapter freezes (Delta.frozen_names)
        bar.update(1)
        bar.set_postfix({r.name: f"{r.result.losses[-1]:.3f}" for r in live})
    bar.close()
    wall = time.perf_counter() - start
    for r in runs:
        if r.procedure is not None:
            r.procedure.finish(model, r.name)
    model.eval()
    for r in runs:
        job, result = r.job, r.result
        if job.eval_examples:
            set_adapter(model, r.name)
            eval_set = list(job.eval_examples)[: r.config.eval_examples]
            result.final_metrics = objective.evaluate(None, model, tokenizer, eval_set, batch_size=r.config.batch_size,
                                                      task_to_id=r.dataset.task_to_id, progress=False)
        if output_dir is not None:
            directory = Path(output_dir) / r.name
            result.adapter_dir = str(save_adapter(model, directory, r.name))
            if r.dataset.task_to_id is not None:
                save_task_index(directory, r.dataset.task_to_id)
    return {"jobs": {r.name: r.result for r in runs}, "wall_time_s": wall,
            "tokens_per_s": tokens / max(wall, 1e-9), "steps": total}
