"""Composition: offline operations on saved adapters — merges (linear, cat, svd, task arithmetic, TIES, DARE,
magnitude prune, DELLA, breadcrumbs, SCE, LoRA-LEGO), collapsing mixtures of experts into one LoRA, and
generating adapters (ICM-LoRA)."""

from . import lego  # noqa: F401  (registers the "lego" merge method)
from .collapse import collapse_experts
from .icm_lora_generator import IcmLoraConfig, IcmLoraGenerator, generate_adapter, train_icm_lora
from .merge import MergedAdapter, merge_adapters, merge_adapters_to
from .methods import METHODS, MergeMethod, MergeOptions, get_merge_method, list_merge_methods, register_merge_method

__all__ = ["collapse_experts", "IcmLoraConfig", "IcmLoraGenerator", "generate_adapter", "train_icm_lora",
           "MergedAdapter", "merge_adapters", "merge_adapters_to", "METHODS", "MergeMethod", "MergeOptions", "get_merge_method", "list_merge_methods", "register_merge_method"]
