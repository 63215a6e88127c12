"""merge_adapters: exact for every LoRA variant, checked against the real ``peft`` package.

References: a source adapter's own output in PEFT (``PeftModel.from_pretrained``), and several adapters active
together in PEFT (``base_model.set_adapter([...])``: y = W x + Σ_a Δ_a(x), peft/tuners/lora/layer.py
``Linear.forward`` loops over active adapters and adds each result) — the layer-wise sum that ``cat`` must equal.
"""

from __future__ import annotations

import json

import pytest
import torch
from compose.helpers import make_adapter, peft_all_active
from lk_models import tiny_bert, tiny_llama

import lorakit as lk
from lorakit.compose import METHODS, list_merge_methods, merge_adapters
from lorakit.core.errors import ConfigError

VARIANTS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora_patterns": dict(r=6, lora_alpha=3, use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 5}),
    "lora_bias": dict(r=3, lora_alpha=6, lora_bias=True),
    "dora": dict(r=3, lora_alpha=3, use_dora=True),
    "embedding": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj", "down_proj"]),
    "dora_embedding": dict(r=3, lora_alpha=6, use_dora=True, target_modules=["embed_tokens", "v_proj"]),
}
LINEAR_FAMILY = {n for n, m in METHODS.items() if m.coefficients is not None}


def peft_output(paths, ids, weights=None):
    """Output of the tiny Llama with every adapter in ``paths`` loaded and active in real PEFT."""
    model = peft_all_active(tiny_llama, paths)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    return {name: make_adapter(tiny_llama, d / name, seed, **cfg) for seed, (name, cfg) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def source_outputs(sources):
    """``outputs(variant, ids)``: PEFT's output with source ``variant`` alone, computed once per variant and ids for
    the module (every merge method's case compares with it; the tensors are read, never written)."""
    cache: dict[tuple, torch.Tensor] = {}

    def outputs(variant: str, ids: torch.Tensor) -> torch.Tensor:
        key = (variant, tuple(ids.shape), tuple(ids.flatten().tolist()))
        if key not in cache:
            cache[key] = peft_output([sources[variant]], ids)
        return cache[key]

    return outputs


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", list_merge_methods())
def test_one_adapter_weight_one_reproduces_it(method, variant, sources, source_outputs, ids, tmp_path):
    if variant.startswith("dora") and METHODS[method.removesuffix("_svd")].coefficients is None:
        with pytest.raises(ConfigError, match="DoRA"):
            merge_adapters([sources[variant]], [1.0], method, model=tiny_llama())
        return
    out = merge_adapters([sources[variant]], [1.0], method, model=tiny_llama()).save(tmp_path / "merged")
    expected = source_outputs(variant, ids)
    torch.testing.assert_close(peft_output([out], ids), expected, atol=2e-5, rtol=1e-4)


def test_cat_equals_sum_of_adapters_outputs(sources, ids, tmp_path):
    # DoRA first: PEFT's DoRA forward rescales the running result it is given (base + earlier adapters' deltas,
    # peft/tuners/lora/variants.py DoraLinearVariant.forward: base_result = result), so only as the first active
    # adapter does it add its own Δ(x) to a plain base output.
    names = ["dora", "plain", "rslora_patterns"]
    paths = [sources[n] for n in names]
    merged = merge_adapters(paths, None, "cat", model=tiny_llama())
    assert merged.config.r == 4 + 6 + 3 and merged.config.use_dora
    out = merged.save(tmp_path / "cat")
    torch.testing.assert_close(peft_output([out], ids), peft_output(paths, ids), atol=2e-5, rtol=1e-4)
    # lorakit loads it too, with the same outputs
    model = tiny_llama()
    lk.load_adapter(model, out)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, peft_output(paths, ids), atol=2e-5, rtol=1e-4)


