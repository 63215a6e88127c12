"""LoftQ — "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", Li et al., arXiv:2310.08659.

Quantize the base so that the quantized weight plus the LoRA start approximates the full-precision weight
(paper eq. 6), by alternating T times (Algorithm 1, eq. 7-8), starting from ``A_0 B_0ᵀ = 0``:

    Q_t = q_N(W − s·B_{t−1} A_{t−1}),      (B_t, A_t) = rank-r SVD of (W − Q_t):
    W − Q_t ≈ U_r S_r V_rᵀ,  B_t = U_r √(S_r / s) (out, r),  A_t = √(S_r / s) V_rᵀ (r, in),

then the base weight becomes ``Q_T`` and the adapter ``s·B_T A_T``, so ``Q_T + s·B_T A_T ≈ W`` better than plain
quantization: ``‖W − Q_T − s·B_T A_T‖_F ≤ ‖W − Q_T‖_F`` (the SVD removes the r largest error directions) and,
for T = 1, ``Q_1 = q_N(W)`` is plain quantization.

``q_N``: bitsandbytes, as PEFT (peft/utils/loftq_utils.py ``loftq_init``): NF4 in blocks of 64 without double
quantization (``loftq_bits=4``) or int8 with one absmax per row (``loftq_bits=8``); see
``lorakit.quantize.nf4.quantize_dequantize``. Settings: PEFT's ``LoftQConfig`` names and defaults
(``loftq_bits=4``, ``loftq_iter=1``) in ``LoraConfig.loftq_config``, or as init options.

Where this follows the paper rather than PEFT 0.21.2: the square roots take ``S / s`` (as PEFT's PiSSA does);
PEFT's LoftQ leaves the scaling out (``lora_A, lora_B = R, L``, loftq_utils.py:98), so its ``Q + s·B A`` is
``≈ W`` only when ``s = lora_alpha / r = 1``. At ``s = 1`` both give the same A, B and base. The weight is
quantized and factorised as (out, in) on every layer (GPT-2's Conv1D stores (in, out), which PEFT factors as
stored and gets mis-shaped factors). DoRA's magnitude is set to ``‖Q + s·B A‖`` per row afterwards, as PEFT's
DoRA variant does after the init. Only linear layers: PEFT 0.21.2's embedding / convolution LoftQ paths fail
(they call ``loftq_init`` without its config), so adapters with such layers are refused.

Saving and loading: the saved config carries ``loftq_config``; loading redoes LoftQ on the original base (quantization
draws no random numbers, so the base is the one the adapter was trained on) before the trained A, B are copied in,
as PEFT's ``from_pretrained`` does (``update_layer`` runs ``loftq_init``, then the state dict is loaded). The
replaced weights are recorded whole (``core.inits.BaseSwap``: one copy of each adapted weight), so
``restore_base`` / ``delete_adapter`` / ``unload`` put them back bit for bit.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import nn

from ..core.delta import oriented_weight
from ..core.errors import AdapterError, ConfigError
from ..core.inits import BaseSwap, register_init
from ..core.model import adapter_layers, adapter_state
from ..quantize.nf4 import quantize_dequantize
from ._common import check_factorisable, check_rank_fits, lora_style, method_layers, writable_units


def loftq_factors(weight: torch.Tensor, r: int, scaling: float, bits: int, steps: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q (out, in), A (r, in), B (out, r))``, float32, of LoftQ's ``steps`` alternations on ``weight`` (out, in)
    float32 (module docstring); ``Q + scaling·B A ≈ weight``."""
    target = weight
    for step in range(steps):
        Q = quantize_dequantize(target, bits)
        U, S, Vh = torch.linalg.svd(weight - Q, full_matrices=False)  # (out, k), (k,), (k, in)
        root = torch.sqrt(S[:r] / scaling)  # (r,)
        B, A = U[:, :r] * root[None, :], root[:, None] * Vh[:r]
        if step + 1 < steps:
            target = weight - scaling * (B @ A)  # = W − U_r S_r V_rᵀ
    return Q, A, B


