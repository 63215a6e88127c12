"""EVA (``lorakit/init/eva.py``) against the installed ``peft``'s ``initialize_lora_eva_weights``
(peft/tuners/lora/eva.py ``get_eva_state_dict`` + ``_load_eva_state_dict``, peft/utils/incremental_pca.py) on the
same batches: same A per layer, same rank_pattern / alpha_pattern, and a file PEFT loads."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.tuners.lora.eva import initialize_lora_eva_weights

import lorakit as lk
from lorakit.core.model import adapter_layers

from lk_models import tiny_llama


def _batches(n=6, seed=1, mask_prompt=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 96, (4, 16), generator=g)
        labels = x.clone()
        if mask_prompt:
            labels[:, :3] = -100
        attention = torch.ones_like(x)
        attention[0, -2:] = 0  # a padded row
        out.append({"input_ids": x, "attention_mask": attention, "labels": labels})
    return out


def _pair(targets, batches, r=4, **eva):
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=r, lora_alpha=8, target_modules=targets,
                                                              init_lora_weights="eva", eva_config=peft.EvaConfig(**eva)))
    initialize_lora_eva_weights(ref, batches, show_progress_bar=False)
    ours = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=r, lora_alpha=8, target_modules=targets, init_lora_weights="eva"))
    lk.init_adapter(ours, "default", batches, **eva)
    return ours, ref


@pytest.mark.parametrize("targets,r,eva", [
    (["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], 4, {}),  # q/k/v and gate/up share inputs
    (["q_proj", "down_proj"], 4, {"rho": 4.0, "whiten": True}),
    (["o_proj", "down_proj"], 1, {"rho": 8.0, "tau": 0.95, "use_label_mask": False}),
    (["q_proj", "v_proj"], 4, {"rho": 1.0, "adjust_scaling_factors": False}),
])
def test_eva_matches_peft_on_the_same_batches(targets, r, eva):
    batches = _batches()
    ours, ref = _pair(targets, batches, r=r, **eva)
    ours_sd, ref_sd = lk.adapter_state_dict(ours), peft.get_peft_model_state_dict(ref)
    assert ours_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(ours_sd[k], ref_sd[k], atol=1e-5, rtol=1e-4)
    ours_c, ref_c = ours.lorakit.configs["default"], ref.peft_config["default"]
    assert ours_c.rank_pattern == ref_c.rank_pattern and ours_c.alpha_pattern == ref_c.alpha_pattern
    assert sorted(ours_c.target_modules) == sorted(ref_c.target_modules)
    ids = batches[0]["input_ids"]
    with torch.no_grad():  # B = 0: the model is unchanged at step 0
        torch.testing.assert_close(ours(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)


def test_eva_file_loads_in_peft_and_lorakit(tmp_path):
    batches = _batches()
    ours, _ = _pair(["q_proj", "down_proj"], batches, rho=4.0)
    with torch.no_grad():
        for _, layer in adapter_layers(ours):  # stand-in for training: make B non-zero
            layer.adapters["default"].lora_B.weight.normal_(0, 0.05)
    lk.save_adapter(ours, tmp_path / "eva")
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "eva")
        torch.testing.assert_close(in_peft(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(lk.load_adapter(tiny_llama(), tmp_path / "eva")(input_ids=ids).logits, want,
                                   atol=1e-5, rtol=0)


def test_eva_trains_and_reports_bad_options():
    batches = _batches()
    ours, _ = _pair(["q_proj", "down_proj"], batches, rho=4.0)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(lk.ConfigError, match="rho must be >= 1.0"):
        lk.init_adapter(model, "default", batches, init="eva", rho=0.5)


def test_eva_that_does_not_converge_names_the_layers_and_changes_nothing():
    batches = _batches(n=2)
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in lk.adapter_state_dict(model).items()}
    with pytest.raises(lk.AdapterError, match=r"layer\(s\) \['model.layers.0.self_attn.q_proj'.*did not converge"):
        lk.init_adapter(model, "default", batches, init="eva", tau=1.0, max_passes=1)
    after = lk.adapter_state_dict(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.lorakit.configs["default"].init_lora_weights is True and "default" not in model.lorakit.inits


def test_a_peft_eva_file_loads_in_lorakit(tmp_path):
    """PEFT fills ``eva_config`` whenever init_lora_weights="eva" (peft/tuners/lora/config.py ``__post_init__``), so
    every EVA adapter PEFT saves records it; lorakit refused them all ("'eva_config' asks for a feature lorakit's
    'lora' method does not support"). The settings describe the data pass whose result the file holds: the file
    loads, with PEFT's outputs, and EVA is not run again."""
    batches = _batches()
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                              init_lora_weights="eva",
                                                              eva_config=peft.EvaConfig(rho=4.0, whiten=True)))
    initialize_lora_eva_weights(ref, batches, show_progress_bar=False)
    with torch.no_grad():
        for name, p in ref.named_parameters():  # stand-in for training: make B non-zero
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ref.save_pretrained(tmp_path / "peft")
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        ours = lk.load_adapter(tiny_llama(), tmp_path / "peft", is_trainable=True)
        torch.testing.assert_close(ours(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    assert not lk.core.inits.init_pending(ours, "default")  # the training loop will not redo EVA over the file


def test_eva_settings_given_as_a_config_keyword_say_where_they_go():
    """As a constructor keyword PEFT's eva_config would set the data pass: lorakit takes those settings as init
    options, and says so (not "a feature lorakit does not support", nor silently dropped)."""
    with pytest.raises(lk.ConfigError, match=r"eva_config.*init options.*init_adapter"):
        lk.LoraConfig(init_lora_weights="eva", eva_config={"rho": 4.0})
