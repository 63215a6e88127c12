"""LongLoRA — "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models", Chen et al., ICLR 2024,
arXiv:2309.12307.

Context extension with three parts, as the official code (dvlab-research/LongLoRA ``fine-tune.py`` and
``llama_attn_replace.py``):

1. **S²-Attn (shifted sparse attention), training only.** With ``G = q_len · group_size_ratio`` (official
   ``group_size_ratio = 1/4``), the sequence is cut into groups of G tokens and each token attends causally
   within its group only. Half of the heads (the second half) use groups shifted by G/2, so information flows
   between neighbouring groups: their groups are ``[0, G/2), [G/2, 3G/2), …, [L − G/2, L)``. Cost per layer is
   ``O(L · G)`` instead of ``O(L²)``. At inference (``model.eval()``) attention is exact full causal attention.
2. **LoRA+ (the paper's name, not Hayou et al.'s):** LoRA (the run's adapter; official r=8, α=16, q/k/v/o) plus
   full training of every base parameter whose name contains one of ``trainable_params`` (official
   ``"embed,norm"``: embeddings and RMSNorm weights), which the paper finds necessary for long context.
3. **Position interpolation:** when the run's ``max_length`` exceeds the model's ``max_position_embeddings``,
   RoPE gets linear scaling with ``factor = ceil(max_length / max_position_embeddings)`` (``fine-tune.py``).

Which shifted-group form: the official code has two S²-Attn paths. ``forward_noflashattn`` rolls the shifted
heads by −G/2 and attends causally in every G-block of the rolled sequence, so in its last block tokens
``0 … G/2`` attend to tokens ``L − G/2 … L`` (a wrap-around that lets early tokens see the end). The flash path
``forward_flashattn`` (the default, ``use_flash_attn=True``) cuts the shifted heads at ``cu_seqlens``
``[G/2, 3G/2, …]`` (lines 110-112) with no wrap-around. This module computes the flash path's groups; the
rolled layout is used only as the memory layout (its last block is masked into its two halves).

Integration: S²-Attn is a function registered with transformers' ``AttentionInterface`` under ``"lorakit_s2"``
(with SDPA's mask builder); the procedure switches the model to it in ``param_groups`` and back to the model's
own implementation in ``finish``. The host model's source is untouched. The function uses S²-Attn only when the
attention module is in training mode and attends over exactly its own queries (no KV cache); otherwise it is
SDPA. Padding: the key-padding part of the model's mask is applied in every group (as the official flash path's
``key_padding_mask``); groups start at position 0 (right padding, as lorakit's collator pads). A length not a
multiple of G is padded at the end internally (causal masking keeps the pad invisible to real tokens); G is
rounded down to even; sequences too short for G ≥ 2 use full attention.

RoPE scaling is applied in place to the loaded model's rotary buffers and ``config.rope_parameters``. As the
official ``get_trainable_weights.py`` keeps the trained embeddings and norms beside the LoRA weights
(``trainable_params.bin``), a run with an ``output_dir`` writes them to ``trainable_params.safetensors`` there
(host parameter names; the RoPE factor in its metadata); :func:`load_trainable_params` puts them, and the RoPE
scaling, into a freshly loaded base before the adapter is used.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import check_range
from ...core.errors import ConfigError, comma_items, did_you_mean
from ...core.model import adapter_layers, host_path
from ...io.files import load_tensors
from .base import TRAINABLE_PARAMS_FILE, Procedure, ProcedureConfig, register_procedure, save_trained_base

ATTN_IMPLEMENTATION = "lorakit_s2"
# group_size_ratio per model config (id), set by the procedure while S²-Attn is on for that model.
_RATIOS: dict[int, float] = {}


def s2_group_size(q_len: int, ratio: float) -> int:
    """G = int(q_len · ratio), rounded down to even (the shift is G/2); 0 when no group of ≥ 2 tokens fits."""
    g = int(q_len * ratio)
    g -= g % 2
    return g if g >= 2 else 0


def _causal_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: int, scaling: float | None,
                   dropout: float) -> torch.Tensor:
    """Causal attention within consecutive groups of ``size`` tokens: (b, h', n·size, d) each -> (b, n·size, h', d)."""
    b, heads, tokens, d = q.shape
    n = tokens // size

    def grouped(t: torch.Tensor) -> torch.Tensor:  # (b, h', n·size, d) -> (b·n, h', size, d)
        return t.unflatten(2, (n, size)).transpose(1, 2).flatten(0, 1)

    out = F.scaled_dot_product_attention(grouped(q), grouped(k), grouped(v), is_causal=True, dropout_p=dropout,
                                         scale=scaling)  # (b·n, h', size, d)
    return out.unflatten(0, (b, n)).permute(0, 1, 3, 2, 4).reshape(b, tokens, heads, d)


def s2_attention_core(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_size: int,
                      key_valid: torch.Tensor | None = None, scaling: float | None = None,
                      dropout: float = 0.0) -> torch.Tensor:
    """Shifted sparse attention. query/key/value (b, h, L, d) with key/value heads already repeated to h (h ≥ 2
    and even); ``group_size`` G even; ``key_valid`` (b, L) bool or None -> output (b, L, h, d).

    Heads ``[0, h/2)`` attend causally within ``[kG, (k+1)G)``, heads ``[h/2, h)`` within ``[0, G/2)``,
    ``[G/2 + kG, G/2 + (k+1)G)``, ``[L − G/2, L)`` (official flash path, ``llama_attn_replace.py`` 100-119).
    Without ``key_valid`` each group is one causal SDPA call (no mask: fused kernels, activations O(L·d));
    with it, the groups are laid out rolled and masked (key padding, O(L·G) mask)."""
    b, h, length, d = query.shape
    if h % 2:
        raise ValueError(f"S²-Attn shifts half of the heads; this layer has an odd number of heads ({h}).")
    g, half = group_size, h // 2
    padded = math.ceil(length / g) * g
    if padded != length:  # pad at the end: causal masking keeps it invisible to real tokens
        extra = (0, 0, 0, padded - length)
        query, key, value = F.pad(query, extra), F.pad(key, extra), F.pad(value, extra)
    if key_valid is None:  # no padding: every group is plain causal attention (SDPA's fused kernels, no mask)
        q, k, v = (t[:, half:] for t in (query, key, value))
        edges = [torch.cat([t[:, :, : g // 2], t[:, :, padded - g // 2:]], dim=2) for t in (q, k, v)]
        edge_out = _causal_groups(*edges, g // 2, scaling, dropout)  # [0, G/2) and [L − G/2, L): (b, G, h/2, d)
        parts = [edge_out[:, : g // 2]]
        if padded > g:
            parts.append(_causal_groups(*(t[:, :, g // 2: padded - g // 2] for t in (q, k, v)), g, scaling, dropout))
        shifted = torch.cat(parts + [edge_out[:, g // 2:]], dim=1)
        unshifted = _causal_groups(query[:, :half], key[:, :half], value[:, :half], g, scaling, dropout)
        return torch.cat([unshifted, shifted], dim=2)[:, :length]  # (b, L, h, d)
    valid = F.pad(key_valid.bool(), (0, padded - length), value=False)
    groups = padded // g

    def grouped(t: torch.Tensor) -> torch.Tensor:  # (b, h', padded, d) -> (b * groups, h', g, d)
        return t.unflatten(2, (groups, g)).transpose(1, 2).flatten(0, 1)

    causal = torch.ones(g, g, dtype=torch.bool, device=query.device).tril()
    eye = torch.eye(g, dtype=torch.bool, device=query.device)
    outs = []
    for shifted in (False, True):
        heads = slice(half, h) if shifted else slice(0, half)
        q, k, v, keep = query[:, heads], key[:, heads], value[:, heads], valid
        structure = causal.expand(groups, g, g)
        if shifted:  # roll by −G/2: rolled group k holds tokens [G/2 + kG, G/2 + (k+1)G) (mod padded)
            q, k, v = (t.roll(-g // 2, dims=2) for t in (q, k, v))
            keep = keep.roll(-g // 2, dims=1)
            last = causal.clone()
            last[g // 2:, : g // 2] = False  # the last rolled group is two groups: [L − G/2, L) and [0, G/2)
            structure = torch.cat([structure[:-1], last[None]])
        mask = structure[None] & keep.view(b, groups, 1, g)  # (b, groups, g, g)
        mask = (mask | eye).view(b * groups, 1, g, g)  # a query with no visible key (padding) sees itself: no NaN
        out = F.scaled_dot_product_attention(grouped(q), grouped(k), grouped(v), attn_mask=mask, dropout_p=dropout,
                                             scale=scaling)  # (b * groups, half, g, d)
        out = out.unflatten(0, (b, groups)).permute(0, 1, 3, 2, 4).reshape(b, padded, half, d)
        if shifted:
            out = out.roll(g // 2, dims=1)
        outs.append(out)
    return torch.cat(outs, dim=2)[:, :length]  # (b, L, h, d)


def s2_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (b, h, L, d), key/value (b, kv_heads, L, d) (rotary applied) ->
    ((b, L, h, d), None). S²-Attn for a training-mode module attending over its own queries, SDPA otherwise."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    ratio = _RATIOS.get(id(getattr(module, "config", None)))
    length = query.shape[2]
    g = s2_group_size(length, ratio) if ratio is not None else 0
    if not module.training or key.shape[2] != length or not g or query.shape[1] < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # Key padding (the official flash path's key_padding_mask): the last query row sees every valid key.
    key_valid = None
    if attention_mask is not None:
        row = attention_mask[:, 0, -1, :]  # (b, L): bool (True = attend) from SDPA's mask builder, or additive
        key_valid = row if row.dtype == torch.bool else row == 0
    out = s2_attention_core(query, key, value, g, key_valid, scaling=scaling, dropout=dropout)
    return out.contiguous(), None


def apply_rope_linear_scaling(model: nn.Module, max_length: int) -> float:
    """Position interpolation as ``fine-tune.py``: if ``max_length`` exceeds ``config.max_position_embeddings``,
    set linear RoPE scaling with ``factor = ceil(max_length / max_position_embeddings)`` on the loaded model (its
    rotary ``inv_freq`` buffers divided by the factor, ``config.rope_parameters`` updated). Returns the factor
    (1.0: nothing changed). ConfigError if the model already uses a non-default RoPE type."""
    config = model.config
    original = getattr(config, "max_position_embeddings", None)
    if not original or max_length <= original:
        return 1.0
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"LongLoRA's position interpolation needs default RoPE; {type(model).__name__} already "
                          f"uses rope_type={rope.get('rope_type')!r}. Train at max_length <= {original} or load the "
                          "base without RoPE scaling.")
    factor = float(math.ceil(max_length / original))
    rotaries = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not rotaries:
        raise ConfigError(f"LongLoRA found no rotary embedding (inv_freq buffer) in {type(model).__name__} to scale.")
    with torch.no_grad():
        for m in rotaries:
            m.inv_freq.div_(factor)
            if isinstance(getattr(m, "original_inv_freq", None), torch.Tensor):
                m.original_inv_freq.div_(factor)
            if hasattr(m, "rope_type"):
                m.rope_type = "linear"
    config.rope_parameters = {**rope, "rope_type": "linear", "factor": factor}
    return factor




def load_trainable_params(model: nn.Module, path: str | Path) -> list[str]:
    """Copy a run's ``trainable_params.safetensors`` (base tensors trained in full: LongLoRA's embeddings and norms,
    LISA's and GaLore's weights) into ``model`` and apply its RoPE scaling (LongLoRA's; none in the others). Returns the names loaded. ConfigError names a tensor the model lacks or whose shape differs."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / TRAINABLE_PARAMS_FILE
    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        factor = float((f.metadata() or {}).get("rope_scaling_factor", "1.0"))
    return _copy_base_params(model, tensors, path,
                             lambda: apply_rope_linear_scaling(model, int(factor * model.config.max_position_embeddings))
                             if factor > 1.0 else None)


def load_checkpoint_params(model: nn.Module, directory: str | Path) -> list[str]:
    """Copy the base tensors a training checkpoint (``checkpoint-<step>``) holds beside its adapter, as they were
    at its step, into ``model``: the trainable parameters its adapter file does not hold (``param.<name>`` of
    ``trainer_state.safetensors``; LongLoRA's embeddings and norms, LISA's blocks, GaLore's matrices), with
    LongLoRA's RoPE scaling for the run's ``max_length`` (its ``trainer_state.json``). Returns the names loaded
    (none for a run that trained its adapter alone). ConfigError as :func:`load_trainable_params`. The run folder's
    ``trainable_params.safetensors`` holds the tensors of the run's end, not of this step."""
    from ...io.files import read_json
    from ..checkpoint import STATE_JSON, STATE_TENSORS

    directory = Path(directory)
    tensors = {k[len("param."):]: v for k, v in load_tensors(directory / STATE_TENSORS).items()
               if k.startswith("param.")}
    config = read_json(directory / STATE_JSON).get("config") or {}
    longlora = config.get("procedure") == "longlora" and isinstance(config.get("max_length"), int)
    return _copy_base_params(model, {host_path(n): t for n, t in tensors.items()}, directory / STATE_TENSORS,
                             lambda: apply_rope_linear_scaling(model, config["max_length"]) if longlora else None)


def _copy_base_params(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, rescale) -> list[str]:
    """Check ``tensors`` (host names) against ``model``'s parameters (ConfigError naming the first missing or
    misshaped one, from ``path``), call ``rescale()`` (the RoPE scaling they were trained under), then copy them in.
    Returns their sorted names."""
    params = {host_path(n): p for n, p in model.named_parameters()}
    for name, tensor in tensors.items():
        if name not in params:
            raise ConfigError(f"{path} holds {name!r}, which {type(model).__name__} has no parameter of."
                              f"{did_you_mean(name, params)}")
        if params[name].shape != tensor.shape:
            raise ConfigError(f"{path}: {name!r} has shape {tuple(tensor.shape)}, the model's is "
                              f"{tuple(params[name].shape)}; load the base model the run trained.")
    if tensors:
        rescale()
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return sorted(tensors)


@dataclass
class LongLoraConfig(ProcedureConfig):
    """``group_size_ratio``: S²-Attn group size as a fraction of the training sequence length (official 1/4);
    ``trainable_params``: comma-separated name parts of base parameters trained in full (official "embed,norm";
    "" = LoRA only)."""

    group_size_ratio: float = 0.25
    trainable_params: str = "embed,norm"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "group_size_ratio", 0, 1, low_open=True)
        self.trainable_names()  # an empty item fails here

    def trainable_names(self) -> list[str]:
        """``trainable_params`` as a list (``""``: none); ConfigError for an empty item (``embed,,norm``)."""
        return comma_items(self.trainable_params, "", "name parts", field=f"{type(self).__name__}.trainable_params")