def _scaled_copy(src, dst, w):
    """A copy of a plain/bias LoRA folder whose ΔW (and bias) is multiplied by w (B and its bias scaled)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    t = load_file(src / "adapter_model.safetensors")
    save_file({k: v * w if ".lora_B." in k else v for k, v in t.items()}, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "cat", "svd"])
def test_weighted_linear_merge_equals_weighted_sum(method, sources, ids, tmp_path):
    names, weights = ["plain", "rslora_patterns", "lora_bias"], [0.7, -1.3, 0.4]  # negative: task arithmetic
    paths = [sources[n] for n in names]
    rank = {"svd_rank": 4 + 6 + 3} if method == "svd" else {}
    merged = merge_adapters(paths, weights, method, model=tiny_llama(), **rank).save(tmp_path / "m")
    scaled = [_scaled_copy(p, tmp_path / f"s{i}", w) for i, (p, w) in enumerate(zip(paths, weights))]
    torch.testing.assert_close(peft_output([merged], ids), peft_output(scaled, ids), atol=2e-5, rtol=1e-4)


def _delta(merged, key_part):
    sd = merged.state_dict
    a = next(v for k, v in sd.items() if key_part in k and "lora_A" in k)
    b = next(v for k, v in sd.items() if key_part in k and "lora_B.weight" in k)
    return b @ a


@pytest.mark.parametrize("method", [n for n, m in METHODS.items() if m.linear_in_weights] + ["dare_linear"])
def test_weights_scale_linearly(method, sources):
    paths = [sources["plain"], sources["lora_bias"]]
    kw = dict(model=tiny_llama(), seed=3, **({} if METHODS[method].low_rank else {"density": 0.5}))
    one = _delta(merge_adapters(paths, [0.5, 1.5], method, **kw), "layers.0.self_attn.q_proj")
    three = _delta(merge_adapters(paths, [1.5, 4.5], method, **kw), "layers.0.self_attn.q_proj")
    torch.testing.assert_close(three, 3 * one, atol=1e-5, rtol=1e-4)
    if METHODS[method].coefficients is not None:  # additive too: f(w + v) = f(w) + f(v)
        other = _delta(merge_adapters(paths, [1.0, 3.0], method, **kw), "layers.0.self_attn.q_proj")
        torch.testing.assert_close(three, one + other, atol=1e-5, rtol=1e-4)


def test_dora_with_a_sparsifying_method_or_lora_bias_is_refused(sources):
    with pytest.raises(ConfigError, match="DoRA sources can be merged exactly only by linear") as err:
        merge_adapters([sources["dora"], sources["plain"]], None, "ties", model=tiny_llama(), density=0.5)
    # it advised "export the DoRA adapters to plain LoRA first", but export writes a DoRA adapter as DoRA (PEFT's
    # own format), so following the advice gave this error again
    assert "plain LoRA first" not in str(err.value)
    with pytest.raises(ConfigError, match="lora_bias=True with DoRA"):
        merge_adapters([sources["dora"], sources["lora_bias"]], None, "cat", model=tiny_llama())


@pytest.mark.parametrize("method", ["linear", "svd"])
def test_weighted_dora_merge_equals_weighted_sum_of_forwards(method, sources, ids, tmp_path):
    """DoRA merged in weight space: y = W x + Σ w_i Δ_i(x), Δ_i the PEFT DoRA forward's additive part, computed
    from PEFT's own per-adapter outputs (y_i − y_base at the logits is not additive, so compare one layer)."""
    from peft import PeftModel as PM

    paths, weights = [sources["dora"], sources["plain"]], [0.6, -0.8]
    rank = {"svd_rank": 7} if method == "svd" else {}
    merged = merge_adapters(paths, weights, method, model=tiny_llama(), **rank).save(tmp_path / "m")
    x = torch.randn(3, 32)

    def layer_out(path_list, ws):
        total = 0
        for p, w in zip(path_list, ws):
            pm = PM.from_pretrained(tiny_llama(), str(p))
            layer = pm.base_model.model.model.layers[0].self_attn.q_proj
            with torch.no_grad():
                total = total + w * (layer(x) - layer.base_layer(x))
        return layer.base_layer(x) + total

    torch.testing.assert_close(layer_out([merged], [1.0]), layer_out(paths, weights), atol=2e-5, rtol=1e-4)


