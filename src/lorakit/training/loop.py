"""The training loop: one plain loop over optimizer steps, readable top to bottom.

Per step: take ``grad_accum`` micro-batches from a seeded data stream, forward with the batch's task keys
in the routing context, add the method's (and the procedure's) ``extra_loss``, backward, clip, set the scheduled
learning rate, step the optimizer (AdamW unless a training procedure chooses another), call the method's and
the procedure's ``on_step``; then log, evaluate and checkpoint as configured.

Loss normalisation: the task loss of a step is the mean over *all supervised tokens of the whole step*
(summed per micro-batch, divided by the step's token count), so ``batch_size=4, grad_accum=1`` and
``batch_size=2, grad_accum=2`` compute the same gradient even when micro-batches hold different numbers
of tokens. (Averaging per micro-batch and then over micro-batches, the naive way, weights a token in a
short micro-batch more than one in a long micro-batch.) A method's ``extra_loss`` is a per-forward term,
so it is averaged over the step's micro-batches.

Data parallel: under ``torchrun`` / ``accelerate launch`` every process runs this loop on its rows of each global
micro-batch; ``training/distributed.py`` holds every collective step (token counts, DDP / FSDP2, rank-0 saves,
sharded evaluation), so N processes at ``batch_size=b`` train as one process at ``batch_size=N·b``.

Exact resume: the data order is a function of (seed, epoch) and the position in the stream, and the
checkpoint stores that position, the optimizer moments and the torch RNG state, so N steps + resume + N
steps gives bit-identical weights to 2N steps straight. Hooks keep this property as long as their state is
a function of the step they are given and any randomness they draw comes from torch's RNG.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.checkpointing import checkpointing_enabled, replay_routing_in_checkpoints
from ..core.errors import FIELD, AdapterError, ConfigError, LorakitError, UnknownAdapterError, did_you_mean
from ..core.inits import init_adapter, init_pending, requested_init
from ..core.model import active_adapters, adapter_names, adapter_state, refresh_trainable, trainable_parameters
from ..core.parallel import rows_gathered
from ..core.registry import Method, get_method
from ..data import Example, save_task_index, stable_seed
from ..data.classification import LABELS_FILE
from ..io.files import atomic_write_json, read_json
from ..io.peft_format import save_adapter
from ..mixtures.base import (reset_router_stats, router_stat_buffers, router_stats, router_stats_paused,
                             router_summary)
from ..io.files import write_dir_atomically
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import device_for, setup
from .objectives import batch_routing, objective_for
from .procedures import Procedure, get_procedure

LogCallback = Callable[[dict[str, Any]], None]


class TrainingInterrupted(LorakitError):
    """Ctrl-C (SIGINT) stopped a run with an ``output_dir``: the step in progress finished and a resumable
    checkpoint was written to ``checkpoint`` (pass it as ``resume_from``)."""

    def __init__(self, step: int, total_steps: int, checkpoint: str):
        super().__init__(f"interrupted at step {step} of {total_steps}; checkpoint saved to {checkpoint}")
        self.step, self.total_steps, self.checkpoint = step, total_steps, checkpoint


class AdapterSaveError(LorakitError):
    """The trained adapter could not be written where asked; ``rescue_dir`` holds it instead (None: nowhere)."""

    def __init__(self, message: str, rescue_dir: str | None):
        super().__init__(message)
        self.rescue_dir = rescue_dir


class _StopOnInterrupt:
    """While active (main thread only), the first SIGINT sets ``requested`` so the loop stops at the end of the
    step in progress, at a state it can checkpoint exactly; a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self, enabled: bool, speak: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.speak = speak  # under a launcher every process gets the SIGINT; rank 0 alone says so
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.speak:
            print("\ninterrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort without one)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> "_StopOnInterrupt":
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:  # None: a handler installed from C, which Python cannot put back: the default instead
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)


@dataclass
class TrainResult:
    """What a run did. ``losses`` has one task loss per optimizer step from step 1, including the steps a
    resumed run inherited from its checkpoint; ``eval_history`` holds ``{"step", "exact_match", "n",
    "per_task"}`` records; ``final_metrics`` is the last evaluation (None without eval examples)."""

    losses: list[float]
    eval_history: list[dict[str, Any]]
    final_metrics: dict[str, Any] | None
    steps: int
    start_step: int
    wall_time_s: float
    train_tokens: int
    tokens_per_s: float
    peak_memory_mb: float
    trainable_params: int
    total_params: int
    device: str
    adapter_dir: str | None = None
    checkpoints: list[str] = field(default_factory=list)
    router_stats: dict[str, dict] | None = None  # mixtures: per-layer expert load and entropy of this run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Factor on the peak learning rate for the update that follows ``step`` completed steps (0-based).

    Warmup rises linearly to 1 over ``warmup_steps`` updates, starting at ``1 / warmup_steps`` rather than
    0, and ``linear``/``cosine`` decay toward 0 without reaching it: no update is wasted at lr 0.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")


