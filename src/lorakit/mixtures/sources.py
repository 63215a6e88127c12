"""Existing LoRA adapters (lorakit or PEFT folders) as the experts of a mixture: MeteoRA, X-LoRA and the routed
LoRAs read their sources here. Each folder is read once per (path, file stamps); tensors stay memory-mapped and
are read per module as the layers are built. Only plain LoRA / rsLoRA on linear layers can be stacked as rank
blocks of one bank: DoRA, rank/alpha patterns, LoRA biases, embeddings and modules_to_save are refused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.errors import AdapterLoadError, ConfigError
from ..core.inits import changed_base_error
from ..io.files import TensorFile
from ..io.peft_format import CONFIG_NAME, PREFIX, read_adapter_config, weights_path

if TYPE_CHECKING:
    from ..methods.lora import LoraConfig


# -- source adapters: read once per (folder, file stamps), tensors memory-mapped and read per module -------
@dataclass(frozen=True)
class LoraSource:
    directory: str
    config: LoraConfig
    modules: dict[str, tuple[str, str]]  # module path -> (lora_A key, lora_B key)
    handle: TensorFile  # the weights file, read per module

    def factors(self, module_path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A (r, in), B (out, r)) for one module, or None when this adapter does not adapt it."""
        keys = self.modules.get(module_path)
        if keys is None:
            return None
        A, B = (self.handle.get(k) for k in keys)  # raises AdapterLoadError on NaN/Inf
        return A, B


def read_lora_source(directory: str | Path) -> LoraSource:
    path = Path(directory).expanduser().resolve()
    stamps = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
                   for p in (path / CONFIG_NAME, weights_path(path)))
    return _read_lora_source(str(path), stamps)


@functools.lru_cache(maxsize=64)
def _read_lora_source(directory: str, stamps: tuple) -> LoraSource:
    config = read_adapter_config(directory)
    where = f"source adapter {directory}"
    if type(config).method != "lora":  # subclasses (data-driven inits) may have touched the base: refuse them too
        raise ConfigError(f"{where} is a {type(config).method!r} adapter; mixtures of existing adapters embed "
                          "plain LoRA adapters (lorakit 'lora' or PEFT LoRA).")
    changed = changed_base_error(where, config.requested_init(), "an expert adds to")
    if changed is not None:
        raise ConfigError(changed)
    unsupported = {"use_dora": config.use_dora, "rank_pattern": config.rank_pattern,
                   "alpha_pattern": config.alpha_pattern, "lora_bias": config.lora_bias,
                   "modules_to_save": config.modules_to_save}
    for field_name, value in unsupported.items():
        if value:
            raise ConfigError(f"{where} sets {field_name}={value!r}, which mixtures of existing adapters "
                              "do not support: they stack plain LoRA adapters with one rank per adapter. Export or retrain it as plain LoRA.")
    weights = weights_path(Path(directory))
    handle = TensorFile(weights)
    keys = handle.keys()
    found: dict[str, list[str | None]] = {}
    for key in keys:
        short = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for slot, suffix in enumerate((".lora_A.weight", ".lora_B.weight")):
            if short.endswith(suffix):
                found.setdefault(short[: -len(suffix)], [None, None])[slot] = key
                break
        else:
            if key.endswith(".trainable_tokens_delta"):
                raise ConfigError(f"{where}: tensor {key!r} holds trainable token rows (trainable_token_indices), "
                                  "which a mixture expert does not support (an expert is a plain LoRA on linear "
                                  "layers): use an adapter trained without trainable_token_indices.")
            raise ConfigError(f"{where}: tensor {key!r} is not a linear-layer LoRA factor (lora_A / lora_B "
                              "weight); mixtures of existing adapters embed plain LoRA on linear layers only (no embeddings, "
                              "DoRA, biases).")
    incomplete = [m for m, ab in found.items() if None in ab]
    if incomplete:
        raise AdapterLoadError(f"{weights}: modules with lora_A but no lora_B or the reverse: {incomplete[:3]}")
    return LoraSource(directory, config, {m: (a, b) for m, (a, b) in found.items()}, handle)


def prepare_from_sources(model: nn.Module | None, config):
    """Read the source adapters' configs: ranks, alphas, rsLoRA, and (when unset) the targets they adapt.

    Shared by every method built on a bank of existing LoRAs (MeteoRA, X-LoRA, routed / modality LoRAs). ``model``
    (the ``Method.prepare`` signature) is not read, so ``LoraExpertsConfig.check_inputs`` runs it without one."""
    if config.adapter_paths is None:
        return config
    sources = [read_lora_source(p) for p in config.adapter_paths]
    found = {"expert_r": [s.config.r for s in sources],
             "expert_alpha": [float(s.config.lora_alpha) for s in sources],
             "expert_use_rslora": [s.config.use_rslora for s in sources]}
    for name, values in found.items():
        given = getattr(config, name)
        if given and list(given) != values:
            raise ConfigError(f"{type(config).__name__}.{name}={given} disagrees with the adapters' own configs "
                              f"({values}); leave it unset when adapter_paths are given.")
    targets = config.target_modules
    if targets is None:  # every module some adapter adapts
        targets = sorted({m for s in sources for m in s.modules})
    names = config.adapter_names or [Path(s.directory).name for s in sources]
    if len(set(names)) < len(names):  # folders with the same name in different places
        names = [s.directory for s in sources]
    return replace(config, target_modules=targets, adapter_names=names, **found)
