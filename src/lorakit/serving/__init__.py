"""Serving many adapters on one base model: per-layer adapter banks and mixed-adapter batches.

- :func:`load_adapters` / :func:`bank_adapters` fill the banks (from PEFT folders / from attached adapters).
- :func:`bank_routing` and :func:`generate` run a batch with one adapter (or weighted mix) per row.
- :mod:`lorakit.bench.serving` measures it against the base model and PEFT.
"""

from .bank import WEIGHTS_KEY, LoraBank, LoraEmbeddingBank, register_kernel
from .multi import AdapterRegistry, bank_adapters, bank_routing, generate, load_adapters, registry_of

__all__ = ["WEIGHTS_KEY", "LoraBank", "LoraEmbeddingBank", "register_kernel", "AdapterRegistry", "bank_adapters",
           "bank_routing", "generate", "load_adapters", "registry_of"]
