"""Export of low-rank deltas as a plain PEFT LoRA (the ``to_lora`` hook of methods whose ΔW is ``s·B A``).

A method hands over, per adapted module, factors ``(A (r_m, in), B (out, r_m))`` with ``ΔW = (α / r_m) · B A``
(it folds any other scale into B); modules it drops (rank 0) are left out. The PEFT config lists the kept
modules by full path and carries per-module ranks in ``rank_pattern``, so PEFT (and lorakit's own ``lora``)
rebuild exactly the same ΔW.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..core.model import adapter_layers, adapter_state
from ..core.errors import AdapterError
from .lora import LoraConfig

PREFIX = "base_model.model."
Factors = Callable[[nn.Module], "tuple[torch.Tensor, torch.Tensor] | None"]


def export_plain_lora(model: nn.Module, name: str, factors: Factors, lora_alpha: float,
                      lora_dropout: float = 0.0) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """``(LoraConfig, PEFT state dict)`` from ``factors(delta) -> (A, B) | None`` over adapter ``name``'s layers.

    ``A``/``B`` must already include every scale except PEFT's ``lora_alpha / r_m`` (r_m = ``A.shape[0]``).
    Raises AdapterError when every module is dropped (nothing to export).
    """
    config = adapter_state(model).configs[name]
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for path, layer in adapter_layers(model):
        if name not in layer.adapters:
            continue
        out = factors(layer.adapters[name])
        if out is None:
            continue
        A, B = out
        ranks[path] = int(A.shape[0])
        state[f"{PREFIX}{path}.lora_A.weight"] = A.detach().contiguous()  # (r_m, in)
        state[f"{PREFIX}{path}.lora_B.weight"] = B.detach().contiguous()  # (out, r_m)
    if config.modules_to_save:  # their full copies travel as they are (PEFT keys them the same way)
        from ..io.peft_format import adapter_state_dict

        adapted = tuple(f"{PREFIX}{path}." for path, layer in adapter_layers(model) if name in layer.adapters)
        state.update({k: v for k, v in adapter_state_dict(model, name).items() if not k.startswith(adapted)})
    if not ranks:
        raise AdapterError(f"adapter {name!r}: every module has rank 0 after pruning; there is no LoRA to export.")
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank; others by pattern
    lora = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=sorted(ranks),
        rank_pattern={re.escape(p): k for p, k in ranks.items() if k != r},
        modules_to_save=config.modules_to_save, base_model_name_or_path=config.base_model_name_or_path,
    )
    return lora, state


def save_plain_lora(model: nn.Module, name: str, directory) -> "Path":
    """Write adapter ``name`` through its method's ``to_lora`` as a PEFT LoRA folder (config + safetensors,
    each written atomically). Raises AdapterError for a method without an exact plain-LoRA form."""
    from pathlib import Path

    from ..core.registry import get_method
    from ..io.files import atomic_write_json, save_tensors
    from .lora import lora_file_fields

    method = get_method(adapter_state(model).configs[name])
    if method.to_lora is None:
        raise AdapterError(f"method {method.name!r} has no exact plain-LoRA form; nothing to export")
    lora, state = method.to_lora(model, name)
    infos = [layer.info for _, layer in adapter_layers(model) if name in layer.adapters]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / "adapter_model.safetensors", state)
    atomic_write_json(directory / "adapter_config.json",
                      {**lora.to_dict(), **lora_file_fields(lora, infos), "peft_type": "LORA", "inference_mode": True})
    return directory
