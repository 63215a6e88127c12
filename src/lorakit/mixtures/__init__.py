"""Mixtures of LoRA experts: routers, batched expert kernels, the FFN layer kind, statistics and traces."""

from .base import MixtureDelta, record_routing, reset_router_stats, router_stats, router_summary
from .experts import Dispatch, expand_to_ranks, expert_lora, rank_block_delta
from .ffn import FFN_SPECS, FFNSpec, ffn_dims, ffn_spec
from .router import BALANCE_LOSSES, STRATEGIES, Router, RouterOutput, load_balance_loss, z_loss

__all__ = ["MixtureDelta", "record_routing", "reset_router_stats", "router_stats", "router_summary", "Dispatch", "expand_to_ranks",
           "expert_lora", "rank_block_delta", "FFN_SPECS", "FFNSpec", "ffn_dims", "ffn_spec", "BALANCE_LOSSES",
           "STRATEGIES", "Router", "RouterOutput", "load_balance_loss", "z_loss"]
