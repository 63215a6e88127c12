"""PEFT interop on host models and dtypes beyond tests/io/test_peft_interop.py: T5 (its feed-forward reads
``wo.weight``), tied input/output embeddings, a sequence classifier whose head the adapter leaves frozen, and
half-precision bases (float32 adapters, PEFT's autocast_adapter_dtype). The reference is the real ``peft``
package: an adapter saved by one library gives the other's outputs (fp32 <= 1e-5; bf16 / fp16 bit for bit, as
both add the float32 delta to the base output and round once)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import AutoPeftModel, PeftModel, get_peft_model
from transformers import BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lk_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, tiny_unet, unet_inputs


def tied_llama(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _out(model, ids):
    with torch.no_grad():
        if model.config.model_type == "t5":
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


def _randomise(model, seed, names=("lora_", "modules_to_save")):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in names):
                p.add_((torch.randn(p.shape, generator=g) * 0.1).to(p.dtype))


def _both_ways(factory, kwargs, ids, tmp_path, atol=1e-5, dtype=torch.float32, configs=None):
    """PEFT -> lorakit and lorakit -> PEFT with the same config (``configs``: PEFT's and lorakit's classes with
    their own init flag; LoRA's by default): each loaded adapter gives the saving library's logits within atol."""
    peft_config, lk_config = configs or (lambda **kw: PeftLoraConfig(**kw, init_lora_weights=False),
                                         lambda **kw: lk.LoraConfig(**kw, init_lora_weights=False))
    peft_model = get_peft_model(factory(dtype=dtype), peft_config(**kwargs))
    _randomise(peft_model, 0, names=("lora_", "modules_to_save", "miss_", "randlora_lambda", "randlora_gamma"))
    peft_model.eval()
    expected = _out(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "from_peft")
    model = factory(dtype=dtype)
    base = _out(model, ids)
    lk.load_adapter(model, tmp_path / "from_peft")
    got = _out(model, ids)
    assert (expected.float() - base.float()).abs().max() > 1e-3  # the adapter matters
    assert (got.float() - expected.float()).abs().max() <= atol

    model = lk.add_adapter(factory(dtype=dtype), lk_config(**kwargs))
    _randomise(model, 1, names=("adapters.", "copies."))  # every adapter parameter, frozen or not
    expected = _out(model, ids)
    lk.save_adapter(model, tmp_path / "from_lorakit")
    got = _out(PeftModel.from_pretrained(factory(dtype=dtype), tmp_path / "from_lorakit").eval(), ids)
    assert (got.float() - expected.float()).abs().max() <= atol


# T5's DenseReluDense reads self.wo.weight (dtype check) on every forward: an adapted wo failed with
# "'AdapterLayer' object has no attribute 'weight'" (PEFT's wrapper answers its base layer's weight).
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_t5_all_linear_both_ways(variant, ids, tmp_path):
    _both_ways(tiny_t5, dict(r=4, lora_alpha=8, target_modules="all-linear", **variant), ids, tmp_path)


# PEFT saves the base weight of a targeted embedding / lm_head (lm_head.base_layer.weight); on a tied model that
# tensor is the embedding's, which named_parameters() lists once: lorakit refused the file as "a base-model weight
# that differs from this model's".
@pytest.mark.parametrize("targets", [["embed_tokens", "lm_head", "q_proj"], ["lm_head", "v_proj"]])
def test_tied_embeddings_targeted_both_ways(targets, ids, tmp_path):
    _both_ways(tied_llama, dict(r=4, lora_alpha=8, target_modules=targets), ids, tmp_path)


def test_tied_file_with_another_base_weight_is_still_refused(tmp_path):
    peft_model = get_peft_model(tied_llama(), PeftLoraConfig(r=4, target_modules=["lm_head"]))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(lk.AdapterLoadError, match="lm_head.base_layer.weight"):
        lk.load_adapter(tied_llama(seed=1), tmp_path)


# A lorakit adapter on a *ForSequenceClassification model whose head it does not train was written with
# task_type "SEQ_CLS": PEFT's PeftModelForSequenceClassification then adds "classifier" / "score" to
# modules_to_save and failed on the file (KeyError 'base_model.model.classifier.weight').
def test_seq_cls_adapter_without_head_loads_in_peft(ids, tmp_path):
    tiny_bert().save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    expected = _out(model, ids)
    lk.save_adapter(model, tmp_path / "adapter")
    # what PEFT writes for a config without task_type (peft_model.py save_pretrained: auto_mapping)
    peft_model = get_peft_model(tiny_bert(), PeftLoraConfig(r=4, target_modules=["query", "value"]))
    peft_model.save_pretrained(tmp_path / "peft")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    peft_written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["task_type"] is None and written["auto_mapping"] == peft_written["auto_mapping"]
    got = _out(PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter").eval(), ids)
    assert (got - expected).abs().max() <= 1e-5
    got = _out(AutoPeftModel.from_pretrained(tmp_path / "adapter").eval(), ids)  # base class from auto_mapping
    assert (got - expected).abs().max() <= 1e-5


def test_seq_cls_adapter_with_head_keeps_its_task_type(ids, tmp_path):
    config = lk.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                           init_lora_weights=False)
    model = lk.add_adapter(tiny_bert(), config)
    expected = _out(model, ids)
    lk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    peft_model = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert type(peft_model).__name__ == "PeftModelForSequenceClassification"
    assert (_out(peft_model, ids) - expected).abs().max() <= 1e-5


# Half-precision bases with float32 adapters: PEFT adds the float32 delta to the base output and rounds the sum
# once (peft/tuners/lora/layer.py Linear.forward: result + lora_B(lora_A(x)) * scaling, then
# result.to(torch_result_dtype)); lorakit rounded the delta to bf16 first, then the sum (bf16 logits 1e-2 apart).
HALF = {
    "llama-lora": (tiny_llama, dict(target_modules="all-linear")),
    "llama-dora-embed": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj", "down_proj"], use_dora=True)),
    "gpt2-dora": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True)),
    "gpt2-lora-bias": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], lora_bias=True)),
    "bert-dora": (tiny_bert, dict(target_modules=["query", "value", "dense"], use_dora=True)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(HALF))
def test_half_precision_base_identical_to_peft(case, dtype, ids, tmp_path):
    factory, kwargs = HALF[case]
    _both_ways(factory, dict(r=4, lora_alpha=8, **kwargs), ids, tmp_path, atol=0, dtype=dtype)


# MiSS and RandLoRA, PEFT's other file-compatible methods, add the same way (peft/tuners/miss/layer.py and
# randlora/layer.py forward: result + delta, result.to(previous_dtype)); RandLoRA's fused ΔW-in-the-weight path
# rounded ΔW to bf16 (logits 4e-3 apart), so it now runs only when adapter and base share a dtype.
@pytest.mark.parametrize("method", ["miss", "randlora"])
def test_half_precision_miss_and_randlora_identical_to_peft(method, ids, tmp_path):
    from peft import MissConfig, RandLoraConfig

    from lorakit.methods.miss import MissConfig as LkMissConfig
    from lorakit.methods.randlora import RandLoraConfig as LkRandLoraConfig

    configs = {"miss": (MissConfig, LkMissConfig),
               "randlora": (lambda **kw: RandLoraConfig(randlora_alpha=8, init_weights=False, **kw),
                            lambda **kw: LkRandLoraConfig(randlora_alpha=8, init_weights=False, **kw))}[method]
    _both_ways(tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), ids, tmp_path, atol=0,
               dtype=torch.bfloat16, configs=configs)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_half_precision_conv_identical_to_peft(use_dora, tmp_path):
    peft_model = get_peft_model(tiny_unet(dtype=torch.bfloat16), PeftLoraConfig(
        r=4, target_modules=["conv1", "conv2"], use_dora=use_dora, init_lora_weights=False))
    _randomise(peft_model, 0)
    inputs = unet_inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        expected = peft_model.eval()(**inputs).sample
    peft_model.save_pretrained(tmp_path)
    model = lk.load_adapter(tiny_unet(dtype=torch.bfloat16), tmp_path)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, expected)


def test_half_precision_gradients_identical_to_peft(ids, tmp_path):
    peft_model = get_peft_model(tiny_llama(dtype=torch.bfloat16),
                                PeftLoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    _randomise(peft_model, 0)
    peft_model.save_pretrained(tmp_path)
    model = lk.load_adapter(tiny_llama(dtype=torch.bfloat16), tmp_path, is_trainable=True)
    peft_model.train()(input_ids=ids, labels=ids).loss.backward()
    model.train()(input_ids=ids, labels=ids).loss.backward()
    want = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
            for n, p in peft_model.named_parameters() if p.requires_grad}
    got = {n.replace("adapters.default.", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(got) == sorted(want)
    for name, grad in got.items():
        assert torch.equal(grad, want[name]), name


# PEFT (tuners_utils.py check_target_module_exists) adapts a module a target_modules list names in full whatever
# layers_to_transform says; lorakit applied the layer filter to it too, so PEFT's file held tensors lorakit refused
# ("match no adapted module") and lorakit's file left out a module PEFT adapts (PEFT then ran its fresh init there).
@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["v_proj", "model.layers.0.self_attn.q_proj"]],
                         ids=["lm_head", "full-path"])
def test_a_module_named_in_full_bypasses_layers_to_transform_both_ways(targets, ids, tmp_path):
    _both_ways(tiny_llama, dict(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=[1]), ids, tmp_path)


# PEFT's LoraConfig raises ValueError for a str target_modules beside layers_to_transform, so lorakit's file of
# `target_modules="all-linear"` (lorakit train's default) + layers_to_transform did not load in PEFT at all.
@pytest.mark.parametrize("targets", ["all-linear", r".*\.(q|v)_proj"], ids=["all-linear", "regex"])
def test_a_str_target_with_layers_to_transform_saves_a_file_peft_loads(targets, ids, tmp_path):
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       layers_to_transform=[1], init_lora_weights=False))
    expected = _out(model, ids)
    lk.save_adapter(model, tmp_path)
    got = _out(PeftModel.from_pretrained(tiny_llama(), tmp_path).eval(), ids)
    assert (got - expected).abs().max() <= 1e-5
    again = lk.load_adapter(tiny_llama(), tmp_path)
    assert (_out(again, ids) - expected).abs().max() <= 1e-5
    assert sorted(again.lorakit.configs["default"].target_modules) == sorted(
        p for p, _ in lk.core.model.adapter_layers(model))
    assert all(".layers.1." in p for p, _ in lk.core.model.adapter_layers(again))


def test_a_peft_file_with_an_empty_layers_to_transform_adapts_every_layer(ids, tmp_path):
    """PEFT reads layers_to_transform=[] as no layer filter (tuners_utils.py: ``is_using_layer_indexes`` is False for
    an empty list) and adapts every layer; lorakit refused its file ("layers_to_transform=[] selects no layer")."""
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[],
                                                             init_lora_weights=False)).eval()
    expected = _out(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    model = lk.load_adapter(tiny_llama(), tmp_path)
    assert len(list(lk.core.model.adapter_layers(model))) == 2
    assert (_out(model, ids) - expected).abs().max() <= 1e-5


def tiny_biogpt(seed: int = 0, dtype=torch.float32):
    """BioGPT: its embedding multiplies its lookup by a Python float ``embed_scale`` (sqrt(hidden); BART-family
    ``*ScaledWordEmbedding`` with scale_embedding too)."""
    from transformers import BioGptConfig, BioGptForCausalLM

    torch.manual_seed(seed)
    cfg = BioGptConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=96, max_position_embeddings=64)
    model = BioGptForCausalLM(cfg).to(dtype).eval()
    assert isinstance(model.biogpt.embed_tokens.embed_scale, float)
    return model


def test_lora_on_a_float_scaled_embedding_identical_to_peft(ids, tmp_path):
    """PEFT scales the embedding LoRA's output by the layer's embed_scale, a float one too (peft/tuners/lora/
    layer.py 0.21.2 Embedding.forward line 1458, ``_get_embed_scale`` peft/tuners/tuners_utils.py:1922-1924). Was:
    lorakit scaled only by a tensor embed_scale (Gemma), so BioGPT's embedding LoRA came out sqrt(32) times too
    small. On half-precision bases bit for bit: the float scale is rounded to the weight's dtype, as PEFT's."""
    _both_ways(tiny_biogpt, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), ids, tmp_path)
    for dtype in (torch.bfloat16, torch.float16):
        _both_ways(tiny_biogpt, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), ids,
                   tmp_path / str(dtype), atol=0, dtype=dtype)
