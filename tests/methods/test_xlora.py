"""X-LoRA: parity with PEFT's XLoraModel (global / layerwise / top-k / scaling-pass value), the scalings against a
hand-computed reference, one-hot scalings == the single adapter, frozen adapters, save/load, generation, hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import XLoraConfig as PeftXLoraConfig
from peft import get_peft_model

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.methods.xlora import XLoraClassifier, XLoraConfig, remove_xlora_hooks
from lorakit.mixtures import record_routing

from lk_models import tiny_llama, tiny_llama_for, word_level_tokenizer

SOURCES = [(4, 8, ["q_proj", "v_proj"]), (2, 8, ["q_proj", "o_proj"]), (4, 4, ["v_proj", "o_proj"])]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[str]:
    """Three PEFT LoRA folders with different ranks, alphas and targets (random, non-zero B)."""
    root = tmp_path_factory.mktemp("xlora_sources")
    paths = []
    for i, (r, alpha, targets) in enumerate(SOURCES):
        torch.manual_seed(10 + i)
        model = get_peft_model(tiny_llama(), PeftLoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                            init_lora_weights=False))
        model.save_pretrained(root / str(i))
        paths.append(str(root / str(i)))
    return paths


def heads(model, name="default") -> list[XLoraClassifier]:
    return [layer.adapters[name].classifier for _, layer in adapter_layers(model)
            if name in layer.adapters and layer.adapters[name].classifier is not None]


def xlora_model(paths, **kwargs):
    model = tiny_llama()
    lk.add_adapter(model, XLoraConfig(adapter_paths=paths, **kwargs))
    return model


PARITY = {
    "global": {},
    "layerwise_topk_softmax": {"layerwise_scalings": True, "xlora_depth": 2, "xlora_size": 16, "top_k_lora": 2,
                               "enable_softmax": False, "enable_softmax_topk": True},
    "deep_topk": {"xlora_depth": 3, "xlora_size": 8, "xlora_dropout_p": 0.1, "top_k_lora": 1},
    "pass_value_temperature": {"scaling_pass_value": 0.5, "softmax_temperature": 2.0, "global_scaling_weight": 0.7},
}


@pytest.mark.parametrize("case", list(PARITY))
def test_matches_peft_xlora(sources, case, ids):
    kwargs = PARITY[case]
    base = tiny_llama()
    base.config.use_cache = False  # PEFT's XLoraModel refuses a model with use_cache
    peft_model = get_peft_model(base, PeftXLoraConfig(task_type="CAUSAL_LM", hidden_size=32,
                                                      adapters={str(i): p for i, p in enumerate(sources)}, **kwargs))
    peft_model.eval()
    model = xlora_model(sources, **kwargs)
    (head,) = heads(model)
    head.load_state_dict(peft_model.base_model.internal_xlora_classifier.state_dict())
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (expected - tiny_llama()(input_ids=ids).logits).abs().max() > 1e-2  # the adapters matter


def test_scalings_match_a_hand_computed_reference(sources, ids):
    """Scaling pass = the base model (pass value 0); scalings = softmax(head(h_last) / T) with top-k."""
    model = xlora_model(sources, layerwise_scalings=True, softmax_temperature=0.5, top_k_lora=2)
    (head,) = heads(model)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
        with lk.disable_adapters(model):
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        logits = head.layers(hidden).view(*ids.shape, -1, 3)  # (batch, seq, modules, N)
        probs = torch.softmax(logits / 0.5, dim=-1)
        kth = probs.topk(2, dim=-1).values[..., -1:]
        expected = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        with record_routing(model) as traces:
            model(input_ids=ids)
    paths = [p for p, _ in adapter_layers(model)]
    assert len(traces) == len(paths) == expected.shape[2] == 6  # q, v, o in each of 2 layers
    for i, path in enumerate(paths):
        (trace,) = traces[f"{path}[default]"]
        torch.testing.assert_close(trace["weights"], expected[:, :, i], atol=1e-6, rtol=0)
    assert not torch.allclose(expected[:, :, 0], expected[:, :, 1])  # layerwise: modules differ


@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_hot_scalings_equal_the_single_adapter(sources, index, ids):
    model = xlora_model(sources)
    (head,) = heads(model)
    with torch.no_grad():
        head.layers[-1].weight.zero_()
        head.layers[-1].bias.fill_(-1000.0)
        head.layers[-1].bias[index] = 1000.0  # softmax gives exactly (0, …, 1, …, 0)
        got = model(input_ids=ids).logits
        single = tiny_llama()
        lk.load_adapter(single, sources[index])
        expected = single(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_frozen_adapters_only_train_the_head(sources, ids):
    model = xlora_model(sources)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".classifier." in n for n in trainable)
    deltas = [layer.adapters["default"] for _, layer in adapter_layers(model)]
    assert all(set(d.frozen_names()) == {"lora_A", "lora_B"} for d in deltas)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable


def test_trainable_adapters(sources, ids):
    model = xlora_model(sources, use_trainable_adapters=True)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.grad is not None}
    assert {"lora_A", "lora_B", "weight", "bias"} <= grads


def test_save_load_round_trip_without_sources(sources, ids, tmp_path):
    model = xlora_model(sources, layerwise_scalings=True, xlora_depth=2, xlora_size=8)
    with torch.no_grad():
        for p in heads(model)[0].parameters():
            p.normal_(0, 0.3)
        out = model(input_ids=ids).logits
    lk.save_adapter(model, tmp_path / "x")
    saved = lk.read_adapter_config(tmp_path / "x")
    assert saved.adapter_paths is None and saved.expert_r == [4, 2, 4] and len(saved.layer_modules) == 6
    fresh = tiny_llama()
    lk.load_adapter(fresh, tmp_path / "x")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, out, atol=1e-6, rtol=0)


def test_generate_needs_use_cache_false(sources, ids):
    model = xlora_model(sources)
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
        seq = ids
        for _ in range(4):  # greedy reference: one full forward per token
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)
    with pytest.raises(lk.AdapterError, match="use_cache=False"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert lk.current_routing() is None  # the failed call left no routing context behind


def test_disabled_and_inactive_adapters_give_the_base(sources, ids):
    model = xlora_model(sources)
    with torch.no_grad():
        base = tiny_llama()(input_ids=ids).logits
        with lk.disable_adapters(model):
            torch.testing.assert_close(model(input_ids=ids).logits, base, atol=1e-6, rtol=0)
        lk.add_adapter(model, lk.LoraConfig(target_modules=["k_proj"]), name="plain")
        lk.set_adapter(model, "plain")  # X-LoRA inactive: no scaling pass, plain LoRA (B = 0) only
        torch.testing.assert_close(model(input_ids=ids).logits, base, atol=1e-6, rtol=0)


def test_hooks_are_registered_once_and_removed(sources, ids):
    model = xlora_model(sources)
    lk.add_adapter(model, XLoraConfig(adapter_paths=sources[:2]), name="second")
    # X-LoRA's pre-hook, and lorakit's check of routing names before any compute (issue 10)
    assert len(model._forward_pre_hooks) == 2 and len(model._forward_hooks) == 1
    clone = copy.deepcopy(model)  # the copy's hooks act on the copy
    with torch.no_grad():
        torch.testing.assert_close(clone(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    lk.delete_adapter(model, "default")
    assert len(model._forward_pre_hooks) == 2  # "second" still needs it
    lk.delete_adapter(model, "second")
    with torch.no_grad():
        model(input_ids=ids)  # the first forward without an X-LoRA adapter removes the hooks
    assert not model._forward_pre_hooks and not model._forward_hooks
    remove_xlora_hooks(clone)
    assert [h.__name__ for h in clone._forward_pre_hooks.values()] == ["_check_routing_names"]  # lorakit's own
    assert not clone._forward_hooks


def test_error_inside_forward_leaves_no_routing_context(sources):
    model = xlora_model(sources)
    with pytest.raises(Exception):
        model(input_ids=torch.full((1, 3), 10_000))  # out of vocabulary: the scaling pass fails
    assert lk.current_routing() is None
    with lk.routing(keys=torch.zeros(1)):
        with pytest.raises(Exception):
            model(input_ids=torch.full((1, 3), 10_000))
        assert lk.current_routing().extras == {}


def test_layer_outside_the_hooked_forward_refuses():
    model = tiny_llama()
    lk.add_adapter(model, XLoraConfig(target_modules=["q_proj"], num_experts=2))
    with pytest.raises(lk.AdapterError, match="without scalings"):
        model.model(input_ids=torch.zeros(1, 3, dtype=torch.long))  # the inner model has no hook


def test_config_validation():
    with pytest.raises(lk.ConfigError, match="top_k_lora"):
        XLoraConfig(num_experts=2, top_k_lora=3)
    with pytest.raises(lk.ConfigError, match="enable_softmax_topk"):
        XLoraConfig(num_experts=2, enable_softmax_topk=True)
    with pytest.raises(lk.ConfigError, match="adapter_paths"):
        XLoraConfig()
    assert XLoraConfig(num_experts=2).expert_r == [8, 8]


def test_head_layout_follows_peft():
    config = XLoraConfig(num_experts=3, hidden_size=16, xlora_depth=3, xlora_size=8, layerwise_scalings=True,
                         layer_modules=["a", "b"])
    head = XLoraClassifier(config, 2)
    kinds = [type(m).__name__ for m in head.layers]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert head.layers[-1].out_features == 6


def test_training_loop_trains_the_head_through_the_hook(sources):
    from lorakit.data import load_examples
    from lorakit.training import TrainConfig, train

    examples = load_examples("reverse,sort", "train", n=6)
    tokenizer = word_level_tokenizer(examples)
    model = tiny_llama_for(tokenizer, num_attention_heads=4)
    lk.add_adapter(model, XLoraConfig(adapter_paths=sources))
    before = {k: v.clone() for k, v in lk.adapter_state_dict(model).items()}
    result = train(model, tokenizer, examples, TrainConfig(steps=3, batch_size=4, lr=0.01, max_length=64,
                                                           log_every=100, device="cpu"), progress=False)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    after = lk.adapter_state_dict(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".classifier." in k for k in changed)  # the head trains, the adapters stay frozen


@pytest.mark.parametrize("remove", ["delete", "unload"])
def test_delete_and_unload_remove_the_model_hooks_at_once(sources, remove):
    from lorakit.methods import xlora

    model = xlora_model(sources)
    assert any(h is xlora._xlora_pre_hook for h in model._forward_pre_hooks.values())
    lk.delete_adapter(model, "default") if remove == "delete" else lk.unload(model)
    assert not any(h is xlora._xlora_pre_hook for h in model._forward_pre_hooks.values())
