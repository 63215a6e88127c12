"""The loop re-reads what trains (``refresh_trainable``, and DDP's rewrap) only after a step hook that may have
changed it: a hook returns True when it changed which parameters train (LaMDA freezing the whole of B, LISA redrawing
its blocks), False when not (DyLoRA's rank draw, SoRA's proximal step, a procedure without a step hook); None (a
hook that does not say) counts as a change. Training is the same as re-reading after every hook, bit for bit; a
change of what trains still takes effect."""

from __future__ import annotations

import pytest
import torch

import lorakit
import lorakit.training.loop as loop
from lorakit.core.model import adapter_layers, refresh_trainable
from lorakit.methods.dylora import DyLoraConfig
from lorakit.methods.increlora import IncreLoraConfig
from lorakit.methods.lamda import LamdaConfig
from lorakit.methods.sora import SoraConfig
from lorakit.training.concurrent import Job, train_concurrent
from lorakit.training.config import TrainConfig

TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]
CASES = {  # method config (None: plain LoRA), procedure settings, refreshes expected in 4 steps
    "lamda": (lambda: LamdaConfig(r=4, freeze_ratio=0.5, target_modules=TARGETS), {}, 1),  # whole B at step 2
    "dylora": (lambda: DyLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), {}, 0),
    "sora": (lambda: SoraConfig(r=4, sparse_lambda_2=0.05, max_lambda=0.3, lambda_num=3, lambda_schedule="linear",
                                target_modules=TARGETS), {}, 0),
    "increlora": (lambda: IncreLoraConfig(r=1, target_rank=3, init_warmup=1, incre_interval=2, top_h=3,
                                          target_modules=TARGETS), {}, 0),
    "lisa": (lambda: None, {"procedure": "lisa", "procedure_args": {"lisa_activated_layers": 1,
                                                                    "lisa_interval_steps": 2}}, 2),  # steps 2, 4
    "loraplus": (lambda: None, {"procedure": "loraplus"}, 0),  # no step hook of its own
    "ggpo": (lambda: None, {"procedure": "ggpo"}, 0),
}


def _train(case, make_model, tokenizer, data, monkeypatch, every_step: bool):
    """(model, losses, refreshes) of 4 steps; ``every_step``: re-read after every hook, as before the flag."""
    config, procedure, _ = CASES[case]
    calls = []

    def counted(model):
        calls.append(1)
        refresh_trainable(model)

    monkeypatch.setattr(loop, "refresh_trainable", counted)
    if every_step:
        hooks = loop.step_hooks
        monkeypatch.setattr(loop, "step_hooks", lambda *a: hooks(*a) or True)
    model = make_model(config())
    train_config = TrainConfig(steps=4, batch_size=4, lr=1e-2, seed=1, log_every=1, **procedure)
    result = loop.train(model, tokenizer, data, train_config, progress=False)
    return model, result.losses, len(calls)


@pytest.mark.parametrize("case", list(CASES))
def test_refresh_only_after_a_change_and_training_is_unchanged(case, make_model, tokenizer, reverse_train,
                                                               monkeypatch):
    model, losses, refreshes = _train(case, make_model, tokenizer, reverse_train, monkeypatch, every_step=False)
    assert refreshes == CASES[case][2]
    reference, reference_losses, _ = _train(case, make_model, tokenizer, reverse_train, monkeypatch, every_step=True)
    assert losses == reference_losses
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q) and p.requires_grad == q.requires_grad, name


def test_a_hook_that_freezes_still_takes_effect(make_model, tokenizer, reverse_train):
    """LaMDA's freeze_ratio 0.5 of 4 steps: B is whole-frozen after step 2 (requires_grad off) and stays put."""
    model = make_model(LamdaConfig(r=4, freeze_ratio=0.5, target_modules=TARGETS))
    kept = {}

    def snapshot(record):
        if record.get("step") == 2:
            kept.update({p: d.lora_B.weight.detach().clone() for p, l in adapter_layers(model)
                         for d in [l.adapters["default"]]})

    loop.train(model, tokenizer, reverse_train, TrainConfig(steps=4, batch_size=4, lr=1e-2, log_every=1),
               progress=False, on_log=[snapshot])
    assert kept
    for path, layer in adapter_layers(model):
        delta = layer.adapters["default"]
        assert not delta.lora_B.weight.requires_grad and delta.sigma.weight.requires_grad, path
        assert torch.equal(delta.lora_B.weight, kept[path]), path


def test_train_concurrent_refreshes_only_after_a_change(make_model, tokenizer, reverse_train, monkeypatch):
    import lorakit.training.concurrent as concurrent

    calls = []
    monkeypatch.setattr(concurrent, "refresh_trainable", lambda model: calls.append(refresh_trainable(model)))
    model = make_model(DyLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    lorakit.add_adapter(model, LamdaConfig(r=4, freeze_ratio=0.5, target_modules=TARGETS), name="second")
    config = TrainConfig(steps=4, batch_size=4, lr=1e-2, log_every=1)
    train_concurrent(model, tokenizer, [Job("default", reverse_train, config), Job("second", reverse_train, config)],
                     progress=False)
    assert len(calls) == 1  # LaMDA's whole-B freeze at step 2; DyLoRA's rank draws change nothing that trains
    for _, layer in adapter_layers(model):
        assert not layer.adapters["second"].lora_B.weight.requires_grad


def test_a_hook_that_does_not_say_still_refreshes_every_step(hooked_method, make_model, tokenizer, reverse_train,
                                                             monkeypatch):
    """A hook written before the flag returns None: the loop re-reads what trains after it, as it always did."""
    calls = []
    monkeypatch.setattr(loop, "refresh_trainable", lambda model: calls.append(refresh_trainable(model)))
    model = make_model(hooked_method.config(r=4, lora_alpha=8, target_modules=TARGETS))
    loop.train(model, tokenizer, reverse_train, TrainConfig(steps=3, batch_size=4, lr=1e-2), progress=False)
    assert len(hooked_method.calls["on_step"]) == 3 and len(calls) == 3
