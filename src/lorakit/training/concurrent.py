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
rows_routing``). A job that has finished its steps leaves the batch.

Random draws: alone, a job draws from torch's default generators seeded with its seed, as ``lorakit.train``. Beside
other jobs, each job draws from a stream of its own (``core.rng.RngStream``, seeded with its seed), swapped in for
everything that draws for it: its init, its method's and procedure's hooks (DyLoRA's rank in ``on_step``), and in
every adapter layer the draws for its rows (``Routing.rng_streams``: its ``lora_dropout`` mask, a forward hook's
noise such as GGPO's), at its micro-batch's own padded length rather than the mixed batch's
(``Routing.adapter_lengths``: the layer cuts the job's rows to it). A job's draws are then exactly those it makes
alone (same seed, same masks for its rows), and its losses and adapter equal ``lorakit.train``'s to float rounding
(1e-6 in tests/training/test_training_concurrent_rng.py). Where that does not hold (the job then matches
``lorakit.train`` in distribution only):

- the base model draws in training mode (hidden / attention dropout > 0, e.g. BERT's 0.1; decoder LLMs have 0):
  those draws cover the whole mixed batch, from the default generators seeded with the first job's seed;
- a draw over a token dimension that is not dim 1 of a linear layer's (batch, seq, in) input or of an embedding's
  (batch, seq) ids of the batch's length, or inside a ``modules_to_save`` copy (its input is not cut): it is drawn
  at the mixed batch's padded length, from the job's stream; equal to alone only when the job's micro-batch is
  as long as the mixed batch.

With activation (gradient) checkpointing on, a checkpointed block recomputes under the forward's routing, and each
job's stream draws in the recompute what it drew in the forward (``core.checkpointing``): jobs train as without it.

Beside other jobs, refused up front (ConfigError / AdapterError naming the job; train such a job alone): a method
whose delta replaces a whole layer's forward (MixLoRA-style FFN experts, γ-MoD's blocks: they route every row of
the batch) or is computed from the whole batch (X-LoRA: ``Delta.whole_batch``), a procedure that does not declare
``shares_batch`` (it hooks the whole model, its logits or base weights), an init still to run that rewrites the
base weights (LoRA-GA, CorDA: ``Init.changes_base``), an optimizer holding parameters outside
the job's adapter (every job's rows would put gradients in them), and jobs of which only some have task keys.

As ``lorakit.train``, per job and through the loop's helpers: ``on_log`` callbacks (``Job.on_log``: the job's
``log_record`` every ``log_every`` steps, its evaluations), ``eval_every`` (the job's adapter alone, training RNG
untouched: ``evaluate_adapter``), ``save_every`` checkpoints in the job's ``TrainConfig.output_dir`` (the same
``checkpoint-<step>`` folders, its own stream's RNG state in them) and ``resume_from`` (such a checkpoint, written
by either), ``TrainConfig.device``. Refused: jobs asking for different devices, and data-parallel launches (one
process trains every job). Not done here: Ctrl-C checkpoints (``TrainingInterrupted``) and ``TrainResult``'s
timing and memory fields per job (the run reports ``wall_time_s`` / ``tokens_per_s`` for all jobs together).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Sequence

import torch
from tqdm.auto import tqdm

from ..core.errors import AdapterError, ConfigError, UnknownAdapterError, did_you_mean
from ..core.inits import init_adapter, init_pending, requested_init
from ..core.layer import AdapterLayer
from ..core.model import (active_adapters, adapter_names, adapter_parameters, adapter_state, refresh_trainable,
                          set_adapter)
from ..core.registry import get_method
from ..core.rng import RngStream
from ..core.routing import ADAPTER_EXTRAS_KEY
from ..data import IGNORE_INDEX, Example
from ..io.files import atomic_write_json, write_dir_atomically
from ..mixtures.base import reset_router_stats, router_stats, router_summary
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .distributed import device_for, env_world
from .loop import (DataStream, LogCallback, activation_checkpointing, check_init_batches, checkpoint_state,
                   evaluate_adapter, hook_losses, init_batch_count, log_record, make_optimizer, resume_checkpoint,
                   save_or_rescue, schedule_lr, split_validation, step_hooks, write_adapter_dir)
