"""Feed-forward blocks as an adaptable layer kind ("ffn"), for FFN-level mixtures (MixLoRA, MoLE).

An FFN is recognised by its projections, not its class: gated (``gate_proj``/``up_proj``/``down_proj`` +
``act_fn``: Llama, Mistral, Qwen2, Gemma, Phi-3-style) and plain (``c_fc``/``c_proj`` + ``act``: GPT-2).
Mixture code calls the host's own projection modules, so host classes stay untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.delta import Conv1D, LayerInfo, describe_layer, register_layer_kind
from ..core.layer import AdapterLayer


@dataclass(frozen=True)
class FFNSpec:
    up: str
    down: str
    act: str
    gate: str | None = None  # gated (SwiGLU-style) FFNs: act(gate(x)) * up(x)
    dropout: str | None = None  # applied after the down projection (GPT-2)


FFN_SPECS = (
    FFNSpec(up="up_proj", down="down_proj", gate="gate_proj", act="act_fn"),
    FFNSpec(up="c_fc", down="c_proj", act="act", dropout="dropout"),
)


def _base(m):
    return m.base_layer if isinstance(m, AdapterLayer) else m


def ffn_spec(module: nn.Module) -> FFNSpec | None:
    linear = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)
    for spec in FFN_SPECS:
        names = [spec.up, spec.down] + ([spec.gate] if spec.gate else [])
        if all(isinstance(_base(getattr(module, n, None)), linear) for n in names) and callable(getattr(module, spec.act, None)):
            return spec
    return None


def describe_ffn(module: nn.Module) -> LayerInfo | None:
    spec = ffn_spec(module)
    if spec is None:
        return None
    up = describe_layer(_base(getattr(module, spec.up)))
    down = describe_layer(_base(getattr(module, spec.down)))
    return LayerInfo("ffn", up.in_features, down.out_features, False)


def ffn_dims(module: nn.Module) -> tuple[int, int]:
    """(hidden, intermediate) of an FFN."""
    spec = ffn_spec(module)
    up = describe_layer(_base(getattr(module, spec.up)))
    return up.in_features, up.out_features


register_layer_kind(describe_ffn)
