"""Mix-LN (arXiv 2412.13795) as the registered transformers model type ``lorakit-mixln``.

Reference: the official code, pixeli99/MixLN ``peft_pretraining/modeling_llama.py``: ``LlamaDecoderLayer`` with
``NORM_TYPE=post_pre``: layers ``< POST_NUM`` run ``h = post_attention_layernorm(h + attn(h))`` then
``h = post_feedforward_layernorm(h + mlp(h))`` (its forward, the ``post_pre`` branch), the others the Pre-LN
Llama block; ``LlamaModel.forward`` applies ``self.norm`` after the last layer in every layout.
"""

import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.core.errors import ConfigError
from lorakit.pretrain import PretrainConfig, pretrain_base
from lorakit.pretrain.mixln import MixLNForCausalLM, PostLNDecoderLayer, mixln_config, num_post_ln_layers

from pretrain.test_pretrain import tiny_config

SHAPE = dict(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(seed))


def _randomize_norms(model) -> None:
    """Norm gains away from 1 so a misplaced norm changes the output."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("alpha,layers,expected", [(0.25, 12, 3), (0.25, 8, 2), (0.25, 6, 1), (0.0, 8, 0),
                                                   (1.0, 8, 8), (0.3, 10, 3), (0.5, 4, 2)])
def test_post_ln_layer_count_is_floor_alpha_l(alpha, layers, expected):
    assert num_post_ln_layers(alpha, layers) == expected  # the paper's floor(alpha L); scripts: 3 of 12 at 0.25


def test_alpha_zero_equals_llama_exactly():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    _randomize_norms(llama)
    mix = MixLNForCausalLM(mixln_config(0.0, **SHAPE)).eval()
    mix.load_state_dict(llama.state_dict())
    assert not any(isinstance(layer, PostLNDecoderLayer) for layer in mix.model.layers)
    with torch.no_grad():
        assert torch.equal(mix(_ids()).logits, llama(_ids()).logits)


def _by_hand(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits with every block written out: Post-LN for i < floor(alpha L), Pre-LN after, final norm, head."""
    inner = model.model
    h = inner.embed_tokens(ids)  # (B, T, d)
    positions = torch.arange(ids.shape[1])[None]
    rope = inner.rotary_emb(h, positions)
    T = ids.shape[1]
    causal = torch.full((T, T), torch.finfo(h.dtype).min).triu(1)[None, None]  # (1, 1, T, T) additive
    n_post = model.config.num_post_ln_layers
    for i, layer in enumerate(inner.layers):
        def attn(x):
            return layer.self_attn(hidden_states=x, attention_mask=causal, position_embeddings=rope)[0]
        if i < n_post:  # official post_pre branch: x = LN(x + attn(x)); x = LN(x + mlp(x))
            h = layer.post_attention_layernorm(h + attn(h))
            h = layer.post_feedforward_layernorm(h + layer.mlp(h))
        else:  # Pre-LN
            h = h + attn(layer.input_layernorm(h))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_post_ln_layers_match_the_official_formula(alpha):
    torch.manual_seed(1)
    model = MixLNForCausalLM(mixln_config(alpha, **SHAPE)).eval()
    _randomize_norms(model)
    n_post = num_post_ln_layers(alpha, 4)
    assert [isinstance(layer, PostLNDecoderLayer) for layer in model.model.layers] == [i < n_post for i in range(4)]
    assert not hasattr(model.model.layers[0], "input_layernorm")  # official Post-LN layer: no input norm
    with torch.no_grad():
        torch.testing.assert_close(model(_ids(1)).logits, _by_hand(model, _ids(1)), rtol=1e-5, atol=1e-5)


def test_save_and_reload_through_auto_classes(tmp_path):
    torch.manual_seed(2)
    model = MixLNForCausalLM(mixln_config(0.5, **SHAPE)).eval()
    _randomize_norms(model)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is MixLNForCausalLM and again.config.model_type == "lorakit-mixln"
    assert again.config.mix_ln_alpha == 0.5
    with torch.no_grad():
        assert torch.equal(again(_ids()).logits, model(_ids()).logits)