class LongLora(Procedure):
    config: LongLoraConfig

    def __init__(self, config: LongLoraConfig, train_config) -> None:
        super().__init__(config, train_config)
        self.previous_attn: str | None = None
        self.rope_factor = 1.0
        self.full_params: dict[str, nn.Parameter] = {}

    def param_groups(self, model: nn.Module, adapter_name: str, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        if not hasattr(model, "set_attn_implementation"):
            raise ConfigError(f"LongLoRA's S²-Attn needs a transformers model; got {type(model).__name__}.")
        extra = self._full_params(model, groups)  # checked before the model is changed
        AttentionInterface.register(ATTN_IMPLEMENTATION, s2_attention)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        self.previous_attn = model.config._attn_implementation
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        for m in model.modules():
            if hasattr(m, "config") and getattr(m.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
                _RATIOS[id(m.config)] = self.config.group_size_ratio
        self.rope_factor = apply_rope_linear_scaling(model, self.train_config.max_length)
        if self.rope_factor != 1.0:
            warnings.warn(f"LongLoRA: RoPE linear scaling factor {self.rope_factor:g} applied for max_length="
                          f"{self.train_config.max_length}; to use this adapter at that context, call "
                          f"lorakit.training.procedures.longlora.load_trainable_params(base, OUTPUT_DIR) on the "
                          f"base before loading it (it applies the scaling, saved with the run), or load the base "
                          f"with rope_parameters={{'rope_type': 'linear', 'factor': {self.rope_factor:g}}}.",
                          stacklevel=2)
        if not extra:
            return groups
        for p in extra:
            p.requires_grad_(True)
        return groups + [{"params": extra, "lr": self.train_config.lr, "weight_decay": self.train_config.weight_decay}]

    def _full_params(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[nn.Parameter]:
        """Base parameters named by ``trainable_params`` (adapter parameters and tied twins excluded)."""
        parts = self.config.trainable_names()
        if not parts:
            return []
        adapter_ids = {id(p) for _, layer in adapter_layers(model) for p in layer.adapters.parameters()}
        taken = {id(p) for g in groups for p in g["params"]} | adapter_ids
        out: list[nn.Parameter] = []
        for n, p in model.named_parameters():  # named_parameters yields a tied weight once
            if any(part in n for part in parts) and id(p) not in taken:
                out.append(p)
                self.full_params[host_path(n)] = p
        if not out:
            names = sorted({n.rsplit(".", 2)[-2] for n, _ in model.named_parameters() if "." in n})
            raise ConfigError(f"LongLoraConfig.trainable_params={self.config.trainable_params!r} matches no base "
                              f"parameter of {type(model).__name__}; module names include: {', '.join(names[:12])}.")
        return out

    def finish(self, model: nn.Module, adapter_name: str) -> None:
        if self.full_params and self.train_config.output_dir is not None:
            save_trained_base(model, list(self.full_params.values()), self.train_config,
                              metadata={"rope_scaling_factor": repr(self.rope_factor)})
        for m in model.modules():
            if hasattr(m, "config"):
                _RATIOS.pop(id(m.config), None)
        if self.previous_attn is not None:
            model.set_attn_implementation(self.previous_attn)
            self.previous_attn = None


register_procedure(
    "longlora", LongLora, config=LongLoraConfig,
    description="LongLoRA: shifted sparse attention (S²-Attn) while training, full attention at inference; "
                "embeddings and norms trained with the adapter; linear RoPE scaling past the model's context.",
    paper="Chen et al. 2024 (ICLR), arXiv:2309.12307",
)
