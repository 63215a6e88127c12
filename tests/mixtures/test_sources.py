"""mixtures.sources: the existing adapters MeteoRA, X-LoRA and the routed LoRAs stack as experts."""

from __future__ import annotations

import pytest

import lorakit as lk
from lk_models import tiny_llama
from lorakit.mixtures.sources import read_lora_source


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_source_relative_to_a_changed_base_is_refused(init, tmp_path):
    """A PiSSA / OLoRA file (PEFT's ``init_lora_weights="pissa"``) holds A, B for the residual base W − s·B₀A₀, but
    an expert adds its s·BA to the untouched base: stacked as it was, the expert was another adapter than the one
    trained. Refused, naming the export that writes it for the untouched base (which is then accepted)."""
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), init=init)
    lk.save_adapter(model, tmp_path / "a")
    with pytest.raises(lk.ConfigError, match=rf"init_lora_weights='{init}'.*lorakit export"):
        read_lora_source(tmp_path / "a")
    lk.save_adapter(model, tmp_path / "plain", original_base=True)
    assert read_lora_source(tmp_path / "plain").config.r == 4


def test_a_source_of_another_base_is_named_by_its_folder(tmp_path):
    """A mixture expert whose factors do not fit the layer (trained on a wider base): the error names the folder
    and the module, not "adapter 1"."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    lk.save_adapter(lk.add_adapter(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"])), tmp_path / "fits")
    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96))
    lk.save_adapter(lk.add_adapter(wide, lk.LoraConfig(r=2, target_modules=["q_proj"])), tmp_path / "wide")
    config = lk.get_method("meteora").config_cls(adapter_paths=[str(tmp_path / "fits"), str(tmp_path / "wide")])
    with pytest.raises(lk.AdapterLoadError, match=rf"source adapter {tmp_path / 'wide'} \(module "
                                                  r"'model.layers.0.self_attn.q_proj'\): LoRA factors"):
        lk.add_adapter(tiny_llama(), config)


def test_a_source_with_trainable_token_rows_is_refused_by_name(tmp_path):
    """A LoRA folder with trainable token rows (``trainable_token_indices``) as a mixture expert: the error says token
    rows are not supported in an expert and names the folder and the tensor. (Was: "is not a linear-layer LoRA
    factor ... (no embeddings, DoRA, biases)", though the rows are no embedding LoRA.)"""
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3]))
    lk.save_adapter(model, tmp_path / "tokens")
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    with pytest.raises(lk.ConfigError, match=rf"source adapter {tmp_path / 'tokens'}: tensor '{key}' holds "
                                             r"trainable token rows .*which a mixture expert does not support"):
        read_lora_source(tmp_path / "tokens")
