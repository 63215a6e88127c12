"""Serving many adapters on one base model: per-layer adapter banks and mixed-adapter batches.

- :func:`load_adapters` / :func:`bank_adapters` fill the banks (from PEFT folders / from attached adapters).
- :func:`bank_routing` and :func:`generate` run a batch with one adapter (or weighted mix) per row.
- :class:`Engine` (continuous batching over a paged KV cache), :class:`AdapterStore` (disk / host / resident
  tiers) and :class:`SamplingParams` serve requests; :mod:`lorakit.serving.server` is the OpenAI-compatible
  HTTP server (``lorakit serve``, extra ``lorakit[serve]``).
- :mod:`lorakit.bench.serving` measures the banks against the base model and PEFT; ``lorakit bench serve``
  (:mod:`lorakit.bench.serve`) replays S-LoRA's workload against the engine.
"""

from .bank import WEIGHTS_KEY, LoraBank, LoraEmbeddingBank, register_kernel
from .engine import Engine, EngineBusyError, EngineStopError, EngineThreadError, Event, Request, RequestError
from .multi import AdapterRegistry, bank_adapters, bank_routing, generate, load_adapters, registry_of
from .sampling import SamplingParams
from .store import AdapterStore

__all__ = ["WEIGHTS_KEY", "LoraBank", "LoraEmbeddingBank", "register_kernel", "AdapterRegistry", "bank_adapters",
           "bank_routing", "generate", "load_adapters", "registry_of", "Engine", "EngineBusyError", "EngineStopError",
           "EngineThreadError", "Event", "Request", "RequestError", "SamplingParams", "AdapterStore"]


def _register_default_kernels() -> None:
    """The Triton BGMV kernel for CUDA banks, when Triton and a CUDA device are present (``LORAKIT_TRITON=0``: off)."""
    import os

    import torch

    if os.environ.get("LORAKIT_TRITON", "1") == "0" or not torch.cuda.is_available():
        return
    try:
        from . import triton_bgmv
    except ImportError:  # no Triton (e.g. a CPU-only install): the torch path serves CUDA banks too
        return
    triton_bgmv.register("cuda")


_register_default_kernels()
