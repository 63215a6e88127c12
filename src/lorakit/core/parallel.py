"""Across-process joins that adapter code needs inside a data-parallel training run (training.distributed).

Lower layers call :func:`gather_rows` (mixtures' balance losses) and :func:`sum_across` (counts a method updates
state from, e.g. SMoRA's per-rank token counts); both join across processes only while a distributed training
run has switched them on (:func:`rows_gathered`), and are the identity everywhere else, so a forward outside
training (evaluation, serving, a test) never waits on another process.
"""

from __future__ import annotations

import contextlib
import warnings
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.distributed as dist

_GATHER: ContextVar[bool] = ContextVar("lorakit_gather_rows", default=False)


@contextlib.contextmanager
def rows_gathered(enabled: bool = True) -> Iterator[None]:
    """Inside the block (the training loop's, in every process at once) :func:`gather_rows` and :func:`sum_across`
    join across processes."""
    token = _GATHER.set(enabled and dist.is_initialized() and dist.get_world_size() > 1)
    try:
        yield
    finally:
        _GATHER.reset(token)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (N, ...) joined along dim 0 with every process's, in rank order, inside :func:`rows_gathered`
    (identity outside). Processes may hold different N (padded for the collective, then trimmed).

    Differentiable: each process's rows receive the gradient summed over all processes' copies of a loss, so a
    loss computed on the joined rows, then averaged by data parallelism (DDP), has the global batch's gradient.
    Bool tensors (masks, selections) are joined without gradient.
    """
    if not _GATHER.get():
        return tensor
    import torch.distributed.nn.functional as dfn

    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = tensor
    if tensor.shape[0] < max(counts):
        padded = torch.cat([tensor, tensor.new_zeros((max(counts) - tensor.shape[0], *tensor.shape[1:]))])
    if tensor.dtype == torch.bool:  # not every backend gathers bool
        parts = [torch.empty_like(padded, dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(parts, padded.to(torch.uint8).contiguous())
        parts = [p.bool() for p in parts]
    elif tensor.requires_grad:
        with warnings.catch_warnings():  # its replacement (_functional_collectives) is private; this one is public
            warnings.simplefilter("ignore", FutureWarning)
            parts = list(dfn.all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def sum_across(tensor: torch.Tensor, average: bool = False) -> torch.Tensor:
    """``tensor`` summed (``average``: averaged) over every process, a new tensor without gradient, inside
    :func:`rows_gathered`; the tensor itself outside. For statistics that must describe the global micro-batch,
    so that every process updates the same state (one process at batch N·b counts all N·b rows)."""
    if not _GATHER.get():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size() if average else total
