"""Federated LoRA on Flower: FedIT, FFA-LoRA, FLoRA and LoRA-FAIR strategies, non-IID splits, DP-SGD (Opacus).

Flower-free parts (strategies, wire format, client round, server core) import without ``flwr``; the Flower apps
live in ``lorakit.federated.apps`` and the simulation runner in ``lorakit.federated.simulate`` (extra
``lorakit[federated]``). docs/federated.md describes the CLI (``lorakit federate``) and the deployment engine.
"""

from .base import FederatedConfig, LoraStrategy, check_update, get_strategy, list_strategies, pack, unpack
from . import fedit, ffa, flora, lora_fair  # noqa: F401,I001  (register the strategies)
from .partition import partition

__all__ = ["FederatedConfig", "LoraStrategy", "check_update", "get_strategy", "list_strategies", "pack", "unpack",
           "partition"]