def test_recipe_recorded_and_file_loads_in_lorakit(sources, tmp_path):
    out = lk.merge_adapters_to(tmp_path / "m", [sources["plain"], sources["lora_bias"]], [0.5, 0.5], "ties",
                               model=tiny_llama(), density=0.3)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lorakit_merge"]["method"] == "ties" and cfg["lorakit_merge"]["weights"] == [0.5, 0.5]
    assert cfg["lorakit_merge"]["options"]["density"] == 0.3 and cfg["peft_type"] == "LORA"
    assert lk.read_adapter_config(out).r >= 1
    lk.load_adapter(tiny_llama(), out)


def test_ties_svd_truncates_to_svd_rank(sources):
    merged = merge_adapters([sources["plain"], sources["lora_bias"]], None, "ties_svd", model=tiny_llama(),
                            density=0.5, svd_rank=2)
    assert merged.config.r == 2 and not merged.config.rank_pattern


def test_bad_inputs_have_clear_errors(sources):
    with pytest.raises(ConfigError, match="Did you mean: ties"):
        merge_adapters([sources["plain"]], None, "tie", model=tiny_llama())
    with pytest.raises(ConfigError, match="one weight per source"):
        merge_adapters([sources["plain"]], [1.0, 2.0], "linear", model=tiny_llama())
    with pytest.raises(ConfigError, match="density"):
        merge_adapters([sources["plain"]], None, "ties", model=tiny_llama(), density=1.5)
    with pytest.raises(ConfigError, match="unknown option 'desnity'.*Did you mean: density"):
        merge_adapters([sources["plain"]], None, "ties", model=tiny_llama(), desnity=0.5)


def test_modules_to_save_rule(tmp_path):
    ids = torch.randint(0, 96, (2, 5))

    def bert_adapter(path, seed, perturb):
        model = tiny_bert()
        torch.manual_seed(seed)
        lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"],
                                            init_lora_weights=False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".copies." in n and perturb:
                    p.add_(torch.randn_like(p))
        lk.save_adapter(model, path)
        return path

    a, b, c = bert_adapter(tmp_path / "a", 0, True), bert_adapter(tmp_path / "b", 1, True), bert_adapter(tmp_path / "c", 2, False)
    with pytest.raises(ConfigError, match="saved_modules='first'"):
        merge_adapters([a, b], None, "linear", model=tiny_bert())
    first = merge_adapters([a, b], None, "linear", model=tiny_bert(), saved_modules="first").state_dict
    ref = lk.adapter_state_dict(lk.load_adapter(tiny_bert(), a))
    assert torch.equal(first["base_model.model.classifier.weight"], ref["base_model.model.classifier.weight"])
    merged = merge_adapters([a, b], [0.5, 0.5], "linear", model=tiny_bert(), saved_modules="merge").state_dict
    base_w = tiny_bert().classifier.weight
    ref_b = lk.adapter_state_dict(lk.load_adapter(tiny_bert(), b))["base_model.model.classifier.weight"]
    torch.testing.assert_close(merged["base_model.model.classifier.weight"],
                               base_w + 0.5 * (ref["base_model.model.classifier.weight"] - base_w) + 0.5 * (ref_b - base_w))
    # copies that agree (both untouched) need no rule
    merge_adapters([c, c], None, "linear", model=tiny_bert())


