"""X-LoRA — "X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible Framework for Large Language Models with
Applications in Protein Mechanics and Molecular Design", Buehler & Buehler, arXiv:2402.07148.

A scaling head reads the last hidden state of a first pass of the model (no_grad, adapters scaled by the
"scaling pass value" v, 0 = off) and gives every token a scaling per adapter, the same for every adapted module
("global") or one per module ("layerwise"); the second, real pass uses them:

    h = hidden_states[-1] of f(x; λ ≡ v)                                (no_grad)
    λ = softmax(head(h) / T)        (batch, seq, [modules,] N)         (optionally top-k, softmax over the kept k)
    y = W x + g · Σ_i λ_i(t) · s_i · B_i A_i dropout(x)                  (g = global_scaling_weight)

Follows PEFT's ``XLoraModel`` (peft ``tuners/xlora``), with its option names and defaults: head depth 1 =
``Linear(H, N[·L])``, depth d ≥ 2 = ``Linear(H, size)`` → [ReLU, Dropout(p), Linear(size, size)] … → ReLU,
Dropout(p), ``Linear(size, N[·L])`` (PEFT always has the ReLU/Dropout; the xlora repo can turn them off); softmax
over the adapters with temperature; ``top_k_lora`` zeroes all but the k largest scalings (no renormalisation),
``enable_softmax_topk`` then takes a softmax over the kept k of the current scalings. "Modules" are the adapted
modules in model order (PEFT's ``layer_number``), not transformer blocks. Adapters are frozen (the bank's
``frozen_names``: saved, never trained) unless ``use_trainable_adapters``; only the head trains.

Choices:
- Adapters are rank blocks of one bank per module (``mixtures.rank_blocks.LoraExperts``: stacked A's and B's,
  owner map, per-rank scaling), so the forward is two GEMMs whatever N is and ranks, alphas and rsLoRA may differ. One
  dropout mask serves all adapters (PEFT draws one per adapter; identical in eval). Sources: lorakit or PEFT
  LoRA folders (``adapter_paths``); a module an adapter does not adapt gets a zero block for it.
- The two passes without touching the host model: ``add_adapter`` registers a forward pre-hook (with kwargs) and
  an always-called forward hook on the model it is given. The pre-hook runs ``model.forward`` directly (no hook
  recursion) inside ``routing(extras={"xlora": {delta: v}})``, applies each active X-LoRA adapter's head to
  ``hidden_states[-1]``, and enters ``routing(extras={"xlora": {delta: scalings}})`` for the real pass; the
  forward hook leaves it (also when the forward raises). ContextVars keep this thread-safe. The hook is a
  no-op while no X-LoRA adapter is active or the adapters are disabled, and removes itself once the model has
  no X-LoRA adapter left; the method's ``teardown`` (``remove_xlora_hooks``) removes them on delete / unload.
- The head is the ``classifier`` submodule of the first adapted module's delta, so it saves and loads with the
  adapter (keys ``<first module>.classifier.layers.*``). Files are lorakit's (``lorakit_method: xlora``, banks
  and head in one safetensors file); PEFT's X-LoRA folder layout (classifier + one sub-folder per LoRA) is not
  read or written.
- Where the authors' own repository (EricLBuehler/xlora @ 8217992) and PEFT's port differ, this follows PEFT:
  ``enable_softmax_topk`` is a softmax per token over its kept k (``xlora_insertion.py``
  ``get_maybe_topk_scalings`` takes one softmax over every kept scaling of the batch, flattened), and the head
  always has its ReLU/Dropout (the repo's ``enable_relu_and_dropout``, default True there, can drop them).
- With ``scaling_pass_value`` v ≠ 0 the scaling pass uses λ ≡ v for every adapter without top-k (PEFT applies
  its top-k to those tied dummy scalings, an arbitrary pick).
- Generation needs ``use_cache=False``, as in PEFT: every step reruns the scaling pass over the whole sequence,
  which a KV cache cannot follow. ``model.generate(..., use_cache=False)`` works; a call that passes a cache is
  refused with that advice. The forward must go through the hooked model's ``__call__`` (HF ``generate``, the
  Trainer and lorakit's loop do). Under activation checkpointing the recompute replays the forward's scalings
  (``core.checkpointing``, which lorakit's loop, ``train_concurrent`` and ``LorakitCallback`` install).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..core.delta import LayerInfo
from ..core.config import check_dropout, check_positive, check_positive_ints, field_error
from ..core.errors import AdapterError, ConfigError
from ..core.layer import AdapterLayer
from ..core.model import STATE_ATTR
from ..core.registry import register_method
from ..core.routing import current_routing, routing
from ..core.targeting import select_targets
from ..mixtures.rank_blocks import LoraExperts, LoraExpertsConfig, drop_adapter_paths
from ..mixtures.sources import prepare_from_sources

XLORA_KEY = "xlora"  # routing extras: {delta: scalings (real pass) or the scaling pass value (float)}
_CACHE_KWARGS = ("cache", "past_key_values")
# Routing contexts entered by pre-hooks, left by the matching forward hooks (None: the pre-hook entered none).
_FRAMES: ContextVar[tuple] = ContextVar("lorakit_xlora_frames", default=())


@dataclass
class XLoraConfig(LoraExpertsConfig):
    """PEFT's XLoraConfig fields (``adapters`` → ``adapter_paths``). ``hidden_size`` (default: the model's) and
    ``layer_modules`` (the adapted modules in order, which fix the layerwise scalings) are filled when the
    adapter is added.

    - ``xlora_depth``: layers of the scaling head (1: one Linear). ``xlora_size``: its hidden width.
    - ``xlora_dropout_p``: dropout between the head's hidden layers.
    - ``layerwise_scalings``: one scaling per adapter and adapted module (False: the same for every module).
    - ``enable_softmax``: softmax over the adapters' scalings. ``softmax_temperature``: its temperature.
    - ``top_k_lora``: keep only the k largest scalings per token (None: all).
    - ``enable_softmax_topk``: softmax over the kept k (needs ``top_k_lora``).
    - ``use_trainable_adapters``: also train the LoRA adapters (False: only the head).
    - ``scaling_pass_value``: the scaling every adapter gets in the first (scaling) pass; 0 = adapters off.
    - ``global_scaling_weight``: factor g on the whole mixed delta.
    """

    hidden_size: int | None = None
    layer_modules: list[str] | None = None
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    layerwise_scalings: bool = False
    enable_softmax: bool = True
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    enable_softmax_topk: bool = False
    use_trainable_adapters: bool = False
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "xlora_depth", "xlora_size")
        check_dropout(self, "xlora_dropout_p")
        check_positive(self, "softmax_temperature")
        if self.top_k_lora is not None and not 1 <= self.top_k_lora <= self.num_experts:
            raise field_error(self, "top_k_lora", f" must be in 1..{self.num_experts} or None, got {self.top_k_lora}.")
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise field_error(self, "enable_softmax_topk", " needs top_k_lora (the softmax is over the kept k).")


@dataclass
class XLoraScalings:
    logits: torch.Tensor  # (batch, seq, modules or 1, N) float32, the head's output
    weights: torch.Tensor  # (batch, seq, modules or 1, N) the scalings λ after softmax / top-k


class XLoraClassifier(nn.Module):
    """The scaling head, laid out as PEFT's (``layers`` = Sequential, same indices)."""

    def __init__(self, config: XLoraConfig, n_modules: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = config.hidden_size
        for _ in range(config.xlora_depth - 1):
            layers += [nn.Linear(width, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0:
                layers.append(nn.Dropout(config.xlora_dropout_p))
            width = config.xlora_size
        n_out = config.num_experts * (n_modules if config.layerwise_scalings else 1)
        self.layers = nn.Sequential(*layers, nn.Linear(width, n_out))
        self.num_experts = config.num_experts
        self.softmax, self.temperature = config.enable_softmax, config.softmax_temperature
        self.top_k, self.softmax_topk = config.top_k_lora, config.enable_softmax_topk

    def forward(self, hidden: torch.Tensor) -> XLoraScalings:
        dtype = self.layers[-1].weight.dtype
        logits = self.layers(hidden.to(dtype)).float()
        logits = logits.view(*hidden.shape[:2], -1, self.num_experts)  # (batch, seq, modules or 1, N)
        s = torch.softmax(logits / self.temperature, dim=-1) if self.softmax else logits
        if self.top_k is not None:
            keep = torch.zeros_like(s, dtype=torch.bool).scatter(-1, s.topk(self.top_k, dim=-1).indices, True)
            s = s * keep
            if self.softmax_topk:
                s = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).masked_fill(~keep, 0.0)
        return XLoraScalings(logits=logits, weights=s)


class XLoraLinear(LoraExperts):
    """N adapters on one linear layer, scaled per token by the scalings of the routing context."""

    whole_batch = True  # the scalings come from a scaling pass over every row of the batch

    def __init__(self, info: LayerInfo, config: XLoraConfig, module_index: int):
        super().__init__(info, config, trainable=config.use_trainable_adapters)
        self.slot = module_index if config.layerwise_scalings else 0
        self.global_scaling_weight = config.global_scaling_weight
        self.classifier = XLoraClassifier(config, len(config.layer_modules)) if module_index == 0 else None

    def route(self) -> XLoraScalings | float:
        ctx = current_routing()
        table = None if ctx is None else ctx.extras.get(XLORA_KEY)
        if table is None or self not in table:
            raise AdapterError("an X-LoRA layer ran without scalings: call the model the adapter was added to "
                               "(its forward pre-hook runs the scaling pass), not a submodule or .forward directly.")
        return table[self]

    def accumulate(self, acc: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor,
                   base_layer: nn.Module) -> torch.Tensor:
        route = self.route()
        if isinstance(route, float) and route == 0.0:  # scaling pass with the adapters off: nothing to add
            return acc
        return acc + self(x, base_out, base_layer)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        route = self.route()
        if isinstance(route, float):  # scaling pass: λ ≡ v for every adapter
            weights = torch.full((self.num_experts,), route, device=x.device)
        else:
            weights = route.weights[:, :, self.slot]  # (batch, seq, N)
            if tuple(weights.shape[:-1]) != tuple(x.shape[:-1]):
                raise AdapterError(f"X-LoRA scalings are per token of the whole batch {tuple(weights.shape[:-1])}, "
                                   f"but this layer got input {tuple(x.shape[:-1])}; per-row adapter_names are "
                                   "not supported.")
            self.record(weights, x.shape, logits=route.logits[:, :, self.slot])
        return self.mixed(x, weights, self.global_scaling_weight).to(base_out.dtype)


# -- the two-pass orchestration -------------------------------------------------------------------------------
def _active_groups(model: nn.Module, names: list[str]) -> dict[str, list[XLoraLinear]]:
    groups: dict[str, list[XLoraLinear]] = {n: [] for n in names}
    for module in model.modules():
        if isinstance(module, AdapterLayer) and not module.disabled:
            for n in names:
                if n in module.adapters:
                    groups[n].append(module.adapters[n])
    return {n: deltas for n, deltas in groups.items() if deltas}


def _xlora_pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> None:
    state = getattr(model, STATE_ATTR, None)
    configs = {} if state is None else {n: c for n, c in state.configs.items() if isinstance(c, XLoraConfig)}
    if not configs:
        remove_xlora_hooks(model)  # the adapter was deleted or the model unloaded
        return None
    frames = _FRAMES.get()
    _FRAMES.set(frames + (None,))  # first, so the always-called forward hook pops the right frame on errors
    groups = _active_groups(model, [n for n in state.active if n in configs])
    if not groups:
        return None
    if any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
        raise AdapterError("X-LoRA reruns a scaling pass over the whole sequence at every forward, which a KV "
                           "cache cannot follow: call model.generate(..., use_cache=False) (PEFT's X-LoRA requires "
                           "the same).")
    ctx = current_routing()
    extras = dict(ctx.extras) if ctx is not None else {}
    passing = {d: float(configs[n].scaling_pass_value) for n, deltas in groups.items() for d in deltas}
    pass_kwargs = {k: v for k, v in kwargs.items() if k not in ("labels", *_CACHE_KWARGS)}
    pass_kwargs.update(output_hidden_states=True, return_dict=True, use_cache=False)
    with torch.no_grad(), routing(extras={**extras, XLORA_KEY: passing}):
        hidden = model.forward(*args, **pass_kwargs).hidden_states[-1]  # (batch, seq, hidden)
    routes: dict[XLoraLinear, XLoraScalings] = {}
    for deltas in groups.values():
        head = next(d.classifier for d in deltas if d.classifier is not None)
        scalings = head(hidden)
        routes.update({d: scalings for d in deltas})
    frame = routing(extras={**extras, XLORA_KEY: routes})
    frame.__enter__()
    _FRAMES.set(frames + (frame,))
    return None


def _xlora_post_hook(model: nn.Module, args: tuple, output: Any) -> None:
    frames = _FRAMES.get()
    if frames:
        _FRAMES.set(frames[:-1])
        if frames[-1] is not None:
            frames[-1].__exit__(None, None, None)
    return None


def _ensure_hooks(model: nn.Module) -> None:
    # Found by identity, not by a stored handle: a deep copy of the model carries the hooks along.
    if not any(h is _xlora_pre_hook for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_xlora_pre_hook, with_kwargs=True)
        model.register_forward_hook(_xlora_post_hook, always_call=True)


def remove_xlora_hooks(model: nn.Module, name: str | None = None) -> None:
    """Remove the X-LoRA forward hooks from ``model`` once no X-LoRA adapter is left (the method's teardown)."""
    state = getattr(model, "lorakit", None)
    if name is not None and state is not None and any(
            isinstance(c, XLoraConfig) for n, c in state.configs.items() if n != name):
        return
    for hook_id, hook in list(model._forward_pre_hooks.items()):
        if hook is _xlora_pre_hook:
            del model._forward_pre_hooks[hook_id]
            model._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    for hook_id, hook in list(model._forward_hooks.items()):
        if hook is _xlora_post_hook:
            del model._forward_hooks[hook_id]
            model._forward_hooks_always_called.pop(hook_id, None)


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for c in (config, getattr(config, "text_config", None)):
        size = getattr(c, "hidden_size", None)
        if isinstance(size, int):
            return size
    raise ConfigError("XLoraConfig.hidden_size is not set and the model has no config.hidden_size; set it to the "
                      "width of the model's last hidden state.")


def prepare_xlora(model: nn.Module, config: XLoraConfig) -> XLoraConfig:
    config = prepare_from_sources(model, config)
    modules = select_targets(model, config)
    if config.layer_modules is not None and list(config.layer_modules) != modules:
        raise ConfigError(f"XLoraConfig.layer_modules ({len(config.layer_modules)} modules, saved with the adapter) "
                          f"differ from the {len(modules)} modules its targets select in this model; is it another "
                          "base model?")
    _ensure_hooks(model)
    return replace(config, hidden_size=config.hidden_size or _hidden_size(model), layer_modules=modules)


def build_xlora(base_layer: nn.Module, info: LayerInfo, config: XLoraConfig, path: str = "") -> XLoraLinear:
    return XLoraLinear(info, config, config.layer_modules.index(path)).load_sources(config, path)


register_method(
    "xlora", config=XLoraConfig, build=build_xlora, prepare=prepare_xlora, file_fields=drop_adapter_paths,
    mergeable=False, teardown=remove_xlora_hooks, generate_kwargs={"use_cache": False},
    description="X-LoRA: a head on a first (adapter-free) pass's last hidden state scales N LoRAs per token.",
    paper="Buehler & Buehler 2024, arXiv:2402.07148",
    variants={"xlora": {"expert_r": [4, 2], "expert_alpha": [8, 8], "use_trainable_adapters": True},
              "xlora_layerwise": {"expert_r": [2, 2, 2], "use_trainable_adapters": True, "layerwise_scalings": True,
                                  "xlora_depth": 2, "xlora_size": 8, "top_k_lora": 2, "enable_softmax": False,
                                  "enable_softmax_topk": True, "scaling_pass_value": 0.5}},
)
