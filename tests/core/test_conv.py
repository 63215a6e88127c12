"""Convolution layers in the core: per-row mixed batches, targeting errors, the wrapper's shape attributes, merges
refused where a merge would be lost. Models: a diffusers UNet2DModel (nn.Conv2d), Wav2Vec2 and Whisper (nn.Conv1d)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import lorakit as lk
from lorakit.core.layer import AdapterLayer
from lorakit.core.model import adapter_layers

from lk_models import audio_inputs, tiny_unet, tiny_wav2vec2, tiny_whisper, unet_inputs, whisper_inputs

TARGETS = ["conv_in", "conv1", "conv2", "conv_shortcut", "conv", "conv_out"]
VARIANTS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=8, lora_alpha=4, use_rslora=True), "c": dict(r=2, lora_alpha=16)}


def _unet(variants):
    model = tiny_unet()
    for name, kwargs in variants.items():
        lk.add_adapter(model, lk.LoraConfig(target_modules=TARGETS, init_lora_weights=False, **kwargs), name=name)
    return model


def _sample(model, inputs, rows=None):
    inputs = inputs if rows is None else {k: v[rows] for k, v in inputs.items()}
    return model(**inputs).sample


@pytest.mark.parametrize("extra", [{}, {"d": dict(r=4, use_dora=True)}, {"e": dict(r=2, lora_bias=True)}],
                         ids=["plain", "dora", "lora_bias"])
def test_unet_mixed_rows_equal_single_rows(extra, monkeypatch):
    variants = {**VARIANTS, **extra}
    model = _unet(variants)
    names = [*variants, None, "__base__", "a"]
    inputs = unet_inputs(len(names))
    if not extra:  # plain LoRAs only: one grouped conv + bmm per layer, never the per-adapter loop
        monkeypatch.setattr(AdapterLayer, "_looped_rows", lambda *a: pytest.fail("looped over adapters"))
    with torch.no_grad(), lk.routing(adapter_names=names):
        mixed = _sample(model, inputs)
    monkeypatch.undo()
    for i, n in enumerate(names):
        with torch.no_grad():
            if n in (None, "__base__"):
                with lk.disable_adapters(model):
                    alone = _sample(model, inputs, [i])
            else:
                lk.set_adapter(model, n)
                alone = _sample(model, inputs, [i])
        assert (mixed[i:i + 1] - alone).abs().max() <= 1e-5, n


def test_unet_mixed_rows_match_peft_adapter_names(tmp_path):
    """PEFT's mixed batch (``adapter_names=``, layer.py ``_mixed_batch_forward``) gives the same rows."""
    model = _unet({"a": VARIANTS["a"], "b": VARIANTS["b"]})
    for name in ("a", "b"):
        lk.save_adapter(model, tmp_path / name, name=name)
    names = ["a", "b", "__base__", "b"]
    inputs = unet_inputs(len(names))
    with torch.no_grad(), lk.routing(adapter_names=names):
        ours = _sample(model, inputs)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_unet(), tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        theirs = peft_model(**inputs, adapter_names=names).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_stacked_conv_rows_train_each_adapter_separately():
    model = _unet({"a": VARIANTS["a"], "b": VARIANTS["b"]})
    lk.set_adapter(model, ["a", "b"])
    model.train()
    with lk.routing(adapter_names=["a", "a", "b"]):
        out = _sample(model, unet_inputs(3))
    out[2].pow(2).mean().backward()  # only row 2 (adapter b) in the loss
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None or g.abs().max() == 0 for n, g in grads.items() if ".adapters.a." in n)
    assert any(g is not None and g.abs().max() > 0 for n, g in grads.items() if ".adapters.b." in n)


def test_weighted_adapter_mix_on_conv():
    model = _unet({"a": VARIANTS["a"], "b": VARIANTS["b"]})
    inputs = unet_inputs(2)
    with torch.no_grad():
        with lk.disable_adapters(model):
            base = _sample(model, inputs)
        with lk.routing(adapter_weights={"a": [1.0, 0.0], "b": [0.0, 1.0]}):
            mixed = _sample(model, inputs)
        lk.set_adapter(model, "a")
        a = _sample(model, inputs, [0])
        lk.set_adapter(model, "b")
        b = _sample(model, inputs, [1])
    assert (mixed[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(mixed, torch.cat([a, b]), atol=1e-5, rtol=0)


def _linear_only_methods():
    for m in lk.list_methods():
        if "conv" not in m.layer_kinds:
            yield pytest.param(m.name, id=f"method={m.name}")


MODEL_FIELDS = {"xlora": dict(hidden_size=16)}  # fields a method otherwise reads from a transformers config


@pytest.mark.parametrize("method_name", list(_linear_only_methods()))
def test_methods_without_conv_refuse_a_conv_target(method_name):
    """The error names the module, its type, the method and the layer types the method adapts."""
    method = lk.get_method(method_name)
    kwargs = {**next(iter(method.variants.values())), **MODEL_FIELDS.get(method_name, {})}
    model = tiny_unet()
    target = "down_blocks.0.resnets.0.conv1"
    with pytest.raises(lk.TargetError) as err:
        lk.add_adapter(model, method.config_cls(target_modules=[target], **kwargs))
    text = str(err.value)
    assert f"cannot take a {method_name!r} adapter" in text and "nn.Linear" in text, text
    if method_name != "gamma_mod":  # γ-MoD also routes whole decoder blocks: the UNet's first block is refused first
        assert f"module {target!r} (Conv2d, layer kind 'conv')" in text, text
    assert not list(adapter_layers(model))


def test_wrapper_answers_the_base_layers_shape_attributes():
    model = lk.add_adapter(tiny_whisper(), lk.LoraConfig(target_modules=["conv1", "conv2"]))
    conv2 = model.model.encoder.conv2
    assert isinstance(conv2, AdapterLayer)
    assert conv2.stride == (2,) and conv2.kernel_size == (3,) and conv2.in_channels == 16
    with pytest.raises(AttributeError):
        conv2.no_such_attribute
    ids = torch.randint(0, 96, (2, 5))
    assert model(**whisper_inputs(ids)).logits.shape == (2, 5, 96)  # WhisperEncoder reads conv1.stride


def test_weight_normed_conv_trains_but_refuses_to_merge():
    """Wav2Vec2's positional conv has weight_norm (its .weight is recomputed): a merge there would be lost."""
    model = tiny_wav2vec2()
    inputs = audio_inputs(2)
    peft_model = get_peft_model(tiny_wav2vec2(), PeftLoraConfig(target_modules=["pos_conv_embed.conv"], r=2,
                                                                init_lora_weights=False)).eval()
    lk.add_adapter(model, lk.LoraConfig(target_modules=["pos_conv_embed.conv"], r=2, init_lora_weights=False))
    ours = dict(lk.adapter_state_dict(model))
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, ours)
    torch.testing.assert_close(model(**inputs).last_hidden_state, peft_model(**inputs).last_hidden_state,
                               atol=1e-5, rtol=0)
    with pytest.raises(lk.AdapterError, match="parametrization"):
        lk.merge_adapter(model)
