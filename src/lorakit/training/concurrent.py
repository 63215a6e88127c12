"""Concurrent training of several adapters on one base model (m-LoRA / ASPEN style).

Each step concatenates one micro-batch per job on the batch dimension and runs ONE forward: the frozen base
computes once for all rows, and every row goes through its own job's adapter (``routing(adapter_names=...)``,
a stacked gathered bmm for plain LoRA deltas). Each job keeps its own optimizer, learning rate, schedule,
clipping and data order; its loss is normalised by its own supervised tokens, so jobs do not dilute each
other. A job that has finished its steps leaves the batch. As in ``lorakit.train``, each job's method runs its
data-driven ``init`` on the job's first batches, its ``extra_loss`` is added to the job's loss and its ``on_step``
runs after the job's step; the forward gets the loop's routing context (``objectives.batch_routing``: token mask,
supervised tokens, plus each row's adapter name).

Supported: every method whose deltas work per row (plain LoRA fastest). Methods whose delta replaces a whole
layer's forward (MixLoRA-style FFN experts, γ-MoD's blocks) route every row of the batch, so such a job trains
only alone; with other jobs it is refused with a clear error.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..core.errors import AdapterError
from ..core.inits import init_adapter, init_pending
from ..core.layer import AdapterLayer
from ..core.model import active_adapters, adapter_names, adapter_parameters, adapter_state, set_adapter
from ..core.registry import get_method
from ..data import IGNORE_INDEX, CausalLMCollator, Example, TokenizedDataset, evaluate_examples
from ..io.peft_format import save_adapter
from .config import TrainConfig
from .loop import DataStream, lr_multiplier
from .objectives import CausalLM, batch_routing


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


def _pad_cat(batches: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(b["input_ids"].shape[1] for b in batches)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    return {"input_ids": torch.cat([pad(b["input_ids"], pad_id) for b in batches]),
            "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches]),
            "labels": torch.cat([pad(b["labels"], IGNORE_INDEX) for b in batches])}


def train_concurrent(model: torch.nn.Module, tokenizer: Any, jobs: Sequence[Job], *, output_dir: str | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Train every job's adapter at once on one base model; returns per-job results and throughput."""
    names = [j.adapter_name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"each job needs its own adapter; got {names}")
    for n in names:
        if n not in adapter_names(model):
            raise AdapterError(f"no adapter {n!r} on the model; add_adapter it before train_concurrent")
    for _, layer in model.named_modules():
        if not isinstance(layer, AdapterLayer):
            continue
        whole = [n for n in names if n in layer.adapters and layer.adapters[n].replaces_base]
        if whole and len(names) > 1:
            raise AdapterError(f"concurrent training needs per-row adapters; job {whole[0]!r}'s method replaces a "
                               "whole layer's forward (FFN-level mixture, γ-MoD block), which routes every row of "
                               "the batch: train that job alone (train_concurrent with one job, or lorakit.train)")
    found_active, found_training = active_adapters(model), model.training
    try:
        return _train_concurrent(model, tokenizer, jobs, names, output_dir, progress)
    finally:  # leave the model as found: same active adapters, same train/eval mode
        set_adapter(model, found_active)
        model.train(found_training)


def _train_concurrent(model, tokenizer, jobs, names, output_dir, progress) -> dict[str, Any]:
    device = next(model.parameters()).device
    collate = CausalLMCollator.from_tokenizer(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    state = []
    for job in jobs:
        c = job.config
        s = {"job": job, "data": TokenizedDataset(job.examples, tokenizer, max_length=c.max_length),
             "stream": DataStream(len(job.examples), c.seed), "method": get_method(adapter_state(model).configs[
                 job.adapter_name]), "position": 0, "step": 0, "result": JobResult(job.adapter_name)}
        if s["method"].init is not None or init_pending(model, job.adapter_name):
            # As lorakit.train: the init sees the job's first batches, with only the job's adapter active.
            batches = [{k: v.to(device) for k, v in collate([s["data"][i] for i in s["stream"].indices(
                i * c.batch_size, c.batch_size)]).items()} for i in range(c.init_batches)]
            set_adapter(model, job.adapter_name)
            model.train()
            if s["method"].init is not None:
                s["method"].init(model, job.adapter_name, batches)
            if init_pending(model, job.adapter_name):
                init_adapter(model, job.adapter_name, batches)
        state.append(s)
    set_adapter(model, names)  # all trainable; each row still uses only its own adapter
    for s in state:  # after the inits: an init may change which parameters an adapter trains
        c = s["job"].config
        s["params"] = adapter_parameters(model, s["job"].adapter_name, trainable_only=True)
        s["opt"] = torch.optim.AdamW(list(s["params"].values()), lr=c.lr, weight_decay=c.weight_decay)
    torch.manual_seed(jobs[0].config.seed)
    total = max(j.config.steps for j in jobs)
    model.train()
    start, tokens = time.perf_counter(), 0
    bar = tqdm(total=total, desc="train x%d" % len(jobs), disable=not progress, dynamic_ncols=True)
    for _ in range(total):
        live = [s for s in state if s["step"] < s["job"].config.steps]
        parts, rows = [], []
        for s in live:
            c = s["job"].config
            idx = s["stream"].indices(s["position"], c.batch_size)
            s["position"] += c.batch_size
            parts.append(collate([s["data"][i] for i in idx]))
            rows += [s["job"].adapter_name] * c.batch_size
        batch = {k: v.to(device) for k, v in _pad_cat(parts, pad_id).items()}
        tokens += int(batch["attention_mask"].sum())
        with batch_routing(batch, adapter_names=rows):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, offset = 0.0, 0
        for s, part in zip(live, parts):
            n = part["input_ids"].shape[0]
            labels = batch["labels"][offset:offset + n]
            supervised = max(CausalLM().count({"labels": labels}), 1)
            job_loss = CausalLM().loss_sum(logits[offset:offset + n], {"labels": labels}) / supervised
            s["result"].losses.append(float(job_loss.detach()))
            loss = loss + job_loss
            if s["method"].extra_loss is not None:
                loss = loss + s["method"].extra_loss(model, s["job"].adapter_name)
            offset += n
        loss.backward()
        for s in live:
            c = s["job"].config
            torch.nn.utils.clip_grad_norm_(list(s["params"].values()), c.max_grad_norm or math.inf)
            factor = lr_multiplier(s["step"], c.steps, c.num_warmup_steps, c.lr_schedule)
            for g in s["opt"].param_groups:
                g["lr"] = c.lr * factor
            s["opt"].step()
            s["opt"].zero_grad(set_to_none=True)
            s["step"] += 1
            if s["method"].on_step is not None:
                s["method"].on_step(model, s["job"].adapter_name, s["step"], c.steps)
        bar.update(1)
        bar.set_postfix({s["job"].adapter_name: f"{s['result'].losses[-1]:.3f}" for s in live})
    bar.close()
    wall = time.perf_counter() - start
    model.eval()
    for s in state:
        job, result = s["job"], s["result"]
        if job.eval_examples:
            set_adapter(model, job.adapter_name)
            result.final_metrics = evaluate_examples(model, tokenizer, job.eval_examples)
        if output_dir is not None:
            result.adapter_dir = str(save_adapter(model, Path(output_dir) / job.adapter_name, job.adapter_name))
    return {"jobs": {s["job"].adapter_name: s["result"] for s in state}, "wall_time_s": wall,
            "tokens_per_s": tokens / max(wall, 1e-9), "steps": total}
