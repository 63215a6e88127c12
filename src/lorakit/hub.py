"""Loading base models and tokenizers: the bundled model by default, any local HF folder or cached hub id."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .assets import BASE_MODEL_PATH
from .core.errors import LorakitError

BUNDLED = "bundled"


def resolve_model_path(model: str | os.PathLike | None) -> str:
    if model in (None, "", BUNDLED):
        if not (BASE_MODEL_PATH / "config.json").is_file():
            raise LorakitError(
                f"the bundled base model is missing at {BASE_MODEL_PATH}; rebuild it with `lorakit pretrain-base`."
            )
        return str(BASE_MODEL_PATH)
    return str(model)


def load_model_and_tokenizer(model: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu"):
    """(model, tokenizer) for a causal LM: ``None``/``"bundled"``, a local folder, or a hub id already cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        hint = "" if Path(path).exists() else " (not a local folder; hub ids must already be in the local cache)"
        raise LorakitError(f"cannot load model {path!r}{hint}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.to(device).eval(), tokenizer
