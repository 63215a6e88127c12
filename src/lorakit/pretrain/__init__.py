"""Build the small pretrained base model that lorakit bundles (``lorakit pretrain-base``)."""

from lorakit.pretrain.corpus import CorpusConfig, build_corpus
from lorakit.pretrain.mixln import MixLNConfig, MixLNForCausalLM
from lorakit.pretrain.tokenizer import train_tokenizer
from lorakit.pretrain.train import (
    BASE_MODEL_DIR,
    OBJECTIVES,
    PretrainConfig,
    main,
    pretrain_base,
    register_objective,
)
from lorakit.pretrain.ul2 import UL2Config, UL2Objective  # registers the "ul2" objective

__all__ = [
    "BASE_MODEL_DIR", "OBJECTIVES", "CorpusConfig", "MixLNConfig", "MixLNForCausalLM", "UL2Config",
    "UL2Objective", "PretrainConfig", "build_corpus", "main",
    "pretrain_base", "register_objective", "train_tokenizer",
]
