"""Collapse a trained mixture of LoRA experts (MixLoRA, MoLE) into one plain LoRA, to serve on any engine.

A mixture's FFN output ``Σ_e w_e(x) FFN_e(x)`` depends on the token through the router; one LoRA cannot
reproduce it. The collapse replaces the router by fixed expert weights p_e and merges each projection's expert
deltas with a merge method (default linear: ``ΔW_proj = Σ_e p_e s B_e A_e``; any method of
:mod:`.methods`, e.g. ``svd`` to keep the expert rank, or ``lego``). ``expert_weights="uniform"`` uses
p_e = 1/E; ``"routing"`` uses each layer's mean routing weight over ``calibration`` inputs (what the router
actually did). The shared attention LoRA is copied unchanged. Approximate by construction: ``lorakit bench
merge`` reports the metric lost.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .. import __version__
from ..core.errors import ConfigError
from ..core.layer import ModulesToSaveWrapper
from ..core.model import adapter_layers, adapter_state, host_path
from .merge import _cpu32, _options, build_output, output_config, recipe_options
from .methods import Dense, LowRank, ModuleTerms, dense_svd, get_merge_method

EXPERT_WEIGHTS = ("uniform", "routing")


def _routing_weights(model: nn.Module, name: str, calibration: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean dense routing weight per expert, by mixture layer path, over the calibration inputs."""
    from ..mixtures import record_routing

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    with torch.no_grad(), record_routing(model, name) as traces:
        for ids in calibration:
            model(input_ids=ids)
    for key, records in traces.items():
        path = key.rsplit("[", 1)[0]
        for rec in records:
            w = rec["weights"].reshape(-1, rec["weights"].shape[-1]).float()
            sums[path] = sums.get(path, 0) + w.sum(0)
            counts[path] = counts.get(path, 0) + w.shape[0]
    return {p: sums[p] / counts[p] for p in sums}


def collapse_experts(model: nn.Module, name: str = "default", method: str = "linear", *,
                     expert_weights: str = "uniform", calibration: Sequence[torch.Tensor] | None = None,
                     **options: Any):
    """A :class:`~lorakit.compose.merge.MergedAdapter` (plain LoRA) from mixture adapter ``name`` on ``model``.

    ``calibration``: input_ids tensors (B, T), needed for ``expert_weights="routing"``. ``method``: any merge
    method, ``<method>_svd`` forms with ``svd_rank`` included. Raises ConfigError for an unknown weighting, a
    missing calibration set or a delta that is neither experts nor a plain LoRA (a DoRA one included: its
    magnitudes would be lost; :func:`~lorakit.compose.merge_adapters` merges DoRA exactly).
    """
    if expert_weights not in EXPERT_WEIGHTS:
        raise ConfigError(f"expert_weights must be one of {EXPERT_WEIGHTS}, got {expert_weights!r}.")
    if expert_weights == "routing" and not calibration:
        raise ConfigError("expert_weights='routing' needs calibration=[input_ids, ...] to measure the routing.")
    if name not in adapter_state(model).configs:
        raise ConfigError(f"no adapter {name!r} on this model; loaded: {list(adapter_state(model).configs)}")
    merge_method, truncate = get_merge_method(method)
    opts = _options(dict(options), merge_method, truncate)
    routing = _routing_weights(model, name, calibration) if expert_weights == "routing" else {}
    gen = torch.Generator().manual_seed(opts.seed)
    results, kinds = {}, {}
    for path, layer in adapter_layers(model):
        if name not in layer.adapters:
            continue
        delta = layer.adapters[name]
        if hasattr(delta, "lora_A") and isinstance(delta.lora_A, nn.ParameterDict):  # stacked experts per projection
            n_exp = next(iter(delta.lora_A.values())).shape[0]
            p = routing.get(path, torch.full((n_exp,), 1.0 / n_exp))
            for proj, A in delta.lora_A.items():
                B = delta.lora_B[proj]
                terms = ModuleTerms(A=list(_cpu32(A).unbind(0)), B=list(_cpu32(B).unbind(0)),
                                    scaling=torch.full((n_exp,), float(delta.scaling)), weights=_cpu32(p))
                result = merge_method.merge(terms, opts, gen)
                if isinstance(result, Dense):
                    rank = (opts.svd_rank or A.shape[1]) if truncate else None
                    result = LowRank(*dense_svd(result.delta, rank, opts.rank_tolerance))
                results[f"{path}.{proj}"] = (result.A, result.B, None, None)
                kinds[f"{path}.{proj}"] = "linear"
        else:
            if hasattr(delta, "lora_magnitude_vector"):  # its units leave out the magnitude's row scaling
                raise ConfigError(f"module {path!r}: adapter {name!r} is DoRA; collapse_experts copies plain LoRA parts "
                                  f"unchanged and would drop its magnitudes. merge_adapters([{name!r}], model=model) "
                                  f"writes a DoRA adapter exactly.")
            try:
                units = delta.units()
            except NotImplementedError:
                raise ConfigError(f"module {path!r}: a {type(delta).__name__} delta is neither stacked experts nor a "
                                  f"plain LoRA; collapse_experts cannot turn it into a LoRA.") from None
            bias = delta.delta_bias()
            results[path] = (_cpu32(units.A).clone(), _cpu32(units.B) * units.scaling,
                             None if bias is None else _cpu32(bias), None)
            kinds[path] = layer.info.kind
    if not results:
        raise ConfigError(f"adapter {name!r} has no module to collapse")
    source = adapter_state(model).configs[name]
    config = output_config([source], results, kinds)
    recipe = {"method": method, "collapse_of": type(source).method or type(source).__name__,
              "expert_weights": expert_weights, "options": recipe_options(opts), "lorakit_version": __version__}

    def saved_state(path):
        wrapper = next(m for q, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper) and host_path(q) == path)
        return wrapper.copies[name].state_dict()  # build_output copies it

    return build_output(model, config, results, recipe, saved_state)