@pytest.mark.slow
def test_fresh_process_reloads_with_only_lorakit_imported(tmp_path):
    MixLNForCausalLM(mixln_config(0.25, **SHAPE)).save_pretrained(tmp_path)
    code = ("import sys, lorakit, transformers\n"
            "assert 'lorakit.pretrain.mixln' not in sys.modules\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
            "print(type(m).__name__, m.config.num_post_ln_layers)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["MixLNForCausalLM", "1"]


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.25", None])
def test_alpha_outside_unit_interval_is_an_error(alpha):
    with pytest.raises(ConfigError, match="mix_ln_alpha must be a number in"):
        mixln_config(alpha, **SHAPE)


def test_pretrain_config_norm_errors():
    with pytest.raises(ConfigError, match="Did you mean: mix"):
        PretrainConfig(norm="mixx")
    with pytest.raises(ConfigError, match="mix_ln_alpha"):
        PretrainConfig(norm="mix", mix_ln_alpha=2.0)
    with pytest.raises(ConfigError, match="plain Pre-LN"):  # floor(0.5 · 1) = 0 Post-LN layers
        PretrainConfig(norm="mix", mix_ln_alpha=0.5, num_layers=1)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_alpha_without_norm_mix_is_an_error(norm, tmp_path, capsys):
    """Only ``--norm mix`` reads the alpha; it used to be dropped silently with pre/post."""
    with pytest.raises(ConfigError, match=rf"--mix-ln-alpha 0.5 is read only with --norm mix; --norm {norm} builds"):
        PretrainConfig(norm=norm, mix_ln_alpha=0.5)
    assert PretrainConfig(norm=norm).mix_ln_alpha == 0.25  # the untouched default stays accepted
    from lorakit.cli import main

    assert main(["pretrain-base", "--out", str(tmp_path / "m"), "--norm", norm, "--mix-ln-alpha", "0.5"]) == 2
    out = capsys.readouterr().err
    assert "--mix-ln-alpha 0.5" in out and f"--norm {norm}" in out
    assert not (tmp_path / "m").exists()


def test_tiny_pretrain_mix_saves_a_reloadable_model(tmp_path):
    info = pretrain_base(tiny_config(norm="mix", num_layers=2, mix_ln_alpha=0.5), tmp_path / "m",
                         log=lambda line: None)
    assert info["config"]["norm"] == "mix"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(model.model.layers[0], PostLNDecoderLayer)
    assert not isinstance(model.model.layers[1], PostLNDecoderLayer)


def test_lora_trains_on_mixln_and_peft_loads_the_adapter(tmp_path):
    torch.manual_seed(4)
    base = MixLNForCausalLM(mixln_config(0.5, **SHAPE))
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8))  # lorakit's default targets for lorakit-mixln
    assert any(n.startswith("model.layers.0.self_attn.q_proj.") and p.requires_grad  # a Post-LN layer
               for n, p in model.named_parameters())
    # PEFT has no default targets for a model type it does not know: the saved config names the resolved ones
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(5)
    first = None
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    lk.save_adapter(model, tmp_path / "adapter")
    import json
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert saved and set(saved) == set(lk.core.targeting.default_targets(model))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_layer_removal_matches_a_model_built_without_the_layer():
    from lorakit.pretrain.layer_stats import layer_grad_norms, layer_importance, layer_removed

    torch.manual_seed(6)
    model = MixLNForCausalLM(mixln_config(0.5, **SHAPE)).eval()
    _randomize_norms(model)
    ids = _ids(6)
    with torch.no_grad():
        full = model(ids).logits
        with layer_removed(model, 1):
            without = model(ids).logits
        assert torch.equal(model(ids).logits, full)  # restored
    # the reference: a 3-layer Mix-LN whose first layer is Post-LN (layer 0) and the rest Pre-LN (old 2, 3)
    smaller = MixLNForCausalLM(mixln_config(1 / 3, **{**SHAPE, "num_hidden_layers": 3})).eval()
    state = {k: v for k, v in model.state_dict().items() if ".layers.1." not in k}
    state = {k.replace(".layers.2.", ".layers.1.").replace(".layers.3.", ".layers.2."): v for k, v in state.items()}
    smaller.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(without, smaller(ids).logits)
    stats = layer_importance(model, [ids])
    assert len(stats["loss_change"]) == len(stats["output_change"]) == 4
    assert all(v > 0 for v in stats["output_change"])
    norms = layer_grad_norms(model, [ids])
    assert len(norms) == 4 and all(v > 0 for v in norms)
    assert all(p.grad is None for p in model.parameters())


def test_cli_norm_options_reach_config():
    from lorakit.pretrain.train import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["--norm", "mix", "--mix-ln-alpha", "0.5", "--objective", "ul2"]))
    assert (config.norm, config.mix_ln_alpha, config.objective) == ("mix", 0.5, "ul2")