class DataStream:
    """An endless, seeded stream of example indices: epoch ``e`` is a permutation drawn from (seed, e).

    Micro-batches are consecutive slices of the stream, so a position (examples consumed) is all that
    resuming needs, and different ``batch_size * grad_accum`` splits of a step see the same examples.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, position: int, count: int) -> list[int]:
        out = []
        for p in range(position, position + count):
            epoch = p // self.n
            if epoch != self._epoch:
                generator = torch.Generator().manual_seed(stable_seed("lorakit-train", self.seed, epoch))
                self._epoch, self._order = epoch, torch.randperm(self.n, generator=generator)
            out.append(int(self._order[p % self.n]))
        return out


def make_optimizer(model: nn.Module, adapter_name: str, config: TrainConfig, method: Method | None = None,
                   procedure: Procedure | None = None) -> tuple[torch.optim.Optimizer, dict[str, nn.Parameter]]:
    """AdamW over the trainable parameters, or over the method's ``param_groups`` when it has them; with a
    training procedure (``config.procedure``), the procedure refines the groups and builds the optimizer.

    Returns the optimizer and its parameters by name in optimizer order (the checkpoint's keys). Each
    group remembers its peak lr as ``initial_lr``, which the schedule scales.
    """
    method = method or get_method(adapter_state(model).configs[adapter_name])
    if procedure is None and config.procedure is not None:
        procedure = get_procedure(config.procedure).build(config)
    if method.param_groups is not None:
        groups = [dict(g) for g in method.param_groups(model, adapter_name, config.lr)]
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    for g in groups:
        g["params"] = list(g["params"])
        g.setdefault("lr", config.lr)
        g.setdefault("weight_decay", config.weight_decay)
    if procedure is not None:
        groups = procedure.param_groups(model, adapter_name, groups)
    name_of = {id(p): n for n, p in model.named_parameters()}
    params: dict[str, nn.Parameter] = {}
    for g in groups:
        g["initial_lr"] = g["lr"]
        for p in g["params"]:
            if id(p) not in name_of:
                raise ValueError(f"method {method.name!r}: param_groups returned a parameter that is not in the model")
            params[name_of[id(p)]] = p
    if not params:
        raise AdapterError(f"adapter {adapter_name!r} has no trainable parameters (was it loaded for inference? "
                           "load_adapter(..., is_trainable=True) makes it trainable).")
    if procedure is not None:
        return procedure.make_optimizer(groups, config), params
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay), params


def check_init_batches(model: nn.Module, adapter_name: str, config: TrainConfig) -> None:
    """ConfigError naming ``TrainConfig.init_batches`` when it is 0 and the adapter's pending init needs data."""
    init = requested_init(model, adapter_name) if init_pending(model, adapter_name) else None
    if init is not None and init.needs_data and config.init_batches < 1:
        raise ConfigError(f"{FIELD} is 0, but adapter {adapter_name!r}'s init {init.name!r} is data-driven: give it "
                          "at least one batch (default 4)", field="TrainConfig.init_batches")


def init_batch_count(config: TrainConfig, num_examples: int, who: str = "the init") -> int:
    """How many batches a data-driven init gets: ``config.init_batches``, or the batches the training data fills
    (``ceil(num_examples / batch_size)``) when that is fewer — with a warning naming both numbers, since the stream
    would otherwise repeat the same examples to make up the count (``who``: the adapter or job, for the message)."""
    available = max(1, math.ceil(num_examples / config.batch_size))
    if config.init_batches <= available:
        return config.init_batches
    warnings.warn(f"TrainConfig.init_batches (--init-batches) = {config.init_batches}, but the training data "
                  f"({num_examples} examples, batch_size {config.batch_size}) fills only {available} batch"
                  f"{'es' if available != 1 else ''}: {who} runs on those {available} instead of repeating examples. "
                  "Give more training data or a lower init_batches.", stacklevel=3)
    return available


def split_validation(procedure: Procedure | None, config: TrainConfig,
                     examples: Sequence[Example]) -> tuple[Sequence[Example], list[Example]]:
    """The training examples and the procedure's held-out validation examples (Flexora): the last
    ``procedure.validation_split(n)`` examples, not trained on; none without a procedure that asks.
    Raises ConfigError when the split would leave no training or no validation example."""
    held_out = procedure.validation_split(len(examples)) if procedure is not None else 0
    if not held_out:
        return examples, []
    if not 0 < held_out < len(examples):
        raise ConfigError(f"procedure {config.procedure!r} holds out {held_out} validation examples but the run has "
                          f"{len(examples)}; lower its validation size or give more training data.")
    return list(examples)[:-held_out], list(examples)[-held_out:]


def schedule_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int) -> float:
    """Set every optimizer group's lr for the update after ``step`` completed steps (its ``initial_lr``, the
    method's / procedure's per-group peak, times the schedule); returns the schedule's factor. Called before the
    step's first forward: a procedure may update parameters inside gradient hooks (GaLore per layer)."""
    factor = lr_multiplier(step, config.steps, config.num_warmup_steps, config.lr_schedule)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return factor


