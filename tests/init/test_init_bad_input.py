"""Bad input to the data-driven inits (LoRA-GA, EVA, CorDA, LoRA-SB): no batches, a batch iterator that ends
early, batches without labels, a module whose factorisation fails (NaN, rank-deficient). Each is a clear
AdapterError naming the init or the module, and the model (adapter tensors, base weights, config) is left as it was."""

from __future__ import annotations

import re

import pytest
import torch

import lorakit as lk

from lk_models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
DATA_INITS = ["lora_ga", "lora_ga_official", "eva", "corda", "lora_sb"]


def _batches(n=3, length=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (x := torch.randint(0, 96, (2, length), generator=g)), "labels": x.clone()} for _ in range(n)]


def _model(init):
    config = (lk.get_method("lora_xs").config_cls(r=4, target_modules=TARGETS) if init == "lora_sb"
              else lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    return lk.add_adapter(tiny_llama(), config)


def _snapshot(model):
    return ({k: v.clone() for k, v in lk.adapter_state_dict(model).items()},
            {n: p.detach().clone() for n, p in model.named_parameters()},
            model.lorakit.configs["default"])


def _assert_unchanged(model, snapshot):
    adapter, params, config = snapshot
    now = lk.adapter_state_dict(model)
    assert now.keys() == adapter.keys()
    for k, v in adapter.items():
        torch.testing.assert_close(now[k], v, rtol=0, atol=0, equal_nan=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n], rtol=0, atol=0, equal_nan=True)
        assert p.grad is None
    assert model.lorakit.configs["default"] == config and "default" not in model.lorakit.inits


@pytest.mark.parametrize("init", DATA_INITS)
def test_data_driven_init_without_batches(init):
    model = _model(init)
    before = _snapshot(model)
    with pytest.raises(lk.AdapterError, match=rf"init '{init.split('_official')[0]}' is data-driven"):
        lk.init_adapter(model, "default", None, init=init)
    with pytest.raises(lk.AdapterError, match="data-driven"):
        lk.init_adapter(model, "default", iter([]), init=init)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("init", ["lora_ga", "corda", "lora_sb"])
def test_batch_iterator_ending_early(init):
    model = _model(init)
    before = _snapshot(model)
    with pytest.raises(lk.AdapterError, match=r"needs 5 batches \(num_batches=5\) but the batch iterator ended after 3"):
        lk.init_adapter(model, "default", iter(_batches(3)), init=init, num_batches=5)
    _assert_unchanged(model, before)


def test_gradient_init_without_labels_names_the_batch():
    model = _model("lora_ga")
    before = _snapshot(model)
    with pytest.raises(lk.AdapterError, match="needs a loss: batch 0 has no 'labels'"):
        lk.init_adapter(model, "default", [{"input_ids": b["input_ids"]} for b in _batches()], init="lora_ga")
    _assert_unchanged(model, before)


@pytest.mark.parametrize("init,module,what", [
    ("lora_ga", "model.layers.0.self_attn.q_proj", "gradient"),  # a NaN loss: every gradient is NaN, the first named
    ("lora_sb", "model.layers.0.self_attn.q_proj", "gradient"),
    ("corda", "model.layers.1.mlp.down_proj", "inputs"),  # the first adapted layer whose inputs hold the NaN
    ("eva", "model.layers.1.mlp.down_proj", "inputs"),
])
def test_nan_names_the_module_and_leaves_the_model(init, module, what):
    model = _model(init)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    before = _snapshot(model)
    with pytest.raises(lk.AdapterError, match=rf"{what} of (module|layer) '{module}' ha(s|ve) NaN"):
        lk.init_adapter(model, "default", _batches(), init=init)
    _assert_unchanged(model, before)


def test_rank_deficient_gradient_names_the_module():
    """One sequence of 3 tokens: every weight gradient has rank <= 3 < 2r = 8 (LoRA-GA takes 2r directions)."""
    model = _model("lora_ga")
    before = _snapshot(model)
    x = torch.tensor([[5, 9, 11]])
    with pytest.raises(lk.AdapterError, match=r"gradient of module 'model.layers.0.self_attn.q_proj' has rank \d < 8"):
        lk.init_adapter(model, "default", [{"input_ids": x, "labels": x}], init="lora_ga")
    _assert_unchanged(model, before)


