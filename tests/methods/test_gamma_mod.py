"""γ-MoD (arXiv:2410.13859), reference values from the official code github.com/Yaxin9Luo/Gamma-MOD:
``gamma_mod/model/language_model/llava_llama.py`` (compute_attention_rank: per head ``matrix_rank`` of the
causal attention map with its diagonal zeroed, averaged over heads) and ``llava_llama_mod.py``
(MoDLlamaDecoderLayer_forward: shared ``Linear(d, 2)`` router on ``input_layernorm(h)``, ``r = softmax[...,1]``,
``topk(r + mask)`` with the masked tokens always kept, kept tokens weighted by r and scattered back, the others
unchanged; ``aux_loss = cross_entropy(router_logits, kept)`` per layer × router_aux_loss_coef)."""

import math

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.core.errors import AdapterError, ConfigError
from lorakit.methods.gamma_mod import (GammaModConfig, attention_ranks, flops_per_token, gamma_mod_blocks,
                                       gamma_mod_extra_loss, gamma_mod_init, keep_fractions)
from lorakit.mixtures import record_routing, reset_router_stats

from lk_models import tiny_gpt2, tiny_llama


def official_arank(attention_weights: torch.Tensor) -> float:
    """compute_attention_rank (llava_llama.py, lines 48-70), for one sample's (heads, seq, seq) attention."""
    num_heads, seq_len, _ = attention_weights.shape
    causal_mask = torch.tril(torch.ones(seq_len, seq_len))
    diagonal_mask = torch.eye(seq_len).bool()
    ranks = []
    for head in range(num_heads):
        attn = (causal_mask * attention_weights[head]).masked_fill(diagonal_mask, 0).float()
        ranks.append(torch.linalg.matrix_rank(attn).item())
    return sum(ranks) / num_heads


def test_arank_matches_the_official_computation(ids):
    model = tiny_llama()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=ids[:1], output_attentions=True).attentions
    expected = [official_arank(a[0]) for a in att]
    model.set_attn_implementation("sdpa")
    assert attention_ranks(model, [{"input_ids": ids[:1]}]) == pytest.approx(expected)
    assert model.config._attn_implementation == "sdpa"  # restored


def _model(mod_layers=(1,), **kw):
    model = tiny_llama()
    lk.add_adapter(model, GammaModConfig(target_modules=["q_proj", "v_proj"], r=4,
                                         mod_layers=None if mod_layers is None else list(mod_layers), **kw))
    return model


def test_one_router_shared_by_every_mod_block_and_saved_once(tmp_path, ids):
    model = _model(mod_layers=(0, 1))
    b0, b1 = gamma_mod_blocks(model, "default")
    assert b0.shared_router is b1.shared_router and b0.router is b0.shared_router
    keys = [k for k in lk.adapter_state_dict(model, "default") if "router" in k]
    assert keys == ["base_model.model.model.layers.0.router.weight"]
    assert b0.shared_router.weight.shape == (2, 32)
    lk.save_adapter(model, tmp_path / "a")
    fresh = tiny_llama()
    lk.load_adapter(fresh, tmp_path / "a")
    c0, c1 = gamma_mod_blocks(fresh, "default")
    assert c1.shared_router is c0.router and [c0.enabled, c1.enabled] == [True, True]
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    # a second adapter gets its own router
    lk.add_adapter(model, GammaModConfig(target_modules=["q_proj"], mod_layers=[1]), name="b")
    assert gamma_mod_blocks(model, "b")[0].router is not b0.router


def test_routing_follows_the_official_layer(ids):
    """Kept = top-k of r + mask (k = kept-mask count + ceil(capacity·routable)); kept tokens get the official
    MoDLlamaDecoderLayer_forward (llava_llama_mod.py lines 160-175): residual + self_attn(input_layernorm(h)), then
    + mlp(post_attention_layernorm(·)) · r (line 173: r weights the MLP branch only); the others pass unchanged."""
    model = _model(mod_layers=(1,), capacity_factor=0.5)
    block = gamma_mod_blocks(model, "default")[1]
    host = model.model.layers[1].base_layer
    captured = {}
    handle = model.model.layers[1].register_forward_hook(
        lambda m, args, kwargs, out: captured.update(x=args[0], kwargs=kwargs, out=out), with_kwargs=True)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, 0] = True  # e.g. the question tokens: never skipped
    with torch.no_grad(), lk.routing(extras={"gamma_mod_keep": keep}):
        model(input_ids=ids)
    handle.remove()
    x, out = captured["x"], captured["out"]
    r = torch.softmax(F.linear(host.input_layernorm(x), block.shared_router.weight), -1)[..., 1]  # (B, T)
    seq = ids.shape[1]
    k = 1 + math.ceil(0.5 * (seq - 1))
    top = torch.topk(r + keep.float(), k, dim=-1).indices.sort(-1).values
    assert bool((top == 0).any(-1).all())  # the masked token is always among the kept
    for row in range(ids.shape[0]):
        idx = top[row]
        skipped = torch.ones(seq, dtype=torch.bool)
        skipped[idx] = False
        torch.testing.assert_close(out[row, skipped], x[row, skipped])  # skipped tokens: unchanged
        cos, sin = captured["kwargs"]["position_embeddings"]
        with torch.no_grad():
            residual = x[row:row + 1, idx]
            attn = host.self_attn(hidden_states=host.input_layernorm(residual), attention_mask=None,
                                  position_embeddings=(cos[:, idx], sin[:, idx]), position_ids=idx[None])[0]
            h1 = residual + attn
            expected = h1 + host.mlp(host.post_attention_layernorm(h1)) * r[row:row + 1, idx, None]
        torch.testing.assert_close(out[row, idx], expected[0], atol=1e-5, rtol=0)
        # the old whole-block weighting h + r·(Block(h) − h) differs: the attention branch is not scaled
        assert not torch.allclose(out[row, idx], x[row, idx] + r[row, idx, None] * (h1[0] + host.mlp(
            host.post_attention_layernorm(h1))[0] - x[row, idx]), atol=1e-4)


