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


def test_more_init_batches_than_the_data_fills_warns_and_uses_what_there_is(data_init, make_model, tokenizer,
                                                                            reverse_train):
    """Was: init_batches=50 on 8 examples (4 batches of 2) ran silently on 50 batches cycling the same 8 examples.
    Contract (TrainConfig: "how many batches a data-driven init gets"): the data fills ceil(8 / 2) = 4 batches, so
    the init gets those 4, and the warning names 50 and 4; train_concurrent does the same per job."""
    from lorakit.training import Job, train_concurrent

    data = reverse_train[:8]
    config = TrainConfig(steps=1, batch_size=2, init_batches=50)
    for run in (lambda m: train(m, tokenizer, data, config, progress=False),
                lambda m: train_concurrent(m, tokenizer, [Job("default", data, config)], progress=False)):
        data_init.clear()
        with pytest.warns(UserWarning, match=r"init_batches \(--init-batches\) = 50, but the training data \(8 "
                                             r"examples, batch_size 2\) fills only 4 batches"):
            run(make_model(init_lora_weights="test_data"))
        assert len(data_init) == 1 and len(data_init[0]) == 4
        seen = sorted(tuple(row.tolist()) for b in data_init[0] for row in b["input_ids"])
        assert len(set(seen)) == 8  # each example once, none repeated to fill the count


def _callback_train_begin(model, tokenizer, examples, tmp_path, init_batches: int) -> None:
    """LorakitCallback(init_batches=...).on_train_begin on a loader of ``examples`` in batches of 2, as Trainer
    calls it; the callback's forward wrapper is taken off again afterwards."""
    from torch.utils.data import DataLoader
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from lorakit.data import CausalLMCollator, TokenizedDataset
    from lorakit.training import LorakitCallback

    loader = DataLoader(TokenizedDataset(examples, tokenizer), batch_size=2,
                        collate_fn=CausalLMCollator.from_tokenizer(tokenizer))
    callback = LorakitCallback("default", init_batches=init_batches)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    try:
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model, train_dataloader=loader)
    finally:
        callback._restore_forward()


def test_the_trainer_callback_warns_when_the_loader_has_fewer_init_batches(hooked_method, make_model, tokenizer,
                                                                           reverse_train, tmp_path):
    """LorakitCallback(init_batches=5) on a loader of 2 batches: the method's init runs on the 2 there are, and a
    warning names 5 and 2 (was: silence)."""
    model = make_model(hooked_method.config(r=4, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match=r"init_batches=5\): the training data loader gave only 2 batches"):
        _callback_train_begin(model, tokenizer, reverse_train[:4], tmp_path, init_batches=5)
    [batches] = hooked_method.calls["init"]
    assert len(batches) == 2


def test_the_trainer_callback_with_zero_init_batches_gives_a_method_init_none(hooked_method, make_model, tokenizer,
                                                                             reverse_train, tmp_path):
    """LorakitCallback(init_batches=0) and a method's own init: the init gets no batch, as lorakit's loop gives it
    with TrainConfig.init_batches=0 (was: the callback's count check came after the first append, so it collected
    the whole data loader)."""
    model = make_model(hooked_method.config(r=4, target_modules=["q_proj"]))
    _callback_train_begin(model, tokenizer, reverse_train[:8], tmp_path, init_batches=0)
    assert hooked_method.calls["init"] == [[]]
