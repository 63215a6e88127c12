"""Mix-LN: Post-LN in the first ⌊α·L⌋ decoder layers, Pre-LN in the rest, as a transformers model.

Li et al., "Mix-LN: Unleashing the Power of Deeper Layers by Combining Pre-LN and Post-LN", arXiv 2412.13795.
Followed: the official code, github.com/pixeli99/MixLN ``peft_pretraining/modeling_llama.py``,
``LlamaDecoderLayer`` with ``NORM_TYPE=post_pre`` and ``POST_NUM = ⌊α·L⌋`` (the scripts use 3 of 12 layers,
α = 0.25). Per layer ``l`` with hidden state ``h`` (B, T, d) and RMSNorm ``N``:

    l <  ⌊α·L⌋  (Post-LN):  h = N_attn(h + Attn(h));   h = N_ffn(h + MLP(h))
    l >= ⌊α·L⌋  (Pre-LN):   h = h + Attn(N_in(h));     h = h + MLP(N_attn(h))

and the final ``model.norm`` before the LM head in every layout: the official ``LlamaModel.forward`` applies
``self.norm`` unconditionally, also for pure Post-LN. A Post-LN layer holds the norms under the official names,
``post_attention_layernorm`` (after the attention residual) and ``post_feedforward_layernorm`` (after the MLP
residual), and has no ``input_layernorm``. α = 0 is exactly ``LlamaForCausalLM``; α = 1 is Post-LN throughout.

Importing ``lorakit`` registers model type ``"lorakit-mixln"`` with ``AutoConfig`` / ``AutoModelForCausalLM``,
so ``AutoModelForCausalLM.from_pretrained(folder)`` reloads a saved Mix-LN model (with lorakit imported).
"""

from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from lorakit.core.errors import FIELD, ConfigError

MODEL_TYPE = "lorakit-mixln"


def num_post_ln_layers(alpha: float, num_layers: int) -> int:
    """⌊α·L⌋, the number of leading Post-LN layers (a tiny tolerance so 0.3·10 is 3, not 2.999... -> 2)."""
    return math.floor(alpha * num_layers + 1e-9)


def check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"{FIELD} must be a number in [0, 1] (the share of leading Post-LN layers; "
                          f"0 is Pre-LN, 1 is Post-LN, the paper uses 0.25), got {alpha!r}.", field="mix_ln_alpha")
    return float(alpha)


@strict
class MixLNConfig(LlamaConfig):
    """``LlamaConfig`` plus ``mix_ln_alpha`` in [0, 1]; ``ConfigError`` (a ValueError) outside it."""

    model_type = MODEL_TYPE
    mix_ln_alpha: float = 0.25

    def __post_init__(self, **kwargs):
        self.mix_ln_alpha = check_alpha(self.mix_ln_alpha)
        super().__post_init__(**kwargs)

    @property
    def num_post_ln_layers(self) -> int:
        return num_post_ln_layers(self.mix_ln_alpha, self.num_hidden_layers)


class PostLNDecoderLayer(LlamaDecoderLayer):
    """A Llama block with the norms after the residual adds (official ``post_pre`` branch, layer < POST_NUM)."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.input_layernorm
        self.post_feedforward_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, use_cache: bool | None = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        attn, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                 position_ids=position_ids, cache=cache, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
        hidden_states = self.post_attention_layernorm(hidden_states + attn)  # (B, T, d)
        return self.post_feedforward_layernorm(hidden_states + self.mlp(hidden_states))


class MixLNForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose first ``config.num_post_ln_layers`` blocks are ``PostLNDecoderLayer``."""

    config_class = MixLNConfig

    def __init__(self, config: MixLNConfig):
        super().__init__(config)
        layers = self.model.layers
        for i in range(config.num_post_ln_layers):
            layers[i] = PostLNDecoderLayer(config, i)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PostLNDecoderLayer):  # its extra norm starts at gain 1 like every RMSNorm
            nn.init.ones_(module.post_feedforward_layernorm.weight)


def mixln_config(alpha: float, **llama_kwargs) -> MixLNConfig:
    """A ``MixLNConfig`` from ``LlamaConfig`` keyword arguments and α (``ConfigError`` when α is not in [0, 1])."""
    return MixLNConfig(mix_ln_alpha=check_alpha(alpha), **llama_kwargs)


def register() -> None:
    """Register the real classes under ``"lorakit-mixln"`` (replacing ``lorakit.model_types``' stand-in)."""
    AutoConfig.register(MODEL_TYPE, MixLNConfig, exist_ok=True)
    AutoModelForCausalLM.register(MixLNConfig, MixLNForCausalLM, exist_ok=True)


register()