def configure_loftq(config: Any, options: Mapping[str, Any]) -> Any:
    """``config`` (a LoRA config with init "loftq") with the init options ``loftq_bits`` / ``loftq_iter`` (None: not
    given) written into its ``loftq_config``. ConfigError for a value PEFT refuses, worded as the init options the
    user gave (``init_options['loftq_bits']=2: ...``; a command line says ``--init-options``), not as the config
    field they did not type."""
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return replace(config, loftq_config={**config.loftq_config, **given})
    except ConfigError as e:
        if not given or e.field is None:
            raise
        raise ConfigError(e.args[0], field="init_options") from None


def run_loftq(model: nn.Module, adapter_name: str, batches: Any, spec: str, *, loftq_bits: int | None = None,
              loftq_iter: int | None = None) -> dict[str, BaseSwap]:
    """LoftQ on every linear layer of ``adapter_name``: base weight <- Q, adapter <- (A, B); returns the swaps.

    ``loftq_bits`` / ``loftq_iter`` override the adapter config's ``loftq_config`` and are written into it (the
    saved file says how the base was quantized). Raises ConfigError for settings PEFT refuses, AdapterError for an
    adapter on an embedding or convolution layer, a delta without B A factors, r > min(out, in), or a weight with
    NaN/inf; all checked before any module is written (the model is then unchanged). A failure while writing (out of
    memory in a later module's SVD) puts back what was written, base weights and adapter tensors."""
    state = adapter_state(model)
    config = configure_loftq(state.configs[adapter_name], {"loftq_bits": loftq_bits, "loftq_iter": loftq_iter})
    targets = []
    for path, layer, delta in method_layers(model, adapter_name):
        if layer.info.kind != "linear":
            kind = {"embedding": "an embedding", "conv": "a convolution"}.get(layer.info.kind, f"a {layer.info.kind}")
            raise AdapterError(f"init {spec!r}: module {path!r} is {kind} layer; LoftQ quantizes linear "
                               "weights only (PEFT's embedding / convolution LoftQ fails). Leave it out of "
                               "target_modules (exclude_modules) or use another init (model left unchanged).")
        units = writable_units(delta, path, spec)
        weight = oriented_weight(layer.base_layer, layer.info)
        check_factorisable(path, weight, spec, "base weight")
        check_rank_fits(path, units.A.shape[0], weight.shape, spec)
        targets.append((path, layer, units))
    if not targets:
        raise AdapterError(f"init {spec!r}: adapter {adapter_name!r} has no linear layers to initialise.")
    bits, steps = config.loftq_config["loftq_bits"], config.loftq_config["loftq_iter"]
    swaps: dict[str, BaseSwap] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}  # the adapter's tensors before they were written, by path
    try:
        for path, layer, units in targets:  # one module at a time: its Q, U, S, V are freed before the next
            base = layer.base_layer
            Q, A, B = loftq_factors(oriented_weight(base, layer.info).float(), units.A.shape[0], units.scaling,
                                    bits, steps)
            factors[path] = {k: v.detach().clone() for k, v in layer.adapters[adapter_name].state_dict().items()}
            swaps[path] = BaseSwap(original=base.weight.detach().clone())
            units.A.copy_(A)
            units.B.copy_(B)
            base.weight.copy_(Q.T if layer.info.fan_in_fan_out else Q)  # rounded to the base's dtype, as PEFT
            delta = layer.adapters[adapter_name]
            if hasattr(delta, "lora_magnitude_vector"):  # DoRA: m = ‖Q + s·B A‖ per output row
                delta.lora_magnitude_vector.copy_(delta._weight_norm(oriented_weight(base, layer.info).float(),
                                                                     delta.delta_weight()))
    except BaseException:  # e.g. out of memory in a later module's SVD: the modules done so far go back, base and
        # adapter (was: the bases only, so an adapter initialised again lost its trained factors there)
        layers = dict(adapter_layers(model))
        for path, swap in swaps.items():
            swap.undo(layers[path])
            layers[path].adapters[adapter_name].load_state_dict(factors[path])
        raise
    state.configs[adapter_name] = config
    return swaps


register_init(
    "loftq", run=run_loftq, changes_base=True, rerun_on_load=True, base_low_rank=False, fits=lora_style,
    configure=configure_loftq,
    description="Base = its NF4 / int8 quantization Q, adapter = rank-r SVD of W − Q, alternated loftq_iter times "
                "(Q + s·BA ≈ W).",
    paper="Li et al. 2023, arXiv:2310.08659",
)
