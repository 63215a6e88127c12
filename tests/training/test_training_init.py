"""The init registry's life cycle for a data-driven init: pending after add_adapter, run by the training loop on
its first batches or at once with ``init_batches``, never re-run on a loaded adapter."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.core import inits
from lorakit.core.model import adapter_layers
from lorakit.training import TrainConfig, train


@pytest.fixture
def data_init():
    """A test-only data-driven init: every lora_B := mean input id / 1000 of the batches it gets."""
    seen: list[list] = []

    def run(model, name, batches, spec):
        seen.append(batches)
        value = float(torch.cat([b["input_ids"].flatten() for b in batches]).float().mean()) / 1000
        for _, layer in adapter_layers(model):
            layer.adapters[name].lora_B.weight.fill_(value)
        return {}

    inits.register_init("test_data", run=run, needs_data=True, description="test only")
    try:
        yield seen
    finally:
        inits._INITS.pop("test_data", None)


def test_pending_until_the_loop_runs_it(data_init, make_model, tokenizer, reverse_train, tmp_path):
    model = make_model(init_lora_weights="test_data")
    assert not data_init and inits.init_pending(model, "default")
    config = TrainConfig(steps=1, batch_size=2, init_batches=3, output_dir=str(tmp_path / "run"))
    train(model, tokenizer, reverse_train, config, progress=False)
    assert len(data_init) == 1 and len(data_init[0]) == 3  # TrainConfig.init_batches batches
    assert not inits.init_pending(model, "default")
    loaded = lk.load_adapter(lk.unload(make_model()), tmp_path / "run" / "adapter", is_trainable=True)
    assert not inits.init_pending(loaded, "default") and len(data_init) == 1  # the file holds its result


def test_add_adapter_runs_it_with_init_batches(data_init, ids):
    from lk_models import tiny_llama

    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]), init="test_data",
                           init_batches=[{"input_ids": ids}])
    assert len(data_init) == 1
    expected = float(ids.float().mean()) / 1000
    for _, layer in adapter_layers(model):
        assert torch.allclose(layer.adapters["default"].lora_B.weight, torch.full_like(
            layer.adapters["default"].lora_B.weight, expected))
    with pytest.raises(lk.AdapterError, match="data-driven"):
        lk.init_adapter(model, "default")


def test_zero_init_batches_for_a_data_driven_init_names_the_setting(data_init, make_model, tokenizer, reverse_train):
    """Was: "init 'test_data' is data-driven: pass batches (...), or let lorakit.training.train run it" — from
    lorakit.training.train itself, which had run it with TrainConfig.init_batches=0 batches."""
    from lorakit.training import Job, train_concurrent

    config = TrainConfig(steps=1, batch_size=2, init_batches=0)
    for run in (lambda m: train(m, tokenizer, reverse_train, config, progress=False),
                lambda m: train_concurrent(m, tokenizer, [Job("default", reverse_train, config)], progress=False)):
        model = make_model(init_lora_weights="test_data")
        with pytest.raises(lk.ConfigError, match="init_batches is 0.*'test_data' is data-driven"):
            run(model)
        assert not data_init