from .objectives import batch_routing, objective_for
from .procedures import get_procedure


@dataclass
class Job:
    """One adapter to train: its name (already added to the model), data and training settings; ``eval_examples``
    and ``on_log`` as ``lorakit.train``'s (each callback gets this job's records, the ones ``lorakit.train`` of the
    job alone would send)."""

    adapter_name: str
    examples: Sequence[Example]
    config: TrainConfig
    eval_examples: Sequence[Example] | None = None
    on_log: Sequence[LogCallback] = ()


@dataclass
class JobResult:
    """One job's run, with ``lorakit.train``'s ``TrainResult`` fields of the same names: ``losses`` one task loss
    per optimizer step from step 1 (a resumed job's inherited ones included), ``eval_history`` its evaluations
    (``{"step", ...metrics}``), ``final_metrics`` the last one, ``checkpoints`` the ``checkpoint-<step>`` folders
    written, ``adapter_dir`` where the trained adapter was saved (``TrainConfig.output_dir/adapter`` when the job
    has an output_dir, else ``train_concurrent``'s ``output_dir/<adapter name>``), ``train_tokens`` the tokens of
    its rows."""

    adapter_name: str
    losses: list[float] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    final_metrics: dict[str, Any] | None = None
    steps: int = 0
    start_step: int = 0
    train_tokens: int = 0
    checkpoints: list[str] = field(default_factory=list)
    adapter_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    "tokens_per_s", "steps"}``.

    Files: a job whose ``TrainConfig.output_dir`` is set gets there what ``lorakit.train`` writes for it:
    ``checkpoint-<step>/`` every ``save_every`` steps (atomic, safetensors; its RNG state is the job's own stream, so
    ``lorakit.train`` or ``train_concurrent`` with ``resume_from`` continues it exactly), ``adapter/`` and
    ``train_result.json`` at the end. ``output_dir`` here (optional) also saves each job's adapter to
    ``output_dir/<adapter name>/``. The model moves to the jobs' ``TrainConfig.device`` (a job with None takes the
    others'; all None: CUDA when available, else CPU).

    Raises ValueError for no jobs, duplicate jobs or ``eval_every`` without ``eval_examples``, UnknownAdapterError
    (an AdapterError, with near-match names) for an unknown adapter, ConfigError for jobs on different devices or a
    run under torchrun / accelerate (WORLD_SIZE > 1: train each job with ``lorakit.train`` there), and AdapterError /
    ConfigError naming the job for what cannot share
    a batch (see the module docstring)."""
    names = [j.adapter_name for j in jobs]
    if not names:
        raise ValueError("train_concurrent needs at least one job")
    if len(set(names)) != len(names):
        raise ValueError(f"each job needs its own adapter; got {names}")
    for n in names:
        if n not in adapter_names(model):
            raise UnknownAdapterError(f"no adapter {n!r} on the model.{did_you_mean(n, adapter_names(model))} It has "
                                      f"{adapter_names(model)}; add_adapter it before train_concurrent")
    for job in jobs:
        check_init_batches(model, job.adapter_name, job.config)
        if job.config.eval_every and not job.eval_examples:
            raise ValueError(f"job {job.adapter_name!r}: TrainConfig.eval_every={job.config.eval_every} but the job "
                             "has no eval_examples.")
        try:
            job.config.check_steps()  # a checkpoint / evaluation / procedure schedule the job's run ends before
        except ConfigError as e:
            warnings.warn(f"job {job.adapter_name!r}: {e}", stacklevel=2)
    world = env_world()[1]
    if world > 1:
        raise ConfigError(f"train_concurrent runs in one process, and this is one of {world} (torchrun / accelerate "
                          "launch): run it without a launcher, or train each job data-parallel with lorakit.train")
    device = _one_device(jobs)
    if len(jobs) > 1:
        _refuse_shared_batch(model, jobs)
    asked = {job.config.gradient_checkpointing for job in jobs}
    if len(asked) > 1:
        on = next(j.adapter_name for j in jobs if j.config.gradient_checkpointing)
        off = next(j.adapter_name for j in jobs if not j.config.gradient_checkpointing)
        raise ConfigError(f"job {on!r} asks for gradient_checkpointing and job {off!r} does not; one forward runs "
                          "every job's rows through the same blocks: give them the same "
                          "TrainConfig.gradient_checkpointing, or train them separately",
                          field="TrainConfig.gradient_checkpointing")
    found_active, found_training = active_adapters(model), model.training
    try:
        with activation_checkpointing(model, asked.pop()):
            return _train_concurrent(model, tokenizer, jobs, names, output_dir, progress, device)
    finally:  # leave the model as found: same active adapters, same train/eval mode
        set_adapter(model, found_active)
        model.train(found_training)


def _one_device(jobs: Sequence[Job]) -> torch.device:
    """The device every job's rows run on: the jobs' ``TrainConfig.device`` (those with None follow the others),
    else what ``lorakit.train`` picks for None. ConfigError naming two jobs that ask for different devices."""
    asked: dict[tuple[str, int], tuple[str, str]] = {}
    for job in jobs:
        if job.config.device is not None:
            d = torch.device(job.config.device)
            asked.setdefault((d.type, d.index or 0), (job.adapter_name, job.config.device))
    if len(asked) > 1:
        (a, da), (b, db) = list(asked.values())[:2]
        raise ConfigError(f"jobs {a!r} and {b!r} ask for different devices ({da!r}, {db!r}); one forward runs every "
                          "job's rows on one device: give them the same TrainConfig.device, or train them separately")
    return device_for(next(iter(asked.values()))[1] if asked else None)


class _JobRun:
    """One job's part of the run: data, method, procedure, optimizer and position, set up as lorakit.train does."""

    def __init__(self, model, tokenizer, job: Job, objective, device, rng: RngStream | None) -> None:
        self.job, self.name, self.config, self.device, self.rng = job, job.adapter_name, job.config, device, rng
        with self.drawing():  # the init's draws, as lorakit.train's after torch.manual_seed(seed)
            self._set_up(model, tokenizer, objective)

    def drawing(self) -> ContextManager[Any]:
        """A block whose random draws come from the job's own stream (beside other jobs; alone: the default
        generators, seeded with the job's seed)."""
        return self.rng.drawing() if self.rng is not None else contextlib.nullcontext()

    def _set_up(self, model, tokenizer, objective) -> None:
        c = self.config
        self.method = get_method(adapter_state(model).configs[self.name])
        self.procedure = get_procedure(c.procedure).build(c) if c.procedure is not None else None
        examples, validation = split_validation(self.procedure, c, self.job.examples)
        if not examples:
            raise ValueError(f"job {self.name!r} has no training examples")
        self.dataset = objective.dataset(examples, tokenizer, c.max_length)
        self.labels = getattr(objective, "labels", None)  # a classifier's label names, saved as labels.json
        self.collate = objective.collator(tokenizer)
        self.stream = DataStream(len(self.dataset), c.seed)
        self.position, self.step, self.result = 0, 0, JobResult(self.name)
        self.tokens_seen, self.run_tokens, self.window, self.lr_factor = 0, 0, [], 1.0
        set_adapter(model, self.name)  # the init and the optimizer see only this job's adapter, as when alone
        if self.method.init is not None or init_pending(model, self.name):
            count = init_batch_count(c, len(self.dataset), f"job {self.name!r}'s init")
            batches = [self.to_device(self.micro_batch(i * c.batch_size)) for i in range(count)]
            if self.method.init is not None:
                self.method.init(model, self.name, batches)
            if init_pending(model, self.name):
                init_adapter(model, self.name, batches)
        if validation:
            val_set = objective.dataset(validation, tokenizer, c.max_length, task_to_id=self.dataset.task_to_id)
            self.procedure.set_validation(lambda idx: self.to_device(self.collate([val_set[i] for i in idx])),
                                          len(val_set))
        self.optimizer, self.params = make_optimizer(model, self.name, c, self.method, self.procedure)
        if c.resume_from is not None:  # (inside the job's stream: the checkpoint's RNG state becomes the stream's)
            record = resume_checkpoint(c, model, self.name, self.optimizer, self.params, self.procedure,
                                       len(self.dataset))
            self.step, self.position, self.tokens_seen = record["step"], record["data_position"], record["tokens_seen"]
            self.result.losses, self.result.eval_history = record["losses"], record["eval_history"]
        self.result.start_step = self.step
        self.eval_set = list(self.job.eval_examples or [])[: c.eval_examples]

    def emit(self, record: dict[str, Any]) -> None:
        for callback in self.job.on_log:
            callback(record)

    def write_adapter(self, model, directory: Path) -> None:
        write_adapter_dir(model, directory, self.name, self.dataset.task_to_id, self.labels)

    def evaluate(self, model, tokenizer, objective, device, names: Sequence[str]) -> None:
        """Evaluate the job's adapter alone (as lorakit.train does: only it active), record and report it."""
        set_adapter(model, self.name)
        try:
            metrics = evaluate_adapter(objective, None, model, tokenizer, self.eval_set, self.config,
                                       self.dataset.task_to_id, device, False)
        finally:
            set_adapter(model, list(names))
        self.result.eval_history.append({"step": self.step, **metrics})
        self.emit({"step": self.step, "eval": metrics})

    def checkpoint(self, model) -> None:
        """``checkpoint-<step>`` in the job's ``output_dir``, as lorakit.train writes it; the RNG state saved is the
        job's own stream's (saved inside it)."""
        c = self.config
        state = checkpoint_state(c, self.name, step=self.step, position=self.position,
                                 num_train_examples=len(self.dataset), tokens_seen=self.tokens_seen + self.run_tokens,
                                 losses=self.result.losses, eval_history=self.result.eval_history)
        with self.drawing():
            path = save_checkpoint(Path(c.output_dir) / f"checkpoint-{self.step}", model, self.name, self.optimizer,
                                   self.params, state, write_adapter=lambda d: self.write_adapter(model, d),
                                   extra_tensors=self.procedure.state_dict() if self.procedure is not None else None)
        self.result.checkpoints.append(str(path))

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