def test_unknown_option_values_are_config_errors():
    model = _model("lora_ga")
    with pytest.raises(lk.ConfigError, match="direction='ArBB' is not one of"):
        lk.init_adapter(model, "default", _batches(), init="lora_ga", direction="ArBB")
    with pytest.raises(lk.ConfigError, match="scale='gd' is not one of .*PEFT's names"):
        lk.init_adapter(model, "default", _batches(), init="lora_ga", scale="gd")
    with pytest.raises(lk.ConfigError, match="corda_method must be 'ipm' or 'kpm'"):
        lk.init_adapter(model, "default", _batches(), init="corda", corda_method="pim")


@pytest.mark.parametrize("init", ["pissa", "olora", "corda"])
def test_rank_above_a_layer_names_the_module(init):
    """v_proj is (16, 32): its SVD / QR has min(out, in) = 16 components, fewer than r = 20 (PiSSA, OLoRA and CorDA
    take r of them, arXiv:2404.02948 eq. 2, 2406.01775 §3, 2406.05223 eq. 5). An AdapterError naming the module
    before anything is written (q_proj, 32 x 32, comes first and fits), not a tensor-size RuntimeError."""
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=20, lora_alpha=8, target_modules=TARGETS))
    before = _snapshot(model)
    with pytest.raises(lk.AdapterError, match=r"r=20 .*'model.layers.0.self_attn.v_proj'.*min\(out, in\) = 16"):
        lk.init_adapter(model, "default", _batches(), init=init)
    _assert_unchanged(model, before)


def test_eva_components_above_the_input_size_name_the_module():
    """EVA keeps round(rho·r) principal components of a layer's inputs; PEFT's IncrementalPCA refuses more than the
    input has features (peft/utils/incremental_pca.py ``_validate_data``: "n_components=... invalid for
    n_features=..."). r = 20, rho = 2: 40 components of 32-feature inputs (q_proj / v_proj)."""
    model = _model("eva")
    lk.delete_adapter(model, "default")
    lk.add_adapter(model, lk.LoraConfig(r=20, lora_alpha=8, target_modules=TARGETS))
    before = _snapshot(model)
    with pytest.raises(lk.AdapterError, match=r"40 components .*'model.layers.0.self_attn.q_proj'.* 32 features"):
        lk.init_adapter(model, "default", _batches(), init="eva")
    _assert_unchanged(model, before)


@pytest.mark.parametrize("init,typo,hint", [
    ("eva", "rhoo", "Did you mean: rho?"), ("lora_ga", "stable_gama", "Did you mean: stable_gamma?"),
    ("corda", "method", "Options: corda_method, num_batches"), ("pissa", "niter", "takes no options"),
])
def test_unknown_option_names_are_config_errors(init, typo, hint):
    """A misspelt init option is a ConfigError naming it (not Python's TypeError), from init_adapter and from
    add_adapter's gradient pre-pass (LoRA-GA's estimate)."""
    model = _model(init)
    before = _snapshot(model)
    with pytest.raises(lk.ConfigError, match=rf"unknown option '{typo}' for init '{init}'\..*{hint}"):
        lk.init_adapter(model, "default", _batches(), init=init, **{typo: 1})
    _assert_unchanged(model, before)
    fresh = tiny_llama()
    lk.core.inits.set_init_options(fresh, "default", **{typo: 1})
    with pytest.raises(lk.ConfigError, match=rf"unknown option '{typo}'"):
        lk.add_adapter(fresh, lk.LoraConfig(r=4, target_modules=TARGETS), init=init, init_batches=_batches())
    assert not hasattr(fresh, "lorakit") or not lk.adapter_names(fresh)


@pytest.mark.parametrize("gamma", [0, -16])
def test_lora_ga_stable_gamma_must_be_positive(gamma):
    """The stable scale out^{1/4}/√γ (arXiv:2407.05000 §3.3) needs γ > 0: 0 divided by zero, a negative γ gave a
    complex scale."""
    model = _model("lora_ga")
    before = _snapshot(model)
    with pytest.raises(lk.ConfigError, match=rf"stable_gamma must be > 0, got {gamma}"):
        lk.init_adapter(model, "default", _batches(), init="lora_ga", stable_gamma=gamma)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("method", ["slora", "lora_xs", "nlora", "inttune"])
