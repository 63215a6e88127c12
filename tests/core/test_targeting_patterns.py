"""Pattern-like config keys a user types must each select something (issue 10, fault 5); a file's lists are read
leniently on load (fault 6: its tensors say what was trained)."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lk_models import tiny_llama


@pytest.mark.parametrize("kwargs,named,hint", [
    (dict(target_modules=["q_proj", "v_proj"], rank_pattern={"q_prj": 16}), "'q_prj'", "q_proj"),
    (dict(target_modules=["q_proj", "v_proj"], alpha_pattern={"^q_proj": 100}), r"'\^q_proj'", "q_proj"),
    (dict(target_modules=["q_proj"], rank_pattern={"v_proj": 2}), "'v_proj'", None),  # v_proj exists, not targeted
    (dict(target_modules=["q_proj", "v_proj"], exclude_modules=["k_prj"]), "'k_prj'", "k_proj"),
    (dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.k_prj"), "k_prj", None),
    (dict(target_modules=["q_proj"], layers_to_transform=[0, 5]), r"\[5\]", None),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layer"), "'layer'", "layers"),
    (dict(target_modules=["q_proj", "v_prj"]), "'v_prj'", "v_proj"),
    (dict(target_modules=["q_proj"], modules_to_save=["lm_haed"]), "'lm_haed'", "lm_head"),
])
def test_unmatched_keys_are_named_with_near_matches(kwargs, named, hint):
    model = tiny_llama()
    with pytest.raises(lk.TargetError, match=named) as e:
        lk.add_adapter(model, lk.LoraConfig(**kwargs))
    if hint:
        assert hint in str(e.value)
    assert lk.adapter_names(model) == []


def test_matching_patterns_apply():
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                       rank_pattern={"q_proj": 8}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 2},
                                                       exclude_modules=["k_proj"], layers_to_transform=[0, 1],
                                                       layers_pattern="layers"))
    q, v1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.v_proj
    assert q.adapters["default"].units().A.shape[0] == 8
    assert v1.adapters["default"].units().scaling == 2 / 4


def test_file_lists_broader_than_the_model_load(tmp_path, ids):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, rank_pattern={"v_proj": 2},
                                        init_lora_weights=False))
    expected = model(input_ids=ids).logits
    lk.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(target_modules=["q_proj", "v_proj", "c_attn", "query"], rank_pattern={"v_proj": 2, "value": 3},
               alpha_pattern={"c_attn": 5}, modules_to_save=["classifier", "score"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    loaded = lk.load_adapter(tiny_llama(), tmp_path)
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-6)
    assert not any("copies" in n for n, _ in loaded.named_modules())  # no tensors for classifier / score
    from lorakit import serving

    banked = tiny_llama()
    serving.load_adapters(banked, {"f": tmp_path})
    with serving.bank_routing(banked, ["f"] * ids.shape[0]):
        assert torch.allclose(banked(input_ids=ids).logits, expected, atol=1e-5)


@pytest.mark.parametrize("kwargs,says", [
    (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), "exclude_modules=['q_proj']"),
    (dict(target_modules=["q_proj", "v_proj"], modules_to_save=["q_proj"]), "modules_to_save=['q_proj']"),
])
def test_a_target_every_match_of_which_is_excluded_says_so(kwargs, says):
    """A target entry that matched modules which exclude_modules / modules_to_save then removed is not a typo: the
    error says which list removed them (before: "matched no module: 'q_proj' (closest: q_proj, ...)")."""
    model = tiny_llama()
    with pytest.raises(lk.TargetError, match=r"entry 'q_proj' matches modules") as e:
        lk.add_adapter(model, lk.LoraConfig(**kwargs))
    assert says in str(e.value) and "closest" not in str(e.value)
    assert lk.adapter_names(model) == []


@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan"), float("inf")])
def test_alpha_pattern_values_are_checked_by_their_own_name(value):
    """An alpha_pattern value is that module's lora_alpha (PEFT), so it obeys lora_alpha's rule (> 0, finite), and the
    error names alpha_pattern and its key, the field the user wrote (it named lora_alpha)."""
    with pytest.raises(lk.ConfigError, match=r"alpha_pattern\['q_proj'\] must be > 0") as e:
        lk.LoraConfig(target_modules=["q_proj"], alpha_pattern={"q_proj": value})
    assert e.value.field == "LoraConfig.alpha_pattern"