def _train_concurrent(model, tokenizer, jobs, names, output_dir, progress, device) -> dict[str, Any]:
    model.to(device)
    objective = objective_for(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(jobs[0].config.seed)  # as lorakit.train: a lone job draws from the default generators alike
    model.train()
    # Beside other jobs, each job draws from a stream of its own seeded with its seed: its init, hooks and the
    # layers' draws for its rows (routing's rng_streams) continue as the default generators would alone.
    streams = {j.adapter_name: RngStream(j.config.seed, device) for j in jobs} if len(jobs) > 1 else {}
    runs = [_JobRun(model, tokenizer, job, objective, device, streams.get(job.adapter_name)) for job in jobs]
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
    reset_router_stats(model)  # router statistics (mixtures) describe this run's training forwards only
    total = max(r.config.steps - r.step for r in runs)
    start, tokens, train_time = time.perf_counter(), 0, 0.0
    bar = tqdm(total=total, desc="train x%d" % len(jobs), disable=not progress, dynamic_ncols=True)
    for _ in range(total):
        step_start = time.perf_counter()
        live = [r for r in runs if r.step < r.config.steps]
        step_batches, supervised, step_loss = {}, {}, {}
        for r in live:
            c = r.config
            step_batches[r.name] = [r.micro_batch(r.position + i * c.batch_size) for i in range(c.grad_accum)]
            r.position += c.batch_size * c.grad_accum
            supervised[r.name] = max(sum(objective.count(b) for b in step_batches[r.name]), 1)
            r.run_tokens += sum(int(b["attention_mask"].sum()) for b in step_batches[r.name])
            step_loss[r.name] = 0.0
            r.lr_factor = schedule_lr(r.optimizer, c, r.step)  # before backward, as the loop (GaLore per layer)
        for micro in range(max(r.config.grad_accum for r in live)):
            members = [r for r in live if micro < r.config.grad_accum]
            parts = [step_batches[r.name][micro] for r in members]
            batch = members[0].to_device(_pad_cat(parts, pad_id, [r.name for r in members]))
            rows = [r.name for r, part in zip(members, parts) for _ in range(part["input_ids"].shape[0])]
            tokens += int(batch["attention_mask"].sum())
            lengths = {r.name: part["input_ids"].shape[1] for r, part in zip(members, parts)} if streams else None
            with batch_routing(batch, extras=key_names, adapter_names=rows, rng_streams=streams or None,
                               adapter_lengths=lengths):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, offset = 0.0, 0
            for r, part in zip(members, parts):
                n = part["input_ids"].shape[0]
                job_loss = objective.loss_sum(logits[offset:offset + n],
                                              {"labels": batch["labels"][offset:offset + n]}) / supervised[r.name]
                step_loss[r.name] += float(job_loss.detach())
                with r.drawing():
                    extra = hook_losses(model, r.name, r.method, r.procedure, r.config.grad_accum)
                loss = loss + job_loss + (extra if extra is not None else 0.0)
                offset += n
            loss.backward()
        changed, norms = False, {}
        for r in live:
            c = r.config
            if r.procedure is not None:
                with r.drawing():
                    r.procedure.on_gradients(model, r.name, r.step)
            norm = torch.nn.utils.clip_grad_norm_(list(r.params.values()), c.max_grad_norm or math.inf)
            norms[r.name] = None if all(p.grad is None for p in r.params.values()) else norm  # (GaLore per layer)
            r.optimizer.step()
            r.optimizer.zero_grad(set_to_none=True)
            r.step += 1
            r.result.losses.append(step_loss[r.name])
            r.window.append(step_loss[r.name])
            with r.drawing():
                changed = step_hooks(model, r.name, r.method, r.procedure, r.step, c.steps) or changed
        if changed:
            refresh_trainable(model)  # a hook changed what an adapter freezes (Delta.frozen_names)
        train_time += time.perf_counter() - step_start
        for r in live:  # as the loop after each step: log, evaluate, checkpoint
            c = r.config
            if r.step % c.log_every == 0 or r.step == c.steps:
                r.emit(log_record(r.step, r.window, c.lr * r.lr_factor, norms[r.name],
                                  r.run_tokens / max(train_time, 1e-9), router_summary(router_stats(model, r.name))))
                r.window = []
            if c.eval_every and r.step % c.eval_every == 0:
                r.evaluate(model, tokenizer, objective, device, names)
            if c.save_every and r.step % c.save_every == 0:
                r.checkpoint(model)
        bar.update(1)
        bar.set_postfix({r.name: f"{r.result.losses[-1]:.3f}" for r in live})
    bar.close()
    wall = time.perf_counter() - start
    for r in runs:
        if r.procedure is not None:
            with r.drawing():
                r.procedure.finish(model, r.name)
    for r in runs:
        c, result = r.config, r.result
        if r.eval_set and (not result.eval_history or result.eval_history[-1]["step"] != r.step):
            r.evaluate(model, tokenizer, objective, device, names)
        result.final_metrics = result.eval_history[-1] if result.eval_history else None
        result.steps, result.train_tokens = r.step, r.run_tokens
        if output_dir is not None:
            result.adapter_dir = str(write_dir_atomically(Path(output_dir) / r.name,
                                                          lambda d, r=r: r.write_adapter(model, d)))
        if c.output_dir is not None:  # the job's own folder, as lorakit.train leaves it
            result.adapter_dir = str(save_or_rescue(Path(c.output_dir) / "adapter",
                                                    lambda d, r=r: r.write_adapter(model, d)))
            atomic_write_json(Path(c.output_dir) / "train_result.json", result.to_dict())
    model.eval()
    return {"jobs": {r.name: r.result for r in runs}, "wall_time_s": wall,
            "tokens_per_s": tokens / max(wall, 1e-9), "steps": total}