@pytest.mark.parametrize("init", ["pissa", "olora", "corda"])
def test_base_splitting_inits_refuse_middle_matrix_adapters(method, init):
    """PiSSA / OLoRA / CorDA move s·B A out of the base (PiSSA arXiv:2404.02948 eq. 2-4: W = W_res + B A), which keeps
    the output only when the adapter's delta is s·B A. A B·M·A adapter's delta is s·B M A: the init must be refused,
    with no adapter left and an untouched base (before, PiSSA / OLoRA changed the base while the adapter kept its own
    init, so the model's output moved at step 0)."""
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(lk.LorakitError, match=rf"init '{init}'"):
        lk.add_adapter(model, lk.get_method(method).config_cls(r=4, target_modules=TARGETS), init=init,
                       init_batches=_batches(1))
    assert lk.adapter_names(model) == []
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def test_split_base_weight_refuses_computed_units():
    """The delta-level guard under Init.fits: split_base_weight on a delta whose units are computed (B·M·A reports
    A = M A) names the module instead of subtracting s·B A from the base while writing a copy."""
    from lorakit.init.weight_split import pissa_factors, split_base_weight

    model = lk.add_adapter(tiny_llama(), lk.get_method("slora").config_cls(r=4, target_modules=TARGETS))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(lk.AdapterError, match=r"model\.layers\.0\.self_attn\.q_proj.*no trainable B A factors"):
        split_base_weight(model, "default", pissa_factors, "pissa")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def test_add_adapter_leaves_no_adapter_when_its_init_fails():
    """add_adapter is all or nothing (its docstring): an init that fails after the adapter is attached (PiSSA on a
    base weight with a NaN, found when it factorises) removes the adapter again. Before, 'default' stayed attached,
    so a retry with another init failed with 'adapter already exists'."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(lk.AdapterError, match=r"model\.layers\.1\.self_attn\.v_proj"):
        lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=TARGETS), init="pissa")
    assert lk.adapter_names(model) == []
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj"]), init="pissa")  # the retry works


@pytest.mark.parametrize("typo, hint", [("Gaussian", "gaussian"), ("gausian", "gaussian"), ("orthogonl", "orthogonal"),
                                        ("pisa", "pissa")])
def test_misspelt_init_lora_weights_lists_the_builtin_values_near_it(typo, hint):
    # PEFT's LoraConfig.init_lora_weights takes "gaussian" / "orthogonal" (peft/tuners/lora/config.py: the Literal of
    # init_lora_weights); a typo of one must name it, as a typo of a registered init names that init
    from peft import LoraConfig as PeftLoraConfig

    PeftLoraConfig(r=4, init_lora_weights=hint)  # the value the hint names is one PEFT takes
    with pytest.raises(lk.ConfigError, match=f"Did you mean: [^?]*\\b{hint}\\b"):
        lk.LoraConfig(r=4, init_lora_weights=typo)


@pytest.mark.parametrize("init, option, value, expected", [
    ("eva", "rho", "2", "float"), ("eva", "tau", [0.9], "float"), ("eva", "whiten", "yes", "bool"),
    ("lora_ga", "stable_gamma", "16", "float"), ("loftq", "loftq_iter", 1.5, "int"), ("loftq", "loftq_bits", True, "int"),
])
def test_init_options_of_the_wrong_type_are_config_errors_naming_the_option(init, option, value, expected):
    # the types PEFT gives these options: EvaConfig.rho / tau: float, whiten: bool; LoftQConfig.loftq_bits / loftq_iter:
    # int (peft/tuners/lora/config.py); lorakit's run_* signatures carry the same annotations
    import dataclasses

    from peft.tuners.lora.config import EvaConfig, LoftQConfig

    peft_fields = {f.name: str(f.type) for c in (EvaConfig, LoftQConfig) for f in dataclasses.fields(c)}
    if option in peft_fields:
        assert expected in peft_fields[option]
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    before = _snapshot(model)
    with pytest.raises(lk.ConfigError, match=f"option '{option}' of init '{init}' must be {expected}.*got {re.escape(repr(value))}"):
        lk.init_adapter(model, "default", _batches(4), init=init, **{option: value})
    _assert_unchanged(model, before)


def test_a_gradient_init_on_a_4bit_base_names_the_module_and_attaches_nothing():
    # LoRA-SB needs dL/dW of each full weight (arXiv:2411.19557, eq. for the first full-FT step); 4-bit codes
    # (uint8) cannot take a gradient: a clear error naming the module, not torch's RuntimeError mid-pass
    from lorakit.quantize.nf4 import quantize_model

    model = quantize_model(tiny_llama(), "nf4")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    config = lk.get_method("lora_xs").config_cls(r=4, target_modules=TARGETS)
    with pytest.raises(lk.AdapterError, match=r"init 'lora_sb' needs the gradient .* module 'model\.layers\.0\.self_attn"
                                              r"\.q_proj' stores its weight as torch\.uint8 codes"):
        lk.add_adapter(model, config, init="lora_sb", init_batches=_batches(2))
    assert not any("lora" in n for n, _ in model.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]) and p.requires_grad == flags[n] and p.grad is None
