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


def test_collapse_with_a_truncating_dense_method_reads_svd_rank():
    """``ties_svd`` with ``svd_rank`` (what merge_adapters accepts) was refused as 'svd_rank has no effect on
    ties': collapse_experts checked the options without the ``_svd`` form's truncation. The result is mergekit's
    TIES on the expert deltas (merge_methods/generalized_task_arithmetic.py merge_group on base + ΔW_e, weights
    p_e = 1/3, density 0.5) truncated to its best rank-2 approximation."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    model = _mixture(MixLoraConfig(r=4, lora_alpha=8, num_experts=3, top_k=2), identical_experts=False)
    merged = collapse_experts(model, "default", "ties_svd", density=0.5, svd_rank=2)
    ffn = model.model.layers[0].mlp.adapters["default"]
    with torch.no_grad():
        deltas = ffn.lora_B["up_proj"] @ ffn.lora_A["up_proj"] * ffn.scaling  # (E, out, in)
        base = torch.randn(deltas.shape[1:])
        group = TensorGroup.from_tensors([base, *(base + d for d in deltas)], base_index=0)
        ids = [e.id for e in group.non_base]
        ties = registry.get("ties").merge_group(
            group, weight={i: 1 / 3 for i in ids}, density={i: 0.5 for i in ids}, normalize=True, **{"lambda": 1.0},
            rescale=False, int8_mask=False) - base
    u, s, vh = torch.linalg.svd(ties)
    expected = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]  # Eckart–Young: the best rank-2 approximation
    key = "base_model.model.model.layers.0.mlp.up_proj."
    sd = merged.state_dict
    assert sd[key + "lora_A.weight"].shape[0] == 2
    torch.testing.assert_close(sd[key + "lora_B.weight"] @ sd[key + "lora_A.weight"], expected, atol=1e-5, rtol=1e-4)


def test_collapse_refuses_dora_instead_of_dropping_its_magnitudes():
    """A DoRA adapter's units are only its low-rank part: copied as a plain LoRA, the result lost the magnitudes'
    row scaling (logits off by 5e-3 on the tiny Llama, silently)."""
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="is DoRA.*merge_adapters"):
        collapse_experts(model)
