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


def test_concurrent_gamma_mod_keeps_the_answer_tokens(make_model, tokenizer, reverse_train):
    """γ-MoD through train_concurrent gets what lorakit.train gives it: its ARank init on the job's first batches
    (mod_layers=None: ARank among the blocks the bounds allow, block 0 of this 2-block model with
    dense_first_layers=0, dense_last_layers=1), and the supervised mask in the routing context, so every answer
    token goes through the MoD block (official masked routing, ``topk(r + mask)``, Gamma-MOD
    ``llava_llama_mod.py`` l. 143-153) while a share of the prompt tokens skips it."""
    from lorakit.core.model import adapter_state
    from lorakit.core.routing import SUPERVISED_KEY, current_routing
    from lorakit.data.collate import encode_completion
    from lorakit.methods.gamma_mod import GammaModConfig
    from lorakit.mixtures import record_routing

    config = GammaModConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], dense_first_layers=0,
                            dense_last_layers=1, capacity_factor=0.25)
    model = make_model(config)
    seen = []  # (input_ids, attention_mask, supervised mask) of each forward inside a routing context
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["input_ids"], kw["attention_mask"], (
        current_routing().extras.get(SUPERVISED_KEY)))) if current_routing() is not None else None, with_kwargs=True)
    data = reverse_train[:16]
    with record_routing(model, "default") as traces:
        out = train_concurrent(model, tokenizer, [Job("default", data, _config(steps=3))], progress=False)
    assert len(out["jobs"]["default"].losses) == 3
    assert adapter_state(model).configs["default"].mod_layers == [0]  # the init ran
    (trace,) = [t for t in traces.values() if t]  # block 0's router decisions, one entry per training forward
    assert len(seen) == len(trace) == 3
    completions = {tuple(encode_completion(tokenizer, ex.completion)) for ex in data}
    skipped = 0
    for (ids, mask, supervised), entry in zip(seen, trace):
        assert supervised is not None and supervised.shape == ids.shape
        for row in range(ids.shape[0]):
            assert tuple(ids[row][supervised[row]].tolist()) in completions  # exactly the row's answer tokens
        kept = entry["selected"][..., 1].reshape(ids.shape)
        assert bool(kept[supervised].all())  # every answer token is processed
        skipped += int((mask.bool() & ~kept).sum())
    assert skipped > 0  # and the routing did skip prompt tokens


def test_concurrent_refuses_a_whole_layer_method_beside_another_job(make_model, tokenizer, reverse_train):
    """A γ-MoD block routes every row of the batch, so a γ-MoD job cannot share the batch with another job."""
    from lorakit.methods.gamma_mod import GammaModConfig

    model = make_model(GammaModConfig(r=2, target_modules=["q_proj"], mod_layers=[1]))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=TARGETS), name="plain")
    jobs = [Job("default", reverse_train[:8], _config()), Job("plain", reverse_train[:8], _config())]
    with pytest.raises(lorakit.AdapterError, match="job 'default'.*train that job alone"):
        train_concurrent(model, tokenizer, jobs, progress=False)
