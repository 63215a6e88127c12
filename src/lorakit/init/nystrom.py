"""NLoRA's Nyström init as a registered init — "NLoRA: Nyström-Initiated Low-Rank Adaptation for Large
Language Models", Guo et al., arXiv:2502.14482.

``A = W[:r, :]``, ``N = W[:r, :r]``, ``B = W[:, :r]`` on any ``B N A`` delta (W as (out, in)). The formula, the
Nyström form (N = W[:r, :r], not its pseudo-inverse) and the choice not to correct the base all live with the
structure in ``lorakit/methods/nlora.py`` (``nystrom_init``, the official ``nlora_init``); this only makes them
reachable by name: ``--method slora --init nlora`` equals ``--method nlora``, and IntTune's init can be put on
LoRA-XS's frozen-factor structure (``--method lora_xs --init nlora``). Needs no data; the base is unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.inits import BaseEdit, register_init
from ..methods.nlora import nystrom_init
from ._common import check_factorisable
from .lora_sb import middle_style, middle_targets


def run_nystrom(model: nn.Module, adapter_name: str, batches: Any, spec: str) -> dict[str, BaseEdit]:
    targets = middle_targets(model, adapter_name, spec)
    weights = [(t, t.weight()) for t in targets]
    for t, w in weights:
        check_factorisable(t.path, w, spec, "base weight")
    for t, w in weights:
        nystrom_init(t.delta, w)
    return {}


register_init(
    "nlora", run=run_nystrom, fits=middle_style,
    description="Nyström init of a B·N·A adapter: A = W[:r,:], N = W[:r,:r], B = W[:,:r] (official; base unchanged).",
    paper="Guo et al. 2025, arXiv:2502.14482",
)