def hook_losses(model: nn.Module, adapter_name: str, method: Method, procedure: Procedure | None,
                grad_accum: int) -> torch.Tensor | None:
    """The method's and the procedure's ``extra_loss`` of one forward, each divided by ``grad_accum`` (they are
    per-forward terms, averaged over a step's micro-batches); None when neither has one."""
    total = None
    for term in (method.extra_loss(model, adapter_name) if method.extra_loss is not None else None,
                 procedure.extra_loss(model, adapter_name) if procedure is not None else None):
        if term is not None:
            total = term / grad_accum if total is None else total + term / grad_accum
    return total


def step_hooks(model: nn.Module, adapter_name: str, method: Method, procedure: Procedure | None, step: int,
               total_steps: int) -> bool:
    """After optimizer step ``step`` (1-based): the method's ``on_step``, then the procedure's. Returns whether
    either may have changed which parameters train (``Delta.frozen_names``, ``requires_grad``); the caller then
    re-reads them (``refresh_trainable``, DDP's rewrap). A hook says so by returning True, or False when it changed
    nothing that trains (rank draws, proximal steps: re-reading after those cost about 2% of a step); None, a hook
    that does not say, counts as a change."""
    changed = False
    if method.on_step is not None:
        changed = method.on_step(model, adapter_name, step, total_steps) is not False
    if procedure is not None:
        changed = (procedure.on_step(model, adapter_name, step, total_steps) is not False) or changed
    return changed


def log_record(step: int, window: Sequence[float], lr: float, grad_norm: torch.Tensor | float | None,
               tokens_per_s: float, router: dict[str, Any] | None) -> dict[str, Any]:
    """What ``on_log`` callbacks get every ``log_every`` steps: ``{"step", "loss" (mean of the steps since the last
    record), "lr", "grad_norm" (None: nothing clipped), "tokens_per_s"}``, plus ``"router"`` for mixtures."""
    record = {"step": step, "loss": sum(window) / len(window), "lr": lr,
              "grad_norm": None if grad_norm is None else float(grad_norm), "tokens_per_s": tokens_per_s}
    if router is not None:  # mixtures: expert load and router entropy since the start of this run
        record["router"] = router
    return record


