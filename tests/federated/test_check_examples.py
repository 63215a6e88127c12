"""Federated clients check their training data with the adapter config (AdapterConfig.check_examples) before any
training, as lorakit's loop does: the server's check_model before Flower starts, each client_round before it trains
(the DP path trains without lorakit's loop and never checked)."""

from __future__ import annotations

import pytest
import lorakit
from lorakit import register_method
from lorakit.core import registry
from lorakit.federated import base as federated_base
from lorakit.federated.base import unpack
from lorakit.federated.client import check_model, client_round
from lorakit.federated.fedit import FedIT
from lorakit.federated.server import ServerCore
from lorakit.methods.lora import build_lora


class SortOnlyLoraConfig(lorakit.LoraConfig):
    """LoRA that refuses training data with a task other than "sort" (a stand-in for a keyed method's check)."""

    def check_examples(self, examples) -> None:
        others = sorted({ex.task for ex in examples} - {"sort"})
        if others:
            raise lorakit.ConfigError(f"sort_only_lora trains on task 'sort' only, the data has {others}")


class SortOnlyFedIT(FedIT):
    name = "test_sort_only"
    method = "test_sort_only_lora"


@pytest.fixture
def sort_only():
    register_method("test_sort_only_lora", config=SortOnlyLoraConfig, build=build_lora,
                    description="LoRA refusing non-sort data", layer_kinds=("linear",))
    federated_base.STRATEGIES[SortOnlyFedIT.name] = SortOnlyFedIT
    try:
        yield
    finally:  # keep both out of the registry-driven test matrices
        registry._METHODS.pop("test_sort_only_lora", None)
        federated_base.STRATEGIES.pop(SortOnlyFedIT.name, None)


def test_check_model_refuses_a_clients_data_before_flower_starts(tiny_config, sort_only):
    config = tiny_config("test_sort_only", evaluate=False)  # data reverse,sort: every client holds reverse rows
    with pytest.raises(lorakit.ConfigError, match=r"client 0's training data: sort_only_lora .* \['reverse'\]"):
        check_model(config)
    check_model(tiny_config("test_sort_only", data="sort", evaluate=False))  # data it takes passes


def test_a_dp_client_refuses_its_data_before_training(tiny_config, sort_only):
    # before, the DP path (opacus, not lorakit's loop) trained on the refused data and returned an update
    config = tiny_config("test_sort_only", dp_noise_multiplier=1.0, evaluate=False)
    down = unpack(ServerCore(config).downlink_bytes())
    with pytest.raises(lorakit.ConfigError, match="client 0's training data"):
        client_round(config, 0, 1, down)
