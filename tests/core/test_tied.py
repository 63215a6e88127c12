"""Tied weights (issue 10, fault 4): a LoRA on embed_tokens or lm_head of a tie_word_embeddings model must merge
into the targeted module only. Right value: the unmerged model's output (and the base weight of the twin)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.cli import main
from lorakit.hub import load_model_and_tokenizer


def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_both_tied_twins_targeted(ids):
    model = tied_llama()
    shared = model.lm_head.weight
    with pytest.warns(UserWarning, match="shares its weight"):
        lk.add_adapter(model, lk.LoraConfig(target_modules=["embed_tokens", "lm_head"], init_lora_weights=False))
    y = _out(model, ids)
    with pytest.warns(UserWarning, match="tied weights"):
        lk.merge_adapter(model)
    assert (_out(model, ids) - y).abs().max() < 1e-5
    lk.unmerge_adapter(model)
    assert model.lm_head.base_layer.weight is shared and model.model.embed_tokens.base_layer.weight is shared
    with lk.disable_adapters(model):
        base = _out(model, ids)
    with pytest.warns(UserWarning, match="tied weights"):
        plain = lk.merge_and_unload(model)
    assert (_out(plain, ids) - y).abs().max() < 1e-5 and (base - y).abs().max() > 1e-3


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_merge_unties_and_keeps_the_function(target, ids, tmp_path):
    model = tied_llama()
    shared = model.lm_head.weight.detach().clone()
    with pytest.warns(UserWarning, match="shares its weight"):
        lk.add_adapter(model, lk.LoraConfig(target_modules=[target, "q_proj"], init_lora_weights=False))
    y = _out(model, ids)
    with pytest.warns(UserWarning, match="tied weights"):
        lk.merge_adapter(model)
    assert (_out(model, ids) - y).abs().max() < 1e-5
    twin = model.model.embed_tokens if target == "lm_head" else model.lm_head
    twin_weight = twin.base_layer.weight if hasattr(twin, "base_layer") else twin.weight
    assert torch.equal(twin_weight, shared)  # the untargeted twin keeps the base weight
    lk.unmerge_adapter(model)  # ties again, bit for bit
    assert model.lm_head.weight is model.model.embed_tokens.weight if target == "q_proj" else True
    layer = model.lm_head if target == "lm_head" else model.model.embed_tokens
    assert layer.base_layer.weight is twin_weight and torch.equal(twin_weight, shared)
    with pytest.warns(UserWarning, match="tied weights"):
        plain = lk.merge_and_unload(model)
    assert (_out(plain, ids) - y).abs().max() < 1e-5
    assert plain.config.tie_word_embeddings is False
    plain.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert (_out(again, ids) - y).abs().max() < 1e-5


def test_untargeted_tied_weights_do_not_warn(ids):
    model = tied_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
        lk.merge_and_unload(model)
    assert model.config.tie_word_embeddings is True


def test_cli_merge_on_the_tied_bundled_base(tmp_path):
    model, tokenizer = load_model_and_tokenizer(None)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="shares its weight"):
        lk.add_adapter(model, lk.LoraConfig(target_modules=["embed_tokens", "q_proj"], r=4, init_lora_weights=False))
    for _, layer in lk.core.model.adapter_layers(model):  # an adapter big enough to move the argmax
        for n, p in layer.adapters["default"].named_parameters():
            torch.nn.init.normal_(p, std=0.3)
    lk.save_adapter(model, tmp_path / "adapter")
    ids = torch.tensor([tokenizer("the quick brown fox jumps over the lazy dog and then")["input_ids"]])
    unmerged = _out(model, ids)
    with pytest.warns(UserWarning, match="tied weights"):
        assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(merged(input_ids=ids).logits.argmax(-1), unmerged.argmax(-1))
    assert (_out(merged, ids) - unmerged).abs().max() < 1e-3