def test_peft_sequence_classification_adapters_merge_and_load_back_in_peft(tmp_path):
    """PEFT's SEQ_CLS task type writes modules_to_save ["classifier", "classifier", "score"] (a BERT has no
    `score`); the sources loaded, but building the result refused the list ("modules_to_save entry 'score' matched
    no module"), so no PEFT classification adapter could be merged. Reference: saved_modules="merge" is
    θ_base + Σ w_i (θ_i − θ_base) (docs/merging.md), on the real PEFT models' classifier copies."""
    from peft import LoraConfig, PeftModel, get_peft_model

    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    heads = []
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        peft_model = get_peft_model(tiny_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=["query"],
                                                             task_type="SEQ_CLS", init_lora_weights=False))
        head = peft_model.base_model.model.classifier.modules_to_save["default"]
        with torch.no_grad():
            head.weight.add_(0.1 * torch.randn_like(head.weight))
        heads.append(head.weight.detach().clone())
        peft_model.save_pretrained(str(tmp_path / name))
    out = merge_adapters([tmp_path / "a", tmp_path / "b"], [0.3, 0.7], "linear", model=tiny_bert(),
                         saved_modules="merge").save(tmp_path / "m")
    merged = PeftModel.from_pretrained(tiny_bert(), str(out)).eval()
    base_w = tiny_bert().classifier.weight.detach()
    torch.testing.assert_close(merged.base_model.model.classifier.modules_to_save["default"].weight,
                               base_w + 0.3 * (heads[0] - base_w) + 0.7 * (heads[1] - base_w))
    ours = lk.load_adapter(tiny_bert(), out)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_gpt2_conv1d_weighted_merge_equals_weighted_sum_in_peft(tmp_path, ids):
    """GPT-2 stores Conv1D weights as (in, out) (fan_in_fan_out): the merged file must say so and act the same."""
    from lk_models import tiny_gpt2

    paths = [make_adapter(tiny_gpt2, tmp_path / f"g{i}", i, r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"])
             for i in range(2)]
    out = merge_adapters(paths, [1.0, 1.0], "linear", model=tiny_gpt2()).save(tmp_path / "m")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True

    def run(path_list):
        model = peft_all_active(tiny_gpt2, path_list)
        with torch.no_grad():
            return model(input_ids=ids).logits

    torch.testing.assert_close(run([out]), run(paths), atol=2e-5, rtol=1e-4)


def test_a_mixture_source_is_refused_and_nothing_stays_loaded(sources, tmp_path):
    from lorakit.methods.mixlora import MixLoraConfig

    mix = tiny_llama()
    lk.add_adapter(mix, MixLoraConfig(r=2, lora_alpha=4, num_experts=2, top_k=1))
    lk.save_adapter(mix, tmp_path / "mix")
    model = tiny_llama()
    with pytest.raises(ConfigError, match="collapse_experts"):
        merge_adapters([sources["plain"], tmp_path / "mix"], None, "linear", model=model)
    assert lk.adapter_names(model) == []


def test_merging_onto_a_model_leaves_its_active_adapters_as_they_were(sources):
    """Folder sources load onto the caller's model temporarily; removing them activates none of the caller's
    adapters. Was: the first source, active on a model with none active, was deleted last and delete_adapter (as
    PEFT's) activated 'mine' in its place, with a warning."""
    import warnings

    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["v_proj"]), "mine")
    lk.set_adapter(model, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_adapters([sources["plain"], sources["lora_bias"]], None, "linear", model=model)
    assert lk.adapter_names(model) == ["mine"] and lk.core.model.adapter_state(model).active == []


@pytest.mark.parametrize("method", ["linear", "svd", "dare_linear", "magnitude_prune", "breadcrumbs"])
def test_normalize_counts_sources_that_do_not_adapt_a_module(method, tmp_path):
    """A source that does not adapt a module contributes ΔW = 0 there, and its weight still counts in Σ w:
    mergekit's linear is Σ w_i θ_i / Σ w_i over every model (mergekit/merge_methods/linear.py, normalize), and with
    full weights every model has every tensor. At density 1 (no sparsification) the normalised merge of p (q, v)
    and p2 (q only) at v_proj is w_1 ΔW_1 / (w_1 + w_2) — it was ΔW_1 (divided by the present weights only)."""
    p1 = make_adapter(tiny_llama, tmp_path / "p1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    p2 = make_adapter(tiny_llama, tmp_path / "p2", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"])
    alone = _delta(merge_adapters([p1], [1.0], "linear", model=tiny_llama()), "layers.0.self_attn.v_proj")
    dense = {} if METHODS[method].low_rank else {"density": 1.0}
    merged = merge_adapters([p1, p2], [1.0, 3.0], method, model=tiny_llama(), normalize=True, **dense)
    got = _delta(merged, "layers.0.self_attn.v_proj")
    expected = alone * (1.0 / (1.0 + 3.0))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("option", [{"density": 0.0}, {"select_topk": 0.0}])
def test_options_that_keep_nothing_are_refused(option, sources):
    """density 0 (DARE/TIES/...) or select_topk 0 (SCE) would write an all-zero adapter: an error instead."""
    with pytest.raises(ConfigError, match="all-zero adapter"):
        merge_adapters([sources["plain"], sources["lora_bias"]], None, "sce" if "select_topk" in option else "ties",
                       model=tiny_llama(), **option)


