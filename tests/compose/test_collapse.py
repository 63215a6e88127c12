"""Collapsing a mixture of LoRA experts (MixLoRA, MoLE) into one plain LoRA loadable by PEFT."""

from __future__ import annotations

import pytest
import torch
from lk_models import tiny_llama
from peft import PeftModel

import lorakit as lk
from lorakit.compose import collapse_experts
from lorakit.core.errors import ConfigError
from lorakit.methods.mixlora import MixLoraConfig
from lorakit.methods.mole import MoleConfig


def _mixture(config, identical_experts: bool):
    model = tiny_llama()
    lk.add_adapter(model, config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name and "router" not in name:
                p.normal_(0, 0.3)
                if identical_experts and p.dim() == 3:  # stacked experts (E, ., .): copy expert 0 everywhere
                    p.copy_(p[:1].expand_as(p))
    return model


@pytest.mark.parametrize("config", [MixLoraConfig(r=4, lora_alpha=8, num_experts=3, top_k=2),
                                    MoleConfig(r=4, lora_alpha=8, num_experts=3)], ids=["mixlora", "mole"])
def test_collapse_of_identical_experts_is_exact(config, ids, tmp_path):
    """With every expert equal, Σ_e w_e FFN_e(x) = FFN_0(x) whatever the router does (weights sum to 1), so the
    collapsed LoRA must reproduce the mixture — and load in real PEFT."""
    model = _mixture(config, identical_experts=True)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = collapse_experts(model).save(tmp_path / "plain")
    with torch.no_grad():
        got = PeftModel.from_pretrained(tiny_llama(), str(out))(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_collapse_uniform_is_the_mean_expert_delta():
    model = _mixture(MixLoraConfig(r=4, lora_alpha=8, num_experts=3, top_k=2), identical_experts=False)
    merged = collapse_experts(model, expert_weights="uniform")
    ffn = model.model.layers[0].mlp.adapters["default"]
    expected = (ffn.lora_B["up_proj"] @ ffn.lora_A["up_proj"]).mean(0) * ffn.scaling  # mean_e s B_e A_e
    sd = merged.state_dict
    key = "base_model.model.model.layers.0.mlp.up_proj."
    torch.testing.assert_close(sd[key + "lora_B.weight"] @ sd[key + "lora_A.weight"], expected, atol=1e-5, rtol=1e-4)
    assert merged.recipe["collapse_of"] == "mixlora"


def test_collapse_routing_weights_need_calibration_and_differ_from_uniform(ids):
    model = _mixture(MixLoraConfig(r=4, lora_alpha=8, num_experts=3, top_k=2), identical_experts=False)
    with pytest.raises(ConfigError, match="calibration"):
        collapse_experts(model, expert_weights="routing")
    routed = collapse_experts(model, expert_weights="routing", calibration=[ids]).state_dict
    uniform = collapse_experts(model).state_dict
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    assert routed[key].shape == uniform[key].shape and not torch.allclose(routed[key], uniform[key])
