"""Quantization: a 4-bit base for QLoRA, and post-training weight quantization of a model's blocks.

- QLoRA's base (``nf4.py``, bitsandbytes): ``quantize_model(model, "nf4")`` swaps the linear layers for 4-bit
  NF4/FP4 layers (real 4-bit storage, double quantization, a compute dtype) for LoRA training on top;
  ``dequantize_model`` turns them back into full-precision layers (for merging). See docs/smaller-bases.md.
- Post-training quantization (``uniform.py``, ``cbq.py``, ``model.py``): ``quantize_weights(model, "cbq",
  calib_ids, bits=4)`` rewrites every linear weight of every block in place with its quantized value (simulated
  quantization, as the papers evaluate it): round-to-nearest or CBQ (arXiv:2312.07950); ``perplexity`` scores
  the result. See docs/quantization.md.

Importing this package registers the 4-bit dequantizer with the core without importing bitsandbytes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..core.errors import ConfigError, did_you_mean
from .cbq import CBQConfig, LoraRounding, cfp_threshold, quantize_cbq, reconstruction_error, rectified_sigmoid
from .model import check_group_size, decoder_blocks, next_token_kl, perplexity, quantize_rtn, task_token_rows
from .nf4 import (COMPUTE_DTYPES, QUANT_TYPES, QuantizeConfig, dequantize_model, dequantize_weight, is_4bit,
                  keep_qlora_layout, quantize_model, quantized_bytes)
from .uniform import QuantSpec, dequantize, minmax_params, rtn, rtn_codes

QUANTIZERS = ("rtn", "cbq")


def quantize_weights(model: nn.Module, method: str, calib_ids: torch.Tensor | None = None, *, bits: int = 4,
                   group_size: int | None = None, progress: Callable[[str], None] | None = None,
                   **options: Any) -> dict[str, Any]:
    """Quantize ``model``'s block weights in place with ``method`` ("rtn" or "cbq"); returns a summary dict.

    ``calib_ids`` (N, T) token rows are needed by "cbq"; ``options`` are further :class:`CBQConfig` fields.
    Raises ConfigError for an unknown method, missing calibration data or options RTN does not take.
    """
    if method not in QUANTIZERS:
        raise ConfigError(f"unknown quantization method {method!r}.{did_you_mean(method, QUANTIZERS)} "
                          f"Choose one of {', '.join(QUANTIZERS)}.")
    if method == "rtn":
        if options:
            raise ConfigError(f"round-to-nearest takes only bits and group_size, not {sorted(options)}.")
        return quantize_rtn(model, QuantSpec(bits, group_size))
    fields = set(CBQConfig.__dataclass_fields__) - {"bits", "group_size"}
    for key in options:
        if key not in fields:
            raise ConfigError(f"unknown cbq option {key!r}.{did_you_mean(key, fields)} Options: {', '.join(sorted(fields))}.")
    if calib_ids is None:
        raise ConfigError("cbq needs calibration token rows (calib_ids, shape (N, T)).")
    return quantize_cbq(model, calib_ids, CBQConfig(bits=bits, group_size=group_size, **options), progress)


__all__ = ["QUANTIZERS", "quantize_weights", "COMPUTE_DTYPES", "QUANT_TYPES", "QuantizeConfig", "quantize_model",
           "dequantize_model", "dequantize_weight", "is_4bit", "keep_qlora_layout", "quantized_bytes", "CBQConfig", "LoraRounding", "cfp_threshold", "quantize_cbq",
           "reconstruction_error", "rectified_sigmoid", "check_group_size", "decoder_blocks", "next_token_kl", "perplexity", "quantize_rtn",
           "task_token_rows", "QuantSpec", "dequantize", "minmax_params", "rtn", "rtn_codes"]
