"""PEFT files whose ``init_lora_weights`` only set A and B ("orthogonal", "mica": peft/tuners/lora/layer.py
``update_layer``, ``orthogonal_init``, ``mica_init``; neither writes the base weight) load as plain LoRA, both ways,
against the installed peft."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lk_models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomise(model, seed, names):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in names):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
def test_factor_only_init_files_load_both_ways(init, ids, tmp_path):
    targets = TARGETS if init == "mica" else TARGETS[:3]  # PEFT's orthogonal init is for linear layers only
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             init_lora_weights=init))
    base_weight = tiny_llama().model.layers[0].self_attn.q_proj.weight
    assert torch.equal(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, base_weight)
    _randomise(peft_model, 0, ("lora_",))  # as trained (MiCA's B included, which PEFT saves although frozen)
    peft_model.eval()
    expected = _out(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "from_peft")
    model = tiny_llama()
    base = _out(model, ids)
    lk.load_adapter(model, tmp_path / "from_peft")
    assert (expected - base).abs().max() > 1e-3  # the adapter matters
    assert (_out(model, ids) - expected).abs().max() <= 1e-5
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, base_weight)  # the base is untouched

    lk.save_adapter(model, tmp_path / "resaved")  # the init value is kept, so PEFT re-creates the same variant
    assert json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())["init_lora_weights"] == init
    got = _out(PeftModel.from_pretrained(tiny_llama(), tmp_path / "resaved").eval(), ids)
    assert (got - expected).abs().max() <= 1e-5


def _factor(name):
    return next(part for part in name.split(".") if part.startswith("lora_"))


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
def test_factor_only_init_new_adapter_matches_peft_init(init, ids, tmp_path):
    """A new lorakit adapter starts as PEFT's: "mica" B = the minor left singular vectors (equal up to each column's
    sign), A = 0, only A trains; "orthogonal" draws the same random numbers in the same order, so from one seed the
    factors are PEFT's exactly."""
    targets = TARGETS if init == "mica" else TARGETS[:3]
    host, peft_host = tiny_llama(), tiny_llama()
    torch.manual_seed(7)
    model = lk.add_adapter(host, lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init))
    torch.manual_seed(7)
    peft_model = get_peft_model(peft_host, PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          init_lora_weights=init))
    lk.save_adapter(model, tmp_path / "new")
    ours = load_file(tmp_path / "new" / "adapter_model.safetensors")
    theirs = {k: v for k, v in get_peft_model_state_dict(peft_model).items()
              if "base_layer" not in k}  # PEFT also writes a targeted embedding's base weight
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        if init == "orthogonal":
            assert value.any()
            torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0)
        elif "lora_B" in key or "lora_embedding_B" in key:  # singular vectors: equal up to sign per column
            torch.testing.assert_close(ours[key].abs(), value.abs(), atol=1e-5, rtol=0)
        else:
            assert not ours[key].any() and not value.any()
    trainable = sorted(_factor(n) for n, p in model.named_parameters() if p.requires_grad)
    peft_trainable = sorted(_factor(n) for n, p in peft_model.named_parameters() if p.requires_grad)
    assert trainable == peft_trainable
    if init == "orthogonal":  # BA ≠ 0 at init (factors /10: a small move), the same output as PEFT's
        torch.testing.assert_close(_out(model, ids), _out(peft_model.eval(), ids), atol=1e-6, rtol=0)


def test_factor_only_inits_refuse_what_peft_cannot_build():
    """PEFT raises on these at layer creation (orthogonal_init: odd rank; mica_init: r > min(out, in)); lorakit names
    the field before touching the model."""
    with pytest.raises(lk.ConfigError, match=r"init_lora_weights.*even rank.*rank_pattern\['v_proj'\]=3"):
        lk.LoraConfig(r=4, init_lora_weights="orthogonal", rank_pattern={"v_proj": 3})
    with pytest.raises(lk.ConfigError, match="init_lora_weights.*use_dora"):
        lk.LoraConfig(init_lora_weights="mica", use_dora=True)
    model = tiny_llama()
    with pytest.raises(lk.ConfigError, match=r"mica.*r <= min\(out, in\) = 32.*r=40"):
        lk.add_adapter(model, lk.LoraConfig(r=40, target_modules=["q_proj"], init_lora_weights="mica"))
    assert not lk.adapter_names(model) and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_file_of_a_bias_free_base_loads_both_ways(bias, ids, tmp_path):
    """PEFT's bias="lora_only" / "all" saves the host biases it trained (peft/tuners/tuners_utils.py
    ``_get_learnable_bias_state_dict``); Llama's layers have none, so the file is a plain LoRA."""
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[:3],
                                                             bias=bias, init_lora_weights=False))
    peft_model.eval()
    expected = _out(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "from_peft")
    assert not [k for k in load_file(tmp_path / "from_peft" / "adapter_model.safetensors") if k.endswith(".bias")]
    model = tiny_llama()
    base = _out(model, ids)
    lk.load_adapter(model, tmp_path / "from_peft")
    assert (expected - base).abs().max() > 1e-3
    assert (_out(model, ids) - expected).abs().max() <= 1e-5
    lk.save_adapter(model, tmp_path / "resaved")
    got = _out(PeftModel.from_pretrained(tiny_llama(), tmp_path / "resaved").eval(), ids)
    assert (got - expected).abs().max() <= 1e-5
    with pytest.raises(lk.ConfigError, match="'bias'"):  # a new adapter cannot train host biases: still refused
        lk.LoraConfig(bias=bias)


def _biased_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, attention_bias=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_file_holding_host_biases_is_refused_naming_one(bias, tmp_path):
    peft_model = get_peft_model(_biased_llama(), PeftLoraConfig(r=4, target_modules=["q_proj"], bias=bias))
    peft_model.save_pretrained(tmp_path)
    saved = [k for k in load_file(tmp_path / "adapter_model.safetensors") if k.endswith(".bias")]
    assert saved and (bias == "all" or all(k.endswith("q_proj.base_layer.bias") for k in saved))
    model = _biased_llama()
    with pytest.raises(lk.AdapterLoadError, match=rf"bias='{bias}'.*host model's biases") as e:
        lk.load_adapter(model, tmp_path)
    assert any(repr(k) in str(e.value) for k in saved)
    assert not lk.adapter_names(model)
