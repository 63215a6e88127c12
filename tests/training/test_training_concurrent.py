"""Concurrent training of several adapters on one base equals training each alone."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.data import load_examples
from lorakit.training import Job, TrainConfig, train, train_concurrent

TARGETS = ["q_proj", "v_proj", "lm_head"]


def _config(**kw):
    return TrainConfig(steps=kw.pop("steps", 5), batch_size=kw.pop("batch_size", 4), lr=5e-3, seed=kw.pop("seed", 0),
                       max_length=64, **kw)


def test_concurrent_equals_separate(make_model, tokenizer, tmp_path):
    data = {"rev": load_examples("reverse", "train", n=24, seed=0), "add": load_examples("add", "train", n=24, seed=0)}
    configs = {"rev": _config(), "add": _config(steps=3, batch_size=2, seed=1, lr_schedule="cosine")}
    model = make_model()
    lorakit.delete_adapter(model, "default")
    for name in data:
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), name=name)
        lorakit.save_adapter(model, tmp_path / "init" / name, name)
    out = train_concurrent(model, tokenizer, [Job(n, data[n], configs[n]) for n in data],
                           output_dir=str(tmp_path / "out"), progress=False)
    assert len(out["jobs"]["rev"].losses) == 5 and len(out["jobs"]["add"].losses) == 3
    assert out["jobs"]["rev"].losses[-1] < out["jobs"]["rev"].losses[0]

    for name in data:  # the same adapter, same initial weights, trained alone
        alone = make_model()
        lorakit.delete_adapter(alone, "default")
        lorakit.load_adapter(alone, tmp_path / "init" / name, name=name, is_trainable=True)
        result = train(alone, tokenizer, data[name], configs[name], adapter_name=name, progress=False)
        torch.testing.assert_close(result.losses, out["jobs"][name].losses, atol=1e-5, rtol=1e-4)
        ours = lorakit.adapter_state_dict(model, name)
        for k, v in lorakit.adapter_state_dict(alone, name).items():
            torch.testing.assert_close(ours[k], v, atol=1e-5, rtol=1e-4)
        saved = lorakit.load_adapter(make_model(), tmp_path / "out" / name, name=name)
        for k, v in lorakit.adapter_state_dict(saved, name).items():
            assert torch.equal(v, ours[k])


def test_concurrent_rejects_unknown_and_duplicate_jobs(make_model, tokenizer):
    model = make_model()
    data = load_examples("reverse", "train", n=4, seed=0)
    with pytest.raises(lorakit.AdapterError, match="no adapter 'nope'"):
        train_concurrent(model, tokenizer, [Job("nope", data, _config())], progress=False)
    with pytest.raises(ValueError, match="its own adapter"):
        train_concurrent(model, tokenizer, [Job("default", data, _config()), Job("default", data, _config())])


def test_concurrent_restores_active_adapters_and_mode(make_model, tokenizer):
    """Issue 10: train_concurrent leaves the active adapters and train/eval mode as it found them."""
    data = load_examples("reverse", "train", n=8, seed=0)
    model = make_model().eval()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=TARGETS), name="other")
    assert lorakit.active_adapters(model) == ["default"]
    train_concurrent(model, tokenizer, [Job("default", data, _config(steps=1)), Job("other", data, _config(steps=1))],
                     progress=False)
    assert lorakit.active_adapters(model) == ["default"] and not model.training