@pytest.mark.parametrize("option,flag", [({"density": 2.0}, "density"), ({"select_topk": 1.5}, "select_topk")])
def test_a_fraction_above_one_is_refused_as_a_fraction(option, flag):
    """Was: 'density must be in (0, 1], got 2.0: density 0 keeps no entry' (the reason for 0, not for 2)."""
    from lorakit.compose.methods import MergeOptions

    with pytest.raises(ConfigError, match=rf"^{flag} must be in \(0, 1\], got [\d.]+: it is the fraction of entries "
                                          rf"(kept, 1 keeps|selected, 1 selects) them all\.$"):
        MergeOptions(**option)


@pytest.mark.parametrize("option,field", [
    ({"lambda_": float("nan")}, "lambda_"), ({"lambda_": float("inf")}, "lambda_"),  # was a LinAlgError from the SVD
    ({"gamma": -0.5}, "gamma"),  # breadcrumbs kept no entry: an all-zero adapter, written silently
    ({"gamma": float("nan")}, "gamma"),  # was 'cannot convert float NaN to integer'
    ({"epsilon": -0.1}, "epsilon"),  # DELLA inverted: the larger entries dropped more often
    ({"epsilon": float("nan")}, "epsilon"),  # was torch.bernoulli's 'Expected p_in >= 0 && p_in <= 1'
    ({"svd_rank": 2.5}, "svd_rank"), ({"svd_rank": True}, "svd_rank"),  # a TypeError from slicing / rank 1
    ({"normalize": "no"}, "normalize"),  # a truthy string normalised
    ({"rank_tolerance": -1.0}, "rank_tolerance"),
])
def test_option_values_outside_their_domain_are_refused(option, field):
    """DELLA (Deep et al. arXiv:2406.11617 §3, mergekit sparsify.della_magprune) keeps entries with probabilities
    in [density − ε, density + ε], the larger ones more often: ε ≥ 0. Breadcrumbs (mergekit
    sparsify.magnitude_outliers) drops the gamma fraction of largest entries: 0 ≤ gamma < 1."""
    from lorakit.compose.methods import MergeOptions

    with pytest.raises(ConfigError, match=rf"^{field} must be") as err:
        MergeOptions(**option)
    assert err.value.field == field