def evaluate_adapter(objective: Any, ctx: Any, model: nn.Module, tokenizer: Any, eval_set: Sequence[Example],
                     config: TrainConfig, task_to_id: dict[str, int] | None, device: torch.device,
                     progress: bool) -> dict[str, Any]:
    """The objective's metrics of ``eval_set`` (``ctx``: the data-parallel context, None in one process), leaving
    the training RNG (fork_rng: evaluating must not change the run) and the router statistics as they were."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), router_stats_paused(model):
        return objective.evaluate(ctx, model, tokenizer, eval_set, batch_size=config.batch_size,
                                  task_to_id=task_to_id, progress=progress)


def write_adapter_dir(model: nn.Module, directory: Path, adapter_name: str, task_to_id: dict[str, int] | None,
                      labels: list[str] | None = None) -> None:
    """The adapter's files (PEFT format), plus ``task_index.json`` when the data has task keys and ``labels.json``
    (a classifier's label names in head order, which ``lorakit eval`` rebuilds the head from) when ``labels``."""
    save_adapter(model, directory, adapter_name)
    if task_to_id is not None:
        save_task_index(directory, task_to_id)
    if labels is not None:
        atomic_write_json(directory / LABELS_FILE, {"labels": labels})


def checkpoint_state(config: TrainConfig, adapter_name: str, *, step: int, position: int, num_train_examples: int,
                     tokens_seen: int, losses: list[float], eval_history: list[dict[str, Any]],
                     world_size: int = 1) -> dict[str, Any]:
    """The JSON state of ``checkpoint-<step>`` (``training.checkpoint``): what ``resume_checkpoint`` continues from."""
    return {"step": step, "total_steps": config.steps, "data_position": position, "seed": config.seed,
            "num_train_examples": num_train_examples, "tokens_seen": tokens_seen, "adapter_name": adapter_name,
            "losses": losses, "eval_history": eval_history, "world_size": world_size, "config": config.to_dict()}


def resume_checkpoint(config: TrainConfig, model: nn.Module, adapter_name: str, optimizer: torch.optim.Optimizer,
                      params: dict[str, nn.Parameter], procedure: Procedure | None,
                      num_train_examples: int, world_size: int = 1, warn: bool = True) -> dict[str, Any]:
    """Load ``config.resume_from`` into the adapter, optimizer, RNG and procedure; returns its state
    (``checkpoint_state``'s keys). ValueError for other training data, ConfigError when it is at or past ``steps``.
    A global batch (``batch_size × grad_accum × world_size``) or a seed other than the checkpoint's is allowed
    (docs/distributed.md) but changes the run, so it is warned about (``warn``: this process says it, rank 0)."""
    record = load_checkpoint(config.resume_from, model, adapter_name, optimizer, params)
    # The loaded buffers decide what the adapter freezes (LaMDA's frozen B columns): re-read it as the step hook that
    # set them did, else a B frozen before the checkpoint trains again after it (AdamW moves it with zero gradients).
    refresh_trainable(model)
    if procedure is not None:
        procedure.load_state_dict(record["extra_tensors"])
    if record["num_train_examples"] != num_train_examples:
        raise ValueError(f"checkpoint {config.resume_from} was trained on {record['num_train_examples']} "
                         f"examples, this run has {num_train_examples}; resume with the same training data.")
    if record["step"] >= config.steps:
        raise ConfigError(f"checkpoint {config.resume_from} is at step {record['step']}, and this run has steps="
                          f"{config.steps}: nothing would be trained. Set steps above {record['step']} (the total, "
                          "counting the checkpoint's steps).")
    if warn:
        warn_global_batch_change(config, record, world_size)
        if record.get("seed") is not None and record["seed"] != config.seed:
            warnings.warn(f"resuming {config.resume_from} with another seed: the checkpoint's run used seed "
                          f"{record['seed']}, this run {config.seed}. The data order is drawn from the seed, so the "
                          f"rest of the current epoch repeats some examples and skips others; keep seed "
                          f"{record['seed']} to continue the checkpoint's run.", stacklevel=2)
    return record


def warn_global_batch_change(config: TrainConfig, record: dict[str, Any], world_size: int) -> None:
    """A warning naming the checkpoint's global batch and this run's when they differ (nothing when they agree, or
    when the checkpoint does not record its batch_size / grad_accum)."""
    saved = record.get("config") or {}
    if "batch_size" not in saved or "grad_accum" not in saved:
        return
    old_world = int(record.get("world_size", 1))
    old = saved["batch_size"] * saved["grad_accum"] * old_world
    new = config.batch_size * config.grad_accum * world_size
    if old != new:
        warnings.warn(f"resuming {config.resume_from} with another global batch: the checkpoint trained on {old} "
                      f"examples per step (batch_size {saved['batch_size']} × grad_accum {saved['grad_accum']} × "
                      f"{old_world} process{'es' if old_world != 1 else ''}), this run trains on {new} (batch_size "
                      f"{config.batch_size} × grad_accum {config.grad_accum} × {world_size} "
                      f"process{'es' if world_size != 1 else ''}). It goes on from the checkpoint's data position, "
                      f"but is not the run the checkpoint would have continued; keep batch_size × grad_accum × "
                      f"processes = {old} for that (docs/distributed.md).", stacklevel=3)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if sys.platform == "win32":  # no getrusage: psutil's peak working set (bytes), Windows' peak resident set
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20
    import resource  # (POSIX only)

    # ru_maxrss is the whole process's peak resident set: KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enable: bool,
                             field: str = "TrainConfig.gradient_checkpointing") -> Iterator[None]:
    """A block in which ``model`` checkpoints activations when ``enable`` (turned on with transformers' non-reentrant
    checkpointing and off again at the end; a model that had it on keeps it) and in which every checkpointed block
    recomputes under the routing its forward ran with (``core.checkpointing.replay_routing_in_checkpoints``).
    Raises ConfigError naming ``field`` for a model that cannot checkpoint."""
    turned_on = False
    if enable and not checkpointing_enabled(model):
        turn_on = getattr(model, "activation_checkpointing_enable", None) or getattr(
            model, "gradient_checkpointing_enable", None)
        if turn_on is None or not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{FIELD}: {type(model).__name__} cannot checkpoint activations (it is not a "
                              f"transformers model that supports gradient checkpointing)", field=field)
        # transformers also hooks the input embeddings (their output requires grad) and removes that hook again
        # only for PEFT models: one found here is the user's, one added by turning on is removed at the end.
        had_input_hook = bool(getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"))
        if turn_on.__name__ == "activation_checkpointing_enable":
            turn_on(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers before activation_checkpointing_enable
            turn_on(gradient_checkpointing_kwargs={"use_reentrant": False})
        turned_on = True
    replay_routing_in_checkpoints(model)
    try:
        yield
    finally:
        if turned_on:
            turn_off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            turn_off()
            if not had_input_hook and hasattr(model, "disable_input_require_grads"):
                model.disable_input_require_grads()


def train(model: nn.Module, tokenizer: Any, train_examples: Sequence[Example], config: TrainConfig,
          adapter_name: str = "default", eval_examples: Sequence[Example] | None = None, progress: bool = True,
          on_log: Sequence[LogCallback] = ()) -> TrainResult:
    """Train adapter ``adapter_name`` of ``model`` (a causal LM with a lorakit adapter) on ``train_examples``.

    A ``*ForSequenceClassification`` model trains as a classifier instead (``training.objectives``: example prompt =
    text, completion = label name from ``model.config.label2id``; evaluations report accuracy, macro F1 and MCC).

    ``on_log`` callbacks get ``{"step", "loss", "lr", "grad_norm", "tokens_per_s"}`` every ``log_every``
    steps (``grad_norm`` None when a procedure updates inside backward, as GaLore per layer does: nothing to
    clip; plus ``"router"``, ``mixtures.router_summary`` of this run so far, for mixture methods) and
    ``{"step", "eval": metrics}`` after each evaluation. ``TrainResult.router_stats`` holds the per-layer expert
    load and entropy of the run's training forwards (evaluations excluded).

    With an ``output_dir``: Ctrl-C finishes the step in progress, writes ``checkpoint-<step>`` and raises
    ``TrainingInterrupted``; the adapter folder also gets ``task_index.json`` (the data's task -> key id mapping,
    ``lorakit.data.read_task_index``) when the data has task keys; if the adapter cannot be written there, it is
    written to a fresh temporary folder and ``AdapterSaveError`` says where.
    Raises ``ConfigError`` when ``resume_from`` is at or past ``steps`` (nothing would be trained);
    ``UnknownAdapterError`` (an AdapterError, with near-match names) for an adapter the model does not have.
    """
    was_training = model.training
    try:
        with activation_checkpointing(model, config.gradient_checkpointing):
            return _train(model, tokenizer, train_examples, config, adapter_name, eval_examples, progress, on_log)
    finally:  # train/eval mode as found, also when training raises
        model.train(was_training)


def _train(model: nn.Module, tokenizer: Any, train_examples: Sequence[Example], config: TrainConfig,
           adapter_name: str = "default", eval_examples: Sequence[Example] | None = None, progress: bool = True,
           on_log: Sequence[LogCallback] = ()) -> TrainResult:
    start_time = time.perf_counter()
    if adapter_name not in adapter_names(model):
        names = adapter_names(model)
        raise UnknownAdapterError(f"model has no adapter {adapter_name!r}.{did_you_mean(adapter_name, names)} It has "
                                  f"{names}; add one with lorakit.add_adapter first.")
    if adapter_name not in active_adapters(model):
        raise AdapterError(f"adapter {adapter_name!r} is not active (active: {active_adapters(model)}); call "
                           f"lorakit.set_adapter(model, {adapter_name!r}) so that it trains.")
    device = device_for(config.device)
    ctx = setup(device, config.distributed)  # world size 1 (every call a no-op) unless started by torchrun / accelerate
    if ctx.enabled:  # every process must run one training: same options, same examples (a node's stale data copy);
        # compared before any check of the data, so a process whose copy fails one never leaves the others waiting
        ctx.check_same(run_identity(config, adapter_state(model).configs[adapter_name], train_examples, eval_examples))
    if not train_examples:
        raise ValueError("no training examples")
    if config.eval_every and not eval_examples:
        raise ValueError(f"TrainConfig.eval_every={config.eval_every} but no eval_examples were given to train().")
    method = get_method(adapter_state(model).configs[adapter_name])
    adapter_state(model).configs[adapter_name].check_examples(train_examples)
    try:
        adapter_state(model).configs[adapter_name].check_steps(config.steps)
    except ConfigError as e:  # a schedule this run is too short for (lorakit train refuses it before loading)
        warnings.warn(str(e), stacklevel=3)
    try:
        config.check_steps()  # checkpoints, evaluations, a procedure's schedule the run ends before
    except ConfigError as e:
        warnings.warn(str(e), stacklevel=3)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(config.seed)  # also seeds every CUDA device

    procedure = get_procedure(config.procedure).build(config) if config.procedure is not None else None
    train_examples, validation = split_validation(procedure, config, train_examples)  # Flexora's held-out split
    objective = objective_for(model)  # the head's loss and metrics: next-token (causal LM) or labels (SEQ_CLS)
    dataset = objective.dataset(train_examples, tokenizer, config.max_length)
    # Task ids are positions among the data's task names; methods that map tasks by name get the names too.
    key_names = {} if dataset.task_to_id is None else {
        "task_names": [n for n, _ in sorted(dataset.task_to_id.items(), key=lambda kv: kv[1])]}
    collate = objective.collator(tokenizer)
    stream = DataStream(len(dataset), config.seed)
    eval_set = list(eval_examples)[: config.eval_examples] if eval_examples else []

    def micro_batch(position: int) -> dict[str, torch.Tensor]:
        """The micro-batch at ``position`` in the stream, on the CPU (token counts are read there, not synced)."""
        return collate([dataset[i] for i in stream.indices(position, config.batch_size)])

    def step_batches(position: int) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of the step starting at ``position`` (its rows of each global micro-batch)."""
        return [micro_batch(ctx.micro_batch_position(position, i, config.batch_size)) for i in range(config.grad_accum)]

    def to_device(batch: dict) -> dict:
        return {k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v.to(device))
                for k, v in batch.items()}

    check_init_batches(model, adapter_name, config)
    was_training = model.training
    model.train()
    if method.init is not None or init_pending(model, adapter_name):
        # Run on resume too: an init may also rewrite base weights (PiSSA-style), which the checkpoint does
        # not hold. The adapter weights and RNG it leaves are then replaced from the checkpoint.
        count = init_batch_count(config, len(dataset), f"adapter {adapter_name!r}'s init")
        batches = [to_device(micro_batch(i * config.batch_size)) for i in range(count)]
        if method.init is not None:
            method.init(model, adapter_name, batches)
        if init_pending(model, adapter_name):  # a data-driven init named by the config (lorakit.init_adapter)
            init_adapter(model, adapter_name, batches)
    if validation:
        assert procedure is not None
        val_set = objective.dataset(validation, tokenizer, config.max_length, task_to_id=dataset.task_to_id)
        procedure.set_validation(lambda indices: to_device(collate([val_set[i] for i in indices])), len(val_set))
    optimizer, params = make_optimizer(model, adapter_name, config, method, procedure)

    step, position, tokens_seen = 0, 0, 0
    losses: list[float] = []
    eval_history: list[dict[str, Any]] = []
    checkpoints: list[str] = []
    if config.resume_from is not None:
        record = resume_checkpoint(config, model, adapter_name, optimizer, params, procedure, len(dataset),
                                   world_size=ctx.world_size, warn=ctx.is_main)
        step, position, tokens_seen = record["step"], record["data_position"], record["tokens_seen"]
        losses, eval_history = record["losses"], record["eval_history"]
    start_step = step
    output_dir = Path(config.output_dir) if config.output_dir is not None else None

    def emit(record: dict[str, Any]) -> None:
        for callback in on_log:
            callback(record)

    def evaluate() -> None:
        metrics = evaluate_adapter(objective, ctx, model, tokenizer, eval_set, config, dataset.task_to_id, device,
                                   progress and ctx.is_main)
        eval_history.append({"step": step, **metrics})
        emit({"step": step, "eval": metrics})

    labels = getattr(objective, "labels", None)  # a classifier's: saved with every checkpoint and the adapter

    def write_adapter(directory: Path) -> None:
        write_adapter_dir(model, directory, adapter_name, dataset.task_to_id, labels)

    def checkpoint() -> str:
        state = checkpoint_state(config, adapter_name, step=step, position=position, num_train_examples=len(dataset),
                                 tokens_seen=tokens_seen + run_tokens, losses=losses, eval_history=eval_history,
                                 world_size=ctx.world_size)
        assert output_dir is not None
        extra_tensors = procedure.state_dict() if procedure is not None else None
        path = ctx.on_main(lambda: save_checkpoint(output_dir / f"checkpoint-{step}", model, adapter_name, optimizer,
                                                   params, state, write_adapter=write_adapter,
                                                   extra_tensors=extra_tensors))
        checkpoints.append(str(path))
        return str(path)

    def summed_router_stats() -> dict[str, dict]:
        with ctx.summed(router_stat_buffers(model)):  # every process's routed tokens
            return router_stats(model, adapter_name)

    # Data parallel: DDP over the trainable parameters, or FSDP2 sharding the frozen base (training.distributed).
    train_model = ctx.wrap(model, list(params.values()))
    if ctx.enabled and not ctx.is_main:
        # Every process was seeded alike (one init everywhere), so dropout would draw the same masks on every
        # process: rank r's rows would repeat rank 0's masks, where one process at N·b draws one per row. Other
        # ranks take their own stream; rank 0 keeps the seeded (or checkpointed) one, which hooks share (agreed_rng).
        torch.manual_seed(stable_seed("lorakit-rank-rng", config.seed, ctx.rank, step))
    reset_router_stats(model)  # router statistics (mixtures) describe this run's training forwards only
    bar = tqdm(total=config.steps, initial=step, desc="train", disable=not progress or not ctx.is_main,
               dynamic_ncols=True)
    train_time, run_tokens, window = 0.0, 0, []
    stop = _StopOnInterrupt(enabled=output_dir is not None, speak=ctx.is_main)
    with stop, rows_gathered(ctx.enabled):
        while step < config.steps:
            step_start = time.perf_counter()
            batches = step_batches(position)
            position += config.batch_size * config.grad_accum * ctx.world_size
            # The step's token counts over all processes: the task loss is the mean over the global step.
            supervised, seen = ctx.sum_counts([sum(objective.count(b) for b in batches),
                                               sum(int(b["attention_mask"].sum()) for b in batches)])
            n_supervised = max(supervised, 1)
            run_tokens += seen
            step_loss_sum = torch.zeros((), device=device)
            lr_factor = schedule_lr(optimizer, config, step)  # before backward (GaLore per layer updates inside it)
            for index, batch in enumerate(map(to_device, batches)):
                # The attention mask reaches adapter layers as the token mask (mixtures exclude padding from their
                # balance losses); task ids, when the data has them, as the routing keys; per-example routing
                # vectors (e.g. a user vector) and the supervised (completion) tokens' mask as extras.
                with ctx.no_sync(train_model, last=index == len(batches) - 1):
                    with batch_routing(batch, extras=key_names):
                        logits = train_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss = objective.loss_sum(logits, batch) / n_supervised
                    step_loss_sum += loss.detach()
                    # Data parallelism averages gradients over processes; this process's share of the global
                    # token mean is world_size times its sum. Extra losses are computed on joined rows or on the
                    # (replicated) parameters, the same on every process, so the average leaves them as they are.
                    loss = loss * ctx.world_size
                    extra = hook_losses(model, adapter_name, method, procedure, config.grad_accum)
                    if extra is not None:
                        loss = loss + extra
                    loss.backward()
            ctx.sync_gradients(list(params.values()))
            if procedure is not None:
                procedure.on_gradients(model, adapter_name, step)
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm or math.inf)
            if all(p.grad is None for p in params.values()):  # updated inside backward (GaLore per layer): no norm
                grad_norm = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            with ctx.agreed_rng():  # a hook's random draw (DyLoRA's rank) is rank 0's on every process
                changed = step_hooks(model, adapter_name, method, procedure, step, config.steps)
            if changed:
                refresh_trainable(model)  # a hook changed what the adapter freezes (Delta.frozen_names)
                train_model = ctx.rewrap(model, train_model)  # DDP's buckets follow the trainable set
            # The one host sync per step: the global loss, and whether any process was asked to stop.
            reduced = ctx.sum(torch.stack([step_loss_sum, torch.tensor(float(stop.requested), device=device)]))
            step_loss, stop.requested = float(reduced[0]), bool(reduced[1] > 0)
            train_time += time.perf_counter() - step_start
            losses.append(step_loss)
            window.append(step_loss)
            tokens_per_s = run_tokens / max(train_time, 1e-9)
            lr_now = config.lr * lr_factor
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            if step % config.log_every == 0 or step == config.steps:
                emit(log_record(step, window, lr_now, grad_norm, tokens_per_s, router_summary(summed_router_stats())))
                window = []
            if config.eval_every and step % config.eval_every == 0:
                evaluate()
            if config.save_every and step % config.save_every == 0:
                checkpoint()
            if stop.requested and step < config.steps:
                break
    bar.close()
    if procedure is not None:
        procedure.finish(model, adapter_name)
    if stop.requested and step < config.steps:
        model.train(was_training)
        saved = checkpoints[-1] if checkpoints and checkpoints[-1].endswith(f"checkpoint-{step}") else checkpoint()
        raise TrainingInterrupted(step, config.steps, saved)

    if eval_set and (not eval_history or eval_history[-1]["step"] != step):
        evaluate()
    final_metrics = eval_history[-1] if eval_history else None
    model.train(was_training)

    trainable, total = trainable_parameters(model)
    result = TrainResult(
        losses=losses, eval_history=eval_history, final_metrics=final_metrics, steps=step, start_step=start_step,
        wall_time_s=time.perf_counter() - start_time, train_tokens=run_tokens,
        tokens_per_s=run_tokens / train_time if train_time > 0 else 0.0, peak_memory_mb=_peak_memory_mb(device),
        trainable_params=trainable, total_params=total, device=str(device), checkpoints=checkpoints,
        router_stats=summed_router_stats() or None,
    )
    if output_dir is not None:
        def save_final() -> str:
            adapter_dir = str(save_or_rescue(output_dir / "adapter", write_adapter))
            atomic_write_json(output_dir / "train_result.json", {**result.to_dict(), "adapter_dir": adapter_dir})
            return adapter_dir

        result.adapter_dir = ctx.on_main(save_final)  # rank 0 writes, the others wait for it
    return result


def run_identity(config: TrainConfig, adapter_config: Any, train_examples: Sequence[Example],
                 eval_examples: Sequence[Example] | None) -> dict[str, Any]:
    """What must be equal on every process of a data-parallel run: the training options (not the ones that may be
    per process or per machine: device, output folder, checkpoint path, but the step a checkpoint resumes at), the
    adapter's options, and the training and evaluation examples (count and a digest of their content)."""
    import hashlib

    def digest(examples: Sequence[Example]) -> str:
        h = hashlib.sha256()
        for ex in examples:
            h.update(repr(ex).encode())
        return f"{len(examples)} examples, sha256 {h.hexdigest()[:12]}"

    own = {"device", "output_dir", "resume_from"}
    identity: dict[str, Any] = {f"TrainConfig.{k}": v for k, v in config.to_dict().items() if k not in own}
    identity.update({f"{type(adapter_config).__name__}.{k}": v for k, v in adapter_config.to_dict().items()})
    if config.resume_from is not None:
        identity["checkpoint step"] = read_json(Path(config.resume_from) / "trainer_state.json").get("step")
    identity["training data"] = digest(train_examples)
    identity["evaluation data"] = digest(list(eval_examples or [])[: config.eval_examples])
    return identity


def save_or_rescue(target: Path, write: Callable[[Path], None]) -> Path:
    """Write the adapter folder; if that fails (disk full, permissions), keep the trained adapter in a fresh
    temporary folder and raise AdapterSaveError naming both, rather than losing the run."""
    try:
        return write_dir_atomically(target, write)
    except OSError as error:
        try:
            rescue = Path(tempfile.mkdtemp(prefix="lorakit-adapter-"))
            write(rescue)
        except OSError as second:
            raise AdapterSaveError(f"could not save the trained adapter to {target} ({error}) nor to a temporary "
                                   f"folder ({second}).", None) from error
        raise AdapterSaveError(f"could not save the trained adapter to {target} ({error}); it was saved to "
                               f"{rescue} instead.", str(rescue)) from error
