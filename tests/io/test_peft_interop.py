"""Adapters move between lorakit and the real ``peft`` package with identical outputs (fp32, <= 1e-5)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import lorakit as lk
from lk_models import audio_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_unet, tiny_wav2vec2, unet_inputs

MODELS = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj", "embed_tokens"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    "bert": (tiny_bert, dict(target_modules=["query", "key", "value", "dense"], modules_to_save=["classifier"],
                             exclude_modules=["classifier"])),
}
VARIANTS = {
    "lora": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=16, use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2, "value": 2, "c_proj": 2},
                     alpha_pattern={"q_proj": 3, "query": 3, "c_attn": 3}),
}
CASES = [pytest.param(m, v, id=f"lora-{m}-{v}") for m in MODELS for v in VARIANTS]


def _out(model, ids):
    return model(input_ids=ids).logits


def _randomise_peft(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _randomise_trainable(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


# PEFT files keep the union of patterns, most of which match nothing in a given model: a file's names are read
# leniently (its tensors say what was trained), issue 10.
@pytest.mark.parametrize("model_name,variant", CASES)
def test_peft_to_lorakit(model_name, variant, ids, tmp_path):
    factory, targets = MODELS[model_name]
    peft_model = get_peft_model(factory(), PeftLoraConfig(**targets, **VARIANTS[variant], init_lora_weights=False))
    _randomise_peft(peft_model, 0)
    peft_model.eval()
    expected = _out(peft_model, ids)
    peft_model.save_pretrained(tmp_path)

    model = factory()
    base = _out(model, ids)
    lk.load_adapter(model, tmp_path)
    got = _out(model, ids)
    assert (expected - base).abs().max() > 1e-3  # the adapter matters
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("model_name,variant", CASES)
def test_lorakit_to_peft(model_name, variant, ids, tmp_path):
    factory, targets = MODELS[model_name]
    model = factory()
    kwargs = dict(VARIANTS[variant])
    for field in ("rank_pattern", "alpha_pattern"):  # keys a user types must match (issue 10): this model's only
        if field in kwargs:
            kwargs[field] = {k: v for k, v in kwargs[field].items() if k in str(targets["target_modules"])}
    lk.add_adapter(model, lk.LoraConfig(**targets, **kwargs, init_lora_weights=False))
    _randomise_trainable(model, 1)
    expected = _out(model, ids)
    lk.save_adapter(model, tmp_path)

    peft_model = PeftModel.from_pretrained(factory(), tmp_path).eval()
    got = _out(peft_model, ids)
    assert (got - expected).abs().max() <= 1e-5
    # the same tensors and the same config PEFT itself writes
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] == (model_name == "gpt2")


def test_peft_merge_and_unload_matches_lorakit(ids, tmp_path):
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(target_modules="all-linear", use_dora=True,
                                                             init_lora_weights=False))
    _randomise_peft(peft_model, 3)
    peft_model.save_pretrained(tmp_path)
    merged_peft = peft_model.merge_and_unload()
    model = lk.load_adapter(tiny_llama(), tmp_path)
    merged = lk.merge_and_unload(model)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    ref = merged_peft.state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=0)


def test_all_linear_selects_the_same_modules_as_peft():
    for factory in (tiny_llama, tiny_gpt2, tiny_bert):
        pm = get_peft_model(factory(), PeftLoraConfig(target_modules="all-linear"))
        peft_targets = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
        model = lk.add_adapter(factory(), lk.LoraConfig(target_modules="all-linear"))
        ours = {n for n, _ in lk.core.model.adapter_layers(model)}
        assert ours == peft_targets, factory.__name__


# ---- convolutions (issue 22): nn.Conv2d in a diffusers UNet2DModel, nn.Conv1d in a Wav2Vec2 feature encoder ----
# PEFT's layout (peft/tuners/lora/layer.py:1625-1628, peft 0.21.2): lora_A.weight (r, in, *kernel),
# lora_B.weight (out, r, 1, ...); DoRA's lora_magnitude_vector (1, out, 1, ...) (peft/tuners/lora/dora.py:207-213).
CONV_MODELS = {
    "unet": (tiny_unet, unet_inputs, "sample",
             dict(target_modules=["conv_in", "conv1", "conv2", "conv_shortcut", "conv", "conv_out"])),
    # (Whisper's conv1/conv2 are not here: PEFT 0.21.2's wrapper lacks the .stride WhisperEncoder reads; lorakit's
    # own Whisper case is in tests/core/test_contract.py.)
    "wav2vec2": (tiny_wav2vec2, audio_inputs, "last_hidden_state",
                 dict(target_modules=["conv"], exclude_modules=["pos_conv_embed.conv"])),
}
CONV_VARIANTS = {
    "lora": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=16, use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "lora_bias": dict(r=4, lora_alpha=8, lora_bias=True),
    "patterns": dict(r=4, lora_alpha=8),  # + CONV_PATTERNS of the model
}
CONV_PATTERNS = {"unet": dict(rank_pattern={"conv_shortcut": 2}, alpha_pattern={"conv1": 3}),
                 "wav2vec2": dict(rank_pattern={"conv_layers.1.conv": 2}, alpha_pattern={"conv_layers.0.conv": 3})}


def _conv_variant(model_name, variant):
    return {**CONV_VARIANTS[variant], **(CONV_PATTERNS[model_name] if variant == "patterns" else {})}
CONV_CASES = [pytest.param(m, v, id=f"lora-conv-{m}-{v}") for m in CONV_MODELS for v in CONV_VARIANTS
              if not (v == "lora_bias" and m == "wav2vec2")]  # lora_bias merges into a base bias: wav2vec2's have none


def _conv_out(model, name):
    _, inputs, field, _ = CONV_MODELS[name]
    return getattr(model(**inputs()), field)


def _shapes(directory):
    from safetensors.torch import load_file

    return {k: tuple(v.shape) for k, v in load_file(directory / "adapter_model.safetensors").items()}


@pytest.mark.parametrize("model_name,variant", CONV_CASES)
def test_peft_conv_to_lorakit(model_name, variant, tmp_path):
    factory, _, _, targets = CONV_MODELS[model_name]
    peft_model = get_peft_model(factory(), PeftLoraConfig(**targets, **_conv_variant(model_name, variant),
                                                          init_lora_weights=False))
    _randomise_peft(peft_model, 0)
    peft_model.eval()
    expected = _conv_out(peft_model, model_name)
    peft_model.save_pretrained(tmp_path / "peft")

    model = factory()
    base = _conv_out(model, model_name)
    lk.load_adapter(model, tmp_path / "peft")
    got = _conv_out(model, model_name)
    assert (expected - base).abs().max() > 1e-3  # the adapter matters
    assert (got - expected).abs().max() <= 1e-5
    # lorakit writes the same keys and shapes back
    lk.save_adapter(model, tmp_path / "lk")
    assert _shapes(tmp_path / "lk") == _shapes(tmp_path / "peft")
    if model_name == "unet":
        shapes = _shapes(tmp_path / "peft")
        r_conv1 = 4  # conv1 keeps r=4 under every variant's rank_pattern
        assert shapes["base_model.model.down_blocks.1.resnets.0.conv1.lora_A.weight"] == (r_conv1, 8, 3, 3)
        assert shapes["base_model.model.down_blocks.1.resnets.0.conv1.lora_B.weight"] == (16, r_conv1, 1, 1)


@pytest.mark.parametrize("model_name,variant", CONV_CASES)
def test_lorakit_conv_to_peft(model_name, variant, tmp_path):
    factory, _, _, targets = CONV_MODELS[model_name]
    model = factory()
    lk.add_adapter(model, lk.LoraConfig(**targets, **_conv_variant(model_name, variant), init_lora_weights=False))
    _randomise_trainable(model, 1)
    expected = _conv_out(model, model_name)
    lk.save_adapter(model, tmp_path)

    peft_model = PeftModel.from_pretrained(factory(), tmp_path).eval()
    assert (_conv_out(peft_model, model_name) - expected).abs().max() <= 1e-5
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] is False


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_conv_merge_and_unload_matches_lorakit(use_dora, tmp_path):
    _, _, _, targets = CONV_MODELS["unet"]
    peft_model = get_peft_model(tiny_unet(), PeftLoraConfig(**targets, r=4, use_dora=use_dora, init_lora_weights=False))
    _randomise_peft(peft_model, 3)
    peft_model.save_pretrained(tmp_path)
    merged_peft = peft_model.merge_and_unload()
    merged = lk.merge_and_unload(lk.load_adapter(tiny_unet(), tmp_path))
    assert type(merged.conv_in) is torch.nn.Conv2d
    ref = merged_peft.state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=0)


def test_all_linear_leaves_convolutions_alone_as_peft():
    pm = get_peft_model(tiny_unet(), PeftLoraConfig(target_modules="all-linear"))
    peft_targets = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    model = lk.add_adapter(tiny_unet(), lk.LoraConfig(target_modules="all-linear"))
    ours = {n for n, _ in lk.core.model.adapter_layers(model)}
    assert ours == peft_targets
    assert not any(isinstance(layer.base_layer, torch.nn.Conv2d) for _, layer in lk.core.model.adapter_layers(model))