def test_cli_option_outside_its_domain_is_an_error_naming_the_flag(sources, tmp_path, capsys):
    from lorakit.cli import main

    assert main(["merge-adapters", str(sources["plain"]), "--lambda", "nan", "--output", str(tmp_path / "m")]) == 2
    assert "--lambda must be a finite, non-zero number, got nan" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def _named_llama(name: str, **config):
    """A tiny Llama whose recorded name (``name_or_path``, saved as the adapter's base) is ``name``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=96, max_position_embeddings=64)
    model = LlamaForCausalLM(LlamaConfig(**{**cfg, **config})).eval()
    model.config._name_or_path = name
    return model


def test_sources_of_another_base_are_named_before_any_model_loads(tmp_path):
    """A first source from another base used to surface as missing / unmatched tensors of the second one."""
    from lorakit.core.errors import AdapterError

    narrow = make_adapter(lambda: _named_llama("base-32"), tmp_path / "narrow", 0, r=2)
    wide = make_adapter(lambda: _named_llama("base-48", hidden_size=48), tmp_path / "wide", 1, r=4)
    with pytest.raises(AdapterError, match=r"different base models: .*narrow' on 'base-32' and .*wide' on 'base-48' "
                                           r"\(module 'model\.layers\.0\.[^']*': [^)]*32 in the first, [^)]*48 in the second\)"):
        merge_adapters([narrow, wide])  # no model: it would be loaded from the first source's base


@pytest.mark.parametrize("order", ["shallow_first", "deep_first"])
def test_a_source_that_fails_to_load_on_another_base_says_so_first(order, tmp_path):
    """Same widths, another depth: no shape tells them apart, so the failed load names the bases first."""
    from lorakit.core.errors import AdapterLoadError
    from lorakit.core.model import adapter_names

    shallow = make_adapter(lambda: _named_llama("base-2-layers"), tmp_path / "shallow", 0, r=2)
    deep = make_adapter(lambda: _named_llama("base-3-layers", num_hidden_layers=3), tmp_path / "deep", 1, r=2)
    sources, model = ([shallow, deep], _named_llama("base-2-layers")) if order == "shallow_first" else \
        ([deep, shallow], _named_llama("base-3-layers", num_hidden_layers=3))
    other, ours = ("base-3-layers", "base-2-layers") if order == "shallow_first" else ("base-2-layers", "base-3-layers")
    with pytest.raises(AdapterLoadError, match=rf"^source '{sources[1]}' was trained on base '{other}', not on the "
                                               rf"merge's base '{ours}'; .*loading it failed"):
        merge_adapters(sources, model=model)
    assert adapter_names(model) == []


def test_a_source_recording_no_base_that_does_not_fit_says_to_pass_the_model(tmp_path):
    """peft on a model built from a config saves base_model_name_or_path null; merged without a model, the source
    met the bundled base and the error was only 8 missing tensors, with no word of the base."""
    from peft import LoraConfig, get_peft_model

    from lorakit.core.errors import AdapterLoadError

    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "a"))
    with pytest.raises(AdapterLoadError, match=r"records no base model .* does not fit the merge's base 'bundled'; "
                                               r"pass the model it was trained on .*loading it failed"):
        merge_adapters([tmp_path / "a"])
    merge_adapters([tmp_path / "a"], model=tiny_llama())  # with its model it merges


def _trained_with_init(path, init, seed):
    """A LoRA saved as PEFT saves PiSSA / OLoRA adapters (``init_lora_weights="pissa"``: the file's A, B are
    relative to the residual base the init leaves), its factors moved away from the init as training would."""
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]),
                   init=init)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    lk.save_adapter(model, path)
    return path


def _peft_delta_weights(path):
    """{weight name: ΔW} of a saved adapter relative to the untouched base, from real PEFT (which re-runs PiSSA /
    OLoRA on the fresh base when it loads the file, then merge_and_unload)."""
    from peft import PeftModel

    base = tiny_llama().state_dict()
    with torch.no_grad():
        merged = PeftModel.from_pretrained(tiny_llama(), str(path)).merge_and_unload().state_dict()
    return {k: merged[k] - base[k] for k in base}


@pytest.mark.parametrize("method", ["linear", "cat", "svd", "ties", "dare_linear"])
def test_sources_initialised_from_the_base_weights_merge_as_their_forward(method, tmp_path, ids):
    """PiSSA / OLoRA move W's principal part into the adapter and leave W − s·B₀A₀ as the base, so a source's ΔW
    relative to the original base is s·(BA − B₀A₀), not s·BA. The merge result, a plain LoRA for the original
    base, dropped the −s·B₀A₀ part (max logit error ~10 on the bundled model). Reference: real PEFT's output of
    the source, and for two sources the weighted sum of their PEFT deltas (merge_and_unload)."""
    pissa = _trained_with_init(tmp_path / "pissa", "pissa", 1)
    olora = _trained_with_init(tmp_path / "olora", "olora", 2)
    options = {"svd_rank": 6} if method == "svd" else {}  # ΔW = s·[B, −B₀][A; A₀] has rank 2r
    one = merge_adapters([pissa], [1.0], method, model=tiny_llama(), **options).save(tmp_path / "one")
    torch.testing.assert_close(peft_output([one], ids), peft_output([pissa], ids), atol=2e-5, rtol=1e-4)
    if method not in LINEAR_FAMILY:
        return
    weights = [0.7, -0.4]
    rank = {"svd_rank": 12} if method == "svd" else {}
    two = merge_adapters([pissa, olora], weights, method, model=tiny_llama(), **rank).save(tmp_path / "two")
    deltas = [_peft_delta_weights(p) for p in (pissa, olora)]
    expected = tiny_llama()
    with torch.no_grad():
        for k, v in expected.state_dict().items():
            v.add_(weights[0] * deltas[0][k] + weights[1] * deltas[1][k])
        torch.testing.assert_close(peft_output([two], ids), expected(input_ids=ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method,option,hint", [
    ("linear", {"density": 0.3}, "it reads lambda_, normalize, seed"),
    ("ties", {"svd_rank": 4}, r"\(ties_svd truncates to svd_rank\)"),
    ("sce", {"gamma": 0.3}, "it reads seed, select_topk"),
    ("dare_linear", {"majority_sign_method": "frequency"}, "density, lambda_, normalize, rescale, seed"),
    ("lego", {"lambda_": 2.0}, "it reads seed, svd_rank"),
])
def test_an_option_the_method_does_not_read_is_refused(method, option, hint, sources):
    """`merge-adapters --method linear --density 0.3` wrote a plain linear merge as if density were applied, and
    `--method ties --svd-rank 4` a full-rank one: an option the method never reads is an error naming what it reads."""
    key = next(iter(option))
    with pytest.raises(ConfigError, match=rf"{key}=.* has no effect on merge method '{method}'.*{hint}"):
        merge_adapters([sources["plain"]], None, method, model=tiny_llama(), **option)


def test_the_benchmark_rows_use_only_options_their_methods_read():
    from lorakit.bench.merge import MERGES
    from lorakit.compose.merge import _options
    from lorakit.compose.methods import get_merge_method

    for method, opts in MERGES.values():
        merge_method, truncate = get_merge_method(method)
        _options({k: v for k, v in opts.items() if k != "weights"} | {"seed": 0}, merge_method, truncate)


def _dora_pissa(path):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=["q_proj"]), init="pissa")
    lk.save_adapter(model, path)
    return path


def test_a_dora_source_with_a_base_changing_init_is_named_by_its_folder_or_adapter_name(tmp_path):
    """Was: "source 0 is DoRA with an init that changed the base weights" — the refusal names the source as the
    user gave it: the folder (as passed), or the name of the adapter on the model."""
    folder = _dora_pissa(tmp_path / "dora_pissa")
    with pytest.raises(ConfigError, match=rf"source '{folder}' is DoRA with an init that changed the base weights"):
        merge_adapters([str(folder)], model=tiny_llama())
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=3, use_dora=True, target_modules=["q_proj"]), name="mine", init="pissa")
    with pytest.raises(ConfigError, match=r"source 'mine' is DoRA with an init that changed the base weights"):
        merge_adapters(["mine"], model=model)


def test_a_folder_source_that_refactorises_is_refused_beside_a_base_changing_adapter_on_the_model(tmp_path, ids):
    """A PiSSA adapter on the model by name has already replaced W by W − s·B₀A₀; a PiSSA / OLoRA folder re-runs its
    init on load (as PEFT does) and would factorise that edited W, not the base it was trained on. Refused before
    anything loads, naming the folder and the adapter (core.inits.changed_base_error's advice: export it first);
    a plain folder LoRA beside it still merges."""
    pissa = _trained_with_init(tmp_path / "pissa", "pissa", 1)
    olora = _trained_with_init(tmp_path / "olora", "olora", 2)
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]),
                   name="mine", init="pissa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for folder in (pissa, olora):
        with pytest.raises(ConfigError, match=rf"source '{folder}': init_lora_weights='(pissa|olora)' moved part of "
                                              r"the base .* adapter\(s\) \['mine'\] on the model have already changed"):
            merge_adapters(["mine", str(folder)], model=model)
    assert lk.core.model.adapter_names(model) == ["mine"]  # nothing was loaded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    make_adapter(tiny_llama, tmp_path / "plain", seed=3, r=2, target_modules=["q_proj"])
    merged = merge_adapters(["mine", str(tmp_path / "plain")], model=model)  # no init re-run on load: fine
    assert merged.config.r > 0


def test_a_single_path_or_a_string_of_weights_is_refused_not_split_into_characters(sources):
    """Was: merge_adapters("runs/a/adapter") read each character as a source ("source 'r' does not exist"),
    weights="11" merged with weights [1, 1], and a Path source or a scalar weight ended in a TypeError."""
    path = sources["plain"]
    for single in (str(path), path):
        with pytest.raises(ConfigError, match=r"sources must be a list .* got the single .*; pass \["):
            merge_adapters(single)
    for bad in ("11", 0.5, ["1", "x"]):
        with pytest.raises(ConfigError, match=r"^weights must be") as err:
            merge_adapters([path, path], bad)
        assert err.value.field == "weights"
