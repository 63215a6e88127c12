"""Data-parallel training across processes: the plumbing the loop needs under ``torchrun`` / ``accelerate launch``.

``torchrun --nproc-per-node N -m lorakit train ...`` (or ``accelerate launch``) starts N copies of the same
program with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous address) in the environment;
:func:`setup` reads them, starts the process group (``nccl`` on CUDA, ``gloo`` on CPU) and returns a
:class:`Distributed` that the loop asks for everything collective. With ``WORLD_SIZE`` unset or 1 every call
is a no-op, so single-process runs are unchanged bit for bit.

What "the same training" means: ``batch_size`` is per process, so a step's global batch is
``batch_size × grad_accum × world_size``, and N processes at ``batch_size=b`` train exactly as one process at
``batch_size=N·b`` (same ``grad_accum``), to float tolerance:

- data: micro-batch ``i`` of a step is the slice ``[i·N·b, (i+1)·N·b)`` of the seeded global stream and rank
  ``r`` reads its ``b`` rows ``r·b ..``; the checkpoint stores the global position, so a run resumes with any
  number of processes (keep ``batch_size × world_size`` for the identical run); examples are tokenized lazily
  (``data.TokenizedDataset``), so each process tokenizes only the rows it reads, and ``lorakit train``'s
  truncation count is summed over the processes' shares. Every process still parses the whole JSONL file (all
  must agree on the example count that seeds the stream; parsing is cheap next to tokenizing);
- task loss: the step's supervised-token count is all-reduced, so the loss is the mean over the global step;
- gradients: ``ddp`` wraps the model in ``DistributedDataParallel`` (only trainable parameters are in its buckets:
  the frozen base is never synchronized; ``no_sync`` on all but the last micro-batch); ``fsdp`` shards the frozen
  base with FSDP2 ``fully_shard`` (one unit per decoder block, then the root) while trainable parameters and every
  adapter tensor stay whole on every rank (``ignored_params``); gradients are averaged once per step. Keeping the adapter replicated lets
  every method's hooks, extra losses and saving run on plain tensors; the adapter is a small fraction of the
  weights, the base is what FSDP needs to shard;
- mixtures: ``core.parallel.gather_rows`` (switched on by the loop) joins every rank's routing records before a balance loss (differentiably), so the
  loss is that of the global micro-batch; router statistics are summed across ranks before they are read;
- hooks: per-step hooks (a method's ``on_step``, a procedure's ``on_step``) run with rank 0's torch RNG state
  (:meth:`Distributed.agreed_rng`), so sampled choices (DyLoRA's rank) agree on every rank;
- files: rank 0 writes checkpoints and the adapter (atomically), the others wait and share its success or error;
- evaluation: each rank generates for its share of the examples and the predictions are gathered.

Nothing here knows a method by name.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..core.errors import ConfigError, LorakitError
from .config import DISTRIBUTED_MODES as MODES



class RankZeroFailed(LorakitError):
    """Raised on every other process when rank 0's write (:meth:`Distributed.on_main`) failed; rank 0 raises (and
    the CLI prints) the error itself, so the others exit without repeating it."""


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's environment (torchrun, accelerate); (0, 1, 0) without."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun): {error}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world}); launch with torchrun or accelerate launch.")
    return rank, world, local


def is_main_process() -> bool:
    """True on rank 0, and in any process not started by a distributed launcher."""
    return (dist.get_rank() if dist.is_initialized() else env_world()[0]) == 0


def device_for(device: str | None) -> torch.device:
    """The device of this process: ``device``, else CUDA (this process's ``LOCAL_RANK``) when available, else CPU."""
    _, world, local = env_world()
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", local % torch.cuda.device_count() if world > 1 else torch.cuda.current_device())
        return torch.device("cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"TrainConfig.device={device!r} but CUDA is not available; use None or 'cpu'.")
    if chosen.type == "cuda" and chosen.index is None and world > 1:
        chosen = torch.device("cuda", local % torch.cuda.device_count())
    return chosen


def setup(device: torch.device, mode: str = "ddp") -> "Distributed":
    """The process group of this launch (started here on first use: nccl on CUDA, gloo otherwise) as a
    :class:`Distributed`; world size 1 without a launcher. Raises ConfigError for an unknown ``mode``."""
    if mode not in MODES:
        raise ConfigError(f"distributed mode {mode!r} is not one of {MODES}.")
    rank, world, _ = env_world()
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Distributed(rank=rank, world_size=world, device=device, mode=mode)


@dataclass
class Distributed:
    """One process's view of the run: its ``rank`` among ``world_size`` processes, its ``device`` and the
    gradient synchronization ``mode`` ("ddp" or "fsdp"). With ``world_size == 1`` every method is a no-op."""

    rank: int
    world_size: int
    device: torch.device
    mode: str = "ddp"
    _ddp: nn.Module | None = field(default=None, repr=False)
    _ddp_params: tuple[int, ...] = field(default=(), repr=False)
    _synced: list[nn.Parameter] = field(default_factory=list, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data ---------------------------------------------------------------------------------------------------
    def micro_batch_position(self, step_position: int, index: int, batch_size: int) -> int:
        """Stream position of this rank's rows of micro-batch ``index`` of the step starting at ``step_position``."""
        return step_position + (index * self.world_size + self.rank) * batch_size

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share of ``items`` (every world_size-th, from ``rank``)."""
        return list(items[self.rank::self.world_size])

    # -- collectives --------------------------------------------------------------------------------------------
    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over ranks (a new tensor; the input when single-process)."""
        if not self.enabled:
            return values
        out = values.clone()
        dist.all_reduce(out)
        return out

    def sum_counts(self, counts: Sequence[int]) -> list[int]:
        """Integer counts summed over ranks (token counts of a step)."""
        if not self.enabled:
            return list(counts)
        return [int(v) for v in self.sum(torch.tensor(list(counts), dtype=torch.float64, device=self.device)).tolist()]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def check_same(self, settings: dict[str, Any]) -> None:
        """Raise ConfigError on every process unless all passed equal ``settings`` (what one command line and one
        data file fix: the training and adapter options, the examples). Every process starts the same command under
        a launcher; on several machines a node started with other flags or another copy of the data would otherwise
        train silently on another stream or with other options (or wait forever on a collective). The message names
        each setting that differs and every process's value."""
        if not self.enabled:
            return
        every = self.gather_objects(settings)
        keys = sorted({k for s in every for k in s}, key=str)
        differ = [k for k in keys if any(s.get(k) != every[0].get(k) for s in every[1:])]
        if differ:
            said = "; ".join(f"{k}: " + ", ".join(f"rank {r} {s.get(k)!r}" for r, s in enumerate(every))
                             for k in differ[:6])
            raise ConfigError(f"the {self.world_size} processes are not running the same training ({said}). Start the "
                              "same command on every process, with the same data (on several machines: the same "
                              "files on each).")

    @contextlib.contextmanager
    def summed(self, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
        """Inside the block ``tensors`` hold their sums over ranks (e.g. router statistics being read); the local
        values come back on exit, so counting continues per rank."""
        if not self.enabled or not tensors:
            yield
            return
        local = [t.clone() for t in tensors]
        for t in tensors:
            dist.all_reduce(t)
        try:
            yield
        finally:
            for t, value in zip(tensors, local):
                t.copy_(value)

    @contextlib.contextmanager
    def agreed_rng(self) -> Iterator[None]:
        """Run the block with rank 0's torch RNG state on every rank (what rank 0 draws, all ranks draw); rank 0
        keeps its advanced state, the others get their own back. Single-process: nothing changes."""
        if not self.enabled:
            yield
            return
        cuda = self.device.type == "cuda"
        own = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None)
        states = [own[0], own[1]] if self.is_main else [None, None]
        dist.broadcast_object_list(states, src=0, device=self.device if cuda else None)
        torch.set_rng_state(states[0])
        if cuda:
            torch.cuda.set_rng_state(states[1], self.device)
        try:
            yield
        finally:
            if not self.is_main:
                torch.set_rng_state(own[0])
                if cuda:
                    torch.cuda.set_rng_state(own[1], self.device)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, write: Callable[[], Any]) -> Any:
        """Run ``write`` (a save) on rank 0 only; the others wait for it. Its return value reaches every rank; if it
        raises, rank 0 raises that error and the others a :class:`RankZeroFailed` quoting it (none waits forever)."""
        if not self.enabled:
            return write()
        outcome: list[Any] = [None, None]
        error: Exception | None = None
        if self.is_main:
            try:
                outcome[0] = write()
            except Exception as caught:  # every rank must learn of it, or they would wait forever
                error, outcome[1] = caught, f"{type(caught).__name__}: {caught}"
        dist.broadcast_object_list(outcome, src=0, device=self.device if self.device.type == "cuda" else None)
        if error is not None:
            raise error
        if outcome[1] is not None:
            raise RankZeroFailed(f"rank 0 failed to write: {outcome[1]}")
        return outcome[0]

    # -- the model ----------------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, trainable: Sequence[nn.Parameter]) -> nn.Module:
        """The module to call for training forwards. Rank 0's trainable values are broadcast first (a seeded or
        data-driven init that drew differently stays consistent). ``ddp``: a DistributedDataParallel over the
        trainable parameters; ``fsdp``: ``model`` itself, with everything but ``trainable`` sharded in place."""
        if not self.enabled:
            return model
        with torch.no_grad():
            for p in trainable:
                dist.broadcast(p.data, src=0)
        if self.mode == "fsdp":
            self._shard(model, set(trainable) | _adapter_tensors(model))
            self._synced = list(trainable)
            return model
        return self._make_ddp(model)

    def _make_ddp(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        self._ddp_params = tuple(id(p) for p in model.parameters() if p.requires_grad)
        # Buffers are not broadcast (router statistics are per rank and summed when read); init_sync=False: the
        # frozen base is identical on every rank already, and the trainable values were broadcast above.
        # find_unused_parameters: a routed expert or a frozen rank unit may get no gradient in some step.
        with warnings.catch_warnings():  # broadcast_buffers=False is still the way to keep rank-local buffers
            warnings.simplefilter("ignore", FutureWarning)
            self._ddp = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None, broadcast_buffers=False,
                init_sync=False, find_unused_parameters=True)
        return self._ddp

    def rewrap(self, model: nn.Module, train_model: nn.Module) -> nn.Module:
        """After hooks changed what trains (LISA's blocks, a frozen rank): a new DDP over the new trainable set
        (DDP's buckets are fixed at construction). Otherwise ``train_model`` as it is."""
        if not self.enabled or self.mode != "ddp":
            return train_model
        if tuple(id(p) for p in model.parameters() if p.requires_grad) == self._ddp_params:
            return train_model
        return self._make_ddp(model)

    def no_sync(self, train_model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` for every micro-batch but the step's last (gradients accumulate locally first)."""
        if self.enabled and self.mode == "ddp" and not last:
            return train_model.no_sync()
        return contextlib.nullcontext()

    def sync_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """``fsdp``: average the trainable (replicated) parameters' gradients over ranks, once per step, in one
        flat buffer per dtype. A parameter with a gradient on some rank gets zeros where it has none; one with a
        gradient nowhere keeps None. (``ddp`` synchronizes inside backward; nothing to do.)"""
        if not self.enabled or self.mode != "fsdp":
            return
        params = [p for p in params if p.requires_grad]
        has = self.sum(torch.tensor([float(p.grad is not None) for p in params], device=self.device))
        used = [p for p, flag in zip(params, has.tolist()) if flag > 0]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in used:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
                offset += n

    def _shard(self, model: nn.Module, keep: set[nn.Parameter]) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        blocks = decoder_blocks(model)
        for block in blocks:
            fully_shard(block, mesh=mesh, ignored_params=keep)
        fully_shard(model, mesh=mesh, ignored_params=keep)


def _adapter_tensors(model: nn.Module) -> set[nn.Parameter]:
    """Every parameter of every adapter, trainable or not: what a method freezes (FFA-LoRA's A, LoRA-XS's SVD
    factors, a finished MixDA stage) stays whole too, so hooks, merges and the saved file see plain tensors."""
    from ..core.model import adapter_names, adapter_parameters

    return {p for name in adapter_names(model) for p in adapter_parameters(model, name).values()}


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the longest ``nn.ModuleList`` outside adapters ([] when it has none)."""
    lists = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and ".adapters" not in n
             and not n.endswith("adapters")]
    return list(max(lists, key=len)) if lists else []


def evaluate_sharded(ctx: "Distributed | None", model: nn.Module, tokenizer: Any, examples: Sequence[Any],
             **kwargs: Any) -> dict[str, Any]:
    """``lorakit.data.evaluate_examples`` with each rank generating for its share of ``examples`` and the
    predictions gathered, so every rank returns the metrics of all of them. Under ``fsdp`` every rank runs the
    same number of forwards (shares padded to one length, ``synced_gpus`` generation), as sharded layers need."""
    from ..data.evaluate import evaluate_examples, generate_completions, score_predictions

    examples = list(examples)
    if ctx is None or not ctx.enabled:
        return evaluate_examples(model, tokenizer, examples, **kwargs)
    if not examples:
        raise ValueError("no examples to evaluate")
    from ..data.evaluate import default_max_new_tokens, example_routing

    return_predictions = kwargs.pop("return_predictions", False)
    task_to_id = kwargs.pop("task_to_id", None)
    max_new_tokens = kwargs.pop("max_new_tokens", None) or default_max_new_tokens(tokenizer, examples)
    indices = ctx.shard(range(len(examples)))
    synced = ctx.mode == "fsdp"
    if synced:  # equal shares: the padding rows repeat this rank's first example, their outputs are dropped
        share = -(-len(examples) // ctx.world_size)
        indices = indices + [indices[0] if indices else 0] * (share - len(indices))
    mine = [examples[i] for i in indices]
    routing = example_routing(mine, task_to_id)
    predictions = generate_completions(model, tokenizer, [ex.prompt for ex in mine], max_new_tokens=max_new_tokens,
                                       row_routing=routing, generate_kwargs={"synced_gpus": True} if synced else None,
                                       **kwargs)
    gathered: dict[int, str] = {}
    for part in ctx.gather_objects(list(zip(indices, predictions))):
        for index, prediction in part:
            gathered.setdefault(index, prediction)
    ordered = [gathered[i] for i in range(len(examples))]
    result = score_predictions(examples, ordered, tokenizer)
    if return_predictions:
        result["predictions"] = ordered
    return result