def test_router_loss_is_the_official_cross_entropy(ids):
    model = _model(mod_layers=(0, 1), router_aux_loss_coef=0.01)
    model.train()
    logits, targets = [], []
    hooks = [model.model.layers[i].register_forward_hook(lambda m, a, kw, o: logits.append(a[0]), with_kwargs=True)
             for i in (0, 1)]
    with record_routing(model) as traces:
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    loss = gamma_mod_extra_loss(model, "default")
    expected = 0.0
    for i, x in enumerate(logits):
        host = model.model.layers[i].base_layer
        router_logits = F.linear(host.input_layernorm(x), gamma_mod_blocks(model, "default")[0].router.weight)
        kept = next(v for k, v in traces.items() if k.startswith(f"model.layers.{i}["))[0]["selected"][..., 1]
        expected = expected + F.cross_entropy(router_logits.reshape(-1, 2).float(), kept.reshape(-1).long())
    torch.testing.assert_close(loss, 0.01 * expected, atol=1e-6, rtol=1e-5)


def test_init_picks_the_lowest_arank_blocks_and_records_them(tmp_path, ids):
    model = tiny_llama()
    lk.add_adapter(model, GammaModConfig(target_modules=["q_proj"], num_mod_layers=1))
    assert [b.enabled for b in gamma_mod_blocks(model, "default")] == [False, False]  # ARank pending: base blocks
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    ranks = attention_ranks(model, batches)
    gamma_mod_init(model, "default", batches)
    config = model.lorakit.configs["default"]
    assert config.mod_layers == [min(range(2), key=lambda i: (ranks[i], -i))]
    assert [b.enabled for b in gamma_mod_blocks(model, "default")] == [i in config.mod_layers for i in range(2)]
    lk.save_adapter(model, tmp_path / "a")
    fresh = tiny_llama()
    lk.load_adapter(fresh, tmp_path / "a")
    assert [b.enabled for b in gamma_mod_blocks(fresh, "default")] == [i in config.mod_layers for i in range(2)]


def test_flops_and_keep_fractions(ids):
    model = _model(mod_layers=(1,), capacity_factor=0.5)
    reset_router_stats(model)
    with torch.no_grad():
        model(input_ids=ids)
    seq = ids.shape[1]
    assert keep_fractions(model, "default") == {1: pytest.approx(math.ceil(0.5 * seq) / seq)}
    base = tiny_llama()
    per_block = 2 * sum(m.weight.numel() for m in base.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    dense = flops_per_token(base, seq)
    assert dense == pytest.approx(2 * (per_block + 2 * seq * 32) + 2 * 96 * 32)
    f = 0.5
    mod = flops_per_token(base, seq, {1: f})
    assert mod == pytest.approx(dense - (per_block + 2 * seq * 32) + f * per_block + f * f * 2 * seq * 32 + 4 * 32)


def test_gpt2_blocks_and_generation_without_cache(ids):
    model = tiny_gpt2()
    lk.add_adapter(model, GammaModConfig(target_modules=["c_attn"], mod_layers=[0, 1]))
    out = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0)
    assert out.shape == (1, 7)
    with pytest.raises(AdapterError, match="use_cache=False"):
        model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
    assert lk.get_method("gamma_mod").generate_kwargs == {"use_cache": False}


def test_target_forms_resolve_to_paths_plus_blocks():
    model = tiny_llama()
    lk.add_adapter(model, GammaModConfig(target_modules="all-linear", mod_layers=[0]))
    targets = model.lorakit.configs["default"].target_modules
    assert targets[-2:] == ["model.layers.0", "model.layers.1"]
    assert "model.layers.1.mlp.down_proj" in targets and "lm_head" not in targets


def test_config_errors():
    with pytest.raises(ConfigError, match="capacity_factor"):
        GammaModConfig(capacity_factor=0.0)
    with pytest.raises(ConfigError, match="blocks this model lacks"):
        lk.add_adapter(tiny_llama(), GammaModConfig(target_modules=["q_proj"], mod_layers=[5]))
