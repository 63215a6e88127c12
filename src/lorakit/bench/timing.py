"""Side-by-side timing: interleaved repeats (so machine noise hits every contender alike), min and median."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(fns: Mapping[str, Callable[[], object]], repeats: int = 7, warmup: int = 2) -> dict[str, dict]:
    """Run each fn ``warmup`` times, then ``repeats`` rounds of one call each, in turn; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {k: {"min_s": min(v), "median_s": statistics.median(v), "repeats": len(v)} for k, v in samples.items()}


def ratio(a: dict, b: dict) -> dict:
    return {"min": a["min_s"] / b["min_s"], "median": a["median_s"] / b["median_s"]}


class SavedActivations:
    """Bytes of tensors autograd saves for backward during a forward: a device-independent activation-memory
    measure (CPU has no allocator peak counter)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()

    def __enter__(self):
        def pack(t: torch.Tensor):
            key = t.untyped_storage().data_ptr()
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        return False


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors (galore-torch keeps its projection matrix in a projector object: counted too)."""
    tensors = [getattr(t, "ortho_matrix", t) for t in tensors]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def step_memory(model, opt, ids: torch.Tensor, param_bytes: int | None = None) -> dict[str, float]:
    """Accounted memory (MiB) of a training step of ``model`` with ``opt`` on ``ids`` (batch, seq), after two
    steps (so optimizer state exists): parameters (``param_bytes``, else their tensors' bytes), gradients held
    after backward, optimizer state, and activations saved for backward."""
    for _ in range(2):
        with SavedActivations() as saved:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = tensor_bytes(p.grad for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = tensor_bytes(v for s in opt.state.values() for v in s.values())
    params = tensor_bytes(model.parameters()) if param_bytes is None else param_bytes
    return {"params_mb": params / 2**20, "grads_mb": grads / 2**20, "optimizer_state_mb": state / 2**20,
            "activations_mb": saved.bytes / 2**20, "total_mb": (params + grads + state + saved.bytes) / 2**20}
