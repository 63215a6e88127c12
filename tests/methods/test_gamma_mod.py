"""γ-MoD (arXiv:2410.13859), reference values from the official code github.com/Yaxin9Luo/Gamma-MOD:
``gamma_mod/model/language_model/llava_llama.py`` (compute_attention_rank: per head ``matrix_rank`` of the
causal attention map with its diagonal zeroed, averaged over heads) and ``llava_llama_mod.py`` ("mod.py" below):
MoDLlamaDecoderLayer_forward (training: shared ``Linear(d, 2)`` router on ``input_layernorm(h)``,
``r = softmax[...,1]``, ``topk(r + mask)`` with the masked tokens always kept, kept tokens weighted by r and
scattered back, the others unchanged; ``aux_loss = cross_entropy(router_logits, kept)`` per layer ×
router_aux_loss_coef), MoDLlamaDecoderLayer_forward_inference (evaluation: prefill keeps ``r > 0.005``, a decoded
token skips when ``r < 0.5``) and initialize_mod_modules (``mod_mode="arank_mod"``: every block but 0, 1, 2 and
the last)."""

import math

import pytest
import torch
import torch.nn.functional as F

from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.core.errors import AdapterError, ConfigError
from lorakit.core.routing import SUPERVISED_KEY, current_routing
from lorakit.methods.gamma_mod import (GammaModConfig, attention_ranks, flops_per_token, gamma_mod_blocks,
                                       gamma_mod_extra_loss, gamma_mod_init, keep_fractions)
from lorakit.mixtures import record_routing, reset_router_stats

from lk_models import tiny_bpe_tokenizer, tiny_gpt2, tiny_llama


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
    model.train()  # the training rule (top-k); the tiny config has no dropout
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


def _llama(num_layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        max_position_embeddings=64)).eval()


def official_arank_mod(num_layers: int) -> list[int]:
    """initialize_mod_modules, mod_mode == "arank_mod" (mod.py lines 554-558)."""
    return [i for i in list(range(num_layers)) if i not in {0, 1, 2, num_layers - 1}]


def test_default_blocks_are_the_official_arank_mod_rule(tmp_path, ids):
    model = _llama(8)
    lk.add_adapter(model, GammaModConfig(target_modules=["q_proj"]))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    gamma_mod_init(model, "default", batches)
    config = model.lorakit.configs["default"]
    assert config.mod_layers == official_arank_mod(8) == [3, 4, 5, 6]
    assert [b.enabled for b in gamma_mod_blocks(model, "default")] == [i in config.mod_layers for i in range(8)]
    lk.save_adapter(model, tmp_path / "a")
    fresh = _llama(8)
    lk.load_adapter(fresh, tmp_path / "a")
    assert [b.index for b in gamma_mod_blocks(fresh, "default") if b.enabled] == [3, 4, 5, 6]


def test_fewer_blocks_are_the_lowest_arank_among_the_eligible(ids):
    """num_mod_layers=2: the paper's ARank order (lowest = most redundant) inside the official rule's blocks; the
    ranks are the official compute_attention_rank's."""
    model = _llama(8)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=ids[:1], output_attentions=True).attentions
    ranks = [official_arank(a[0]) for a in att]
    lk.add_adapter(model, GammaModConfig(target_modules=["q_proj"], num_mod_layers=2))
    gamma_mod_init(model, "default", [{"input_ids": ids[:1]}])
    expected = sorted(sorted(official_arank_mod(8), key=lambda i: (ranks[i], -i))[:2])
    assert model.lorakit.configs["default"].mod_layers == expected
    with pytest.raises(ConfigError, match="num_mod_layers=5"):
        model = _llama(8)
        lk.add_adapter(model, GammaModConfig(target_modules=["q_proj"], num_mod_layers=5))
        gamma_mod_init(model, "default", [{"input_ids": ids[:1]}])


def test_unrestricted_arank_picks_the_lowest_blocks_and_records_them(tmp_path, ids):
    """dense_first_layers = dense_last_layers = 0: any block, lowest ARank first (the rule before the official
    bounds); a 2-block model with the default bounds has no block to convert and is refused."""
    with pytest.raises(ConfigError, match="dense_first_layers=3"):
        lk.add_adapter(tiny_llama(), GammaModConfig(target_modules=["q_proj"]))
    model = tiny_llama()
    lk.add_adapter(model, GammaModConfig(target_modules=["q_proj"], num_mod_layers=1, dense_first_layers=0,
                                         dense_last_layers=0))
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
    model.train()  # the training top-k
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


def _spread_router(model, seed: int = 0, scale: float = 20.0):
    """Large router weights, so that keep probabilities spread over (0, 1) (a trained router's are not ≈ 0.5)."""
    g = torch.Generator().manual_seed(seed)
    router = gamma_mod_blocks(model, "default")[0].router
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * scale)
    return router


def _capture(layer):
    captured = []
    handle = layer.register_forward_hook(lambda m, a, kw, out: captured.append((a[0] if a else kw["hidden_states"],
                                                                               kw, out)), with_kwargs=True)
    return captured, handle


def _official_layer(host, x, idx, r, cos, sin):
    """The kept tokens ``idx`` of one row through the official MoD layer (mod.py l. 253-267): causal attention among
    them, h1 = x + Attn(LN1(x)), h' = h1 + r·MLP(LN2(h1)); positions are the tokens' own (see the method file)."""
    with torch.no_grad():
        residual = x[None, idx]
        attn = host.self_attn(hidden_states=host.input_layernorm(residual), attention_mask=None,
                              position_embeddings=(cos[:, idx], sin[:, idx]))[0]
        h1 = residual + attn
        return (h1 + host.mlp(host.post_attention_layernorm(h1)) * r[idx, None])[0]


def test_inference_prefill_keeps_the_tokens_above_the_threshold(ids):
    """Out of training, a multi-token forward keeps exactly the tokens with r > 0.005 (mod.py l. 224-233), no top-k
    and no capacity; each row its own count (rows with fewer are filled up and masked)."""
    model = _model(mod_layers=(1,))
    router = _spread_router(model)
    host = model.model.layers[1].base_layer
    captured, handle = _capture(model.model.layers[1])
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    x, kwargs, out = captured[0]
    cos, sin = kwargs["position_embeddings"]
    r = torch.softmax(F.linear(host.input_layernorm(x), router.weight), -1)[..., 1]  # (B, T)
    high = r > 0.005  # official high_prob_mask
    counts = high.sum(1)
    assert 0 < int(counts.min()) and int(counts.max()) < ids.shape[1] and len(set(counts.tolist())) > 1
    for row in range(ids.shape[0]):
        idx = high[row].nonzero().squeeze(1)
        torch.testing.assert_close(out[row, ~high[row]], x[row, ~high[row]])
        torch.testing.assert_close(out[row, idx], _official_layer(host, x[row], idx, r[row], cos, sin),
                                   atol=1e-5, rtol=0)
    # inference_threshold=None: the training top-k at inference too
    block = gamma_mod_blocks(model, "default")[1]
    block.inference_threshold = None
    reset_router_stats(model)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert keep_fractions(model, "default") == {1: pytest.approx(math.ceil(0.5 * ids.shape[1]) / ids.shape[1])}


def test_the_supervised_mask_only_routes_training_forwards(ids):
    """The answer tokens are kept in training only (masked ``topk(r + mask)``, mod.py l. 143-153): the official
    inference forward (l. 188-280) has no mask, so an evaluation forward that is offered one (a Trainer eval loss,
    a procedure's validation forward) routes as generation does. The caller's ``gamma_mod_keep`` applies in both."""
    model = _model(mod_layers=(1,))
    _spread_router(model)
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
        every = torch.ones_like(ids, dtype=torch.bool)
        with lk.routing(extras={SUPERVISED_KEY: every}):
            offered = model(input_ids=ids, use_cache=False).logits
        with lk.routing(extras={"gamma_mod_keep": every}):
            forced = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(offered, plain)
    assert not torch.allclose(forced, plain)  # some tokens were below the threshold: keeping them all differs
    model.train()
    reset_router_stats(model)
    with lk.routing(extras={SUPERVISED_KEY: every}):
        model(input_ids=ids, use_cache=False)
    assert keep_fractions(model, "default") == {1: 1.0}  # in training the mask keeps every token


def test_training_keeps_the_position_that_predicts_each_answer_token(ids):
    """The official mask (mod.py l. 146-150: 0 on the 1024 + 35 image/instruction tokens, 1 on everything after)
    covers the whole question and answer, so the token whose output predicts the first answer token (the last
    question token) is always processed. The reference: official ``topk(r + mask)`` (l. 150) with the mask 1 on each
    supervised token and on the position before it (labels are unshifted: position t − 1 is scored for token t),
    k = mask count + ceil(capacity · the others) (l. 148-149 with half of the unmasked tokens routed)."""
    model = _model(mod_layers=(1,), capacity_factor=0.5)
    router = _spread_router(model, seed=0)
    host = model.model.layers[1].base_layer
    model.train()
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[0, 6:], answer[1, 4:], answer[2, 7:] = True, True, True
    captured, handle = _capture(model.model.layers[1])
    with torch.no_grad(), record_routing(model) as traces, lk.routing(extras={SUPERVISED_KEY: answer}):
        model(input_ids=ids, use_cache=False)
    handle.remove()
    chosen = next(v for k, v in traces.items() if k.startswith("model.layers.1["))[0]["selected"][..., 1]
    x = captured[0][0]
    r = torch.softmax(F.linear(host.input_layernorm(x), router.weight), -1)[..., 1]  # (B, T)
    seq = ids.shape[1]
    official = answer.clone()
    official[:, :-1] |= answer[:, 1:]  # the predicting position of every answer token
    k = int((official.sum(1) + torch.ceil(0.5 * (seq - official.sum(1)).float()).long()).max())
    expected = torch.zeros_like(official).scatter(1, torch.topk(r + official.float(), k, dim=-1).indices, True)
    assert chosen.tolist() == expected.tolist()
    assert bool(chosen[official].all()) and bool((~chosen).any())  # the rest of the prompt is still routed
    # without the predicting positions (answer-only mask) this router would skip one of them: the test tells them apart
    k_answer = int((answer.sum(1) + torch.ceil(0.5 * (seq - answer.sum(1)).float()).long()).max())
    answer_only = torch.zeros_like(answer).scatter(1, torch.topk(r + answer.float(), k_answer, dim=-1).indices, True)
    assert not bool(answer_only[official & ~answer].all())


@pytest.mark.parametrize("host", ["llama", "gpt2"])
def test_training_topk_at_inference_ignores_left_padding(ids, host):
    """With ``inference_threshold=None`` (the training top-k at inference) and no routing token mask, padding read
    from the attention mask is neither kept nor counted among the routable tokens (as the training token mask does):
    a left-padded batch's real tokens get the logits and the greedy continuations of each row alone."""
    if host == "llama":
        model = _model(mod_layers=(1,), inference_threshold=None)
    else:
        model = tiny_gpt2()
        lk.add_adapter(model, GammaModConfig(target_modules=["c_attn"], mod_layers=[0, 1], inference_threshold=None))
    _spread_router(model, seed=2, scale=5.0)
    prompts = [ids[0, :8], ids[1, :5], ids[2, :3]]
    batch = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, 8 - len(p):], mask[row, 8 - len(p):] = p, 1
    with torch.no_grad():
        reset_router_stats(model)
        positions = (mask.cumsum(1) - 1).clamp_min(0)  # as generate gives them (GPT-2's are absolute)
        padded = model(input_ids=batch, attention_mask=mask, position_ids=positions, use_cache=False).logits
        # every real token counted once, padding not at all: k = ceil(0.5 · real tokens) of each row, rows kept alike
        kept = {i: round(f * int(mask.sum())) for i, f in keep_fractions(model, "default").items()}
        assert set(kept.values()) == {sum(math.ceil(0.5 * len(p)) for p in prompts)}
        out = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        for row, p in enumerate(prompts):
            alone = model(input_ids=p[None], use_cache=False).logits[0]
            torch.testing.assert_close(padded[row, 8 - len(p):], alone, atol=1e-5, rtol=1e-5)
            greedy = model.generate(p[None], max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert out[row, 8:].tolist() == greedy[0, len(p):].tolist()


@pytest.mark.parametrize("decode_threshold", [0.5, 0.0, 1.0])
def test_decoding_from_the_cache_follows_the_official_decode_rule(ids, decode_threshold):
    """Prefill with a KV cache, then one decoded token (mod.py l. 212-267): the token skips the block when
    r < decode_threshold (official 0.5; 0 = the Mini-Gemini variant, every decoded token processed), else it
    attends to the prefill tokens the block kept (r > 0.005) and itself, its MLP weighted by r."""
    model = _model(mod_layers=(1,), decode_threshold=decode_threshold)
    router = _spread_router(model, seed=1)
    host = model.model.layers[1].base_layer
    prompt, nxt = ids[:1, :8], ids[:1, 8:9]
    captured, handle = _capture(model.model.layers[1])
    with torch.no_grad():
        first = model(input_ids=prompt, use_cache=True)
        cache = first.past_key_values
        model(input_ids=nxt, cache=cache, use_cache=True)
    handle.remove()
    (x_pre, kw_pre, _), (x_dec, kw_dec, out_dec) = captured
    with torch.no_grad():
        r_pre, r_dec = (torch.softmax(F.linear(host.input_layernorm(x), router.weight), -1)[0, :, 1]
                        for x in (x_pre, x_dec))
    kept_pre = (r_pre > 0.005).nonzero().squeeze(1)
    assert 0 < kept_pre.numel() < 8
    assert [layer.keys.shape[-2] for layer in cache.layers] == [9, 9]  # every layer keeps the model's length
    if float(r_dec[0]) < decode_threshold:  # official l. 216-222: the hidden state passes unchanged
        torch.testing.assert_close(out_dec, x_dec)
        return
    cos = torch.cat([kw_pre["position_embeddings"][0], kw_dec["position_embeddings"][0]], 1)
    sin = torch.cat([kw_pre["position_embeddings"][1], kw_dec["position_embeddings"][1]], 1)
    x = torch.cat([x_pre[0], x_dec[0]])
    r = torch.cat([r_pre, r_dec])
    idx = torch.cat([kept_pre, torch.tensor([8])])
    torch.testing.assert_close(out_dec[0, 0], _official_layer(host, x, idx, r, cos, sin)[-1], atol=1e-5, rtol=0)


def test_the_default_rule_took_both_decode_branches(ids):
    """The parametrized test above exercises the official 0.5 rule; here both of its branches are reached."""
    seen = set()
    for seed in range(6):
        model = _model(mod_layers=(1,))
        router = _spread_router(model, seed=seed)
        captured, handle = _capture(model.model.layers[1])
        with torch.no_grad():
            cache = model(input_ids=ids[:1, :8], use_cache=True).past_key_values
            model(input_ids=ids[:1, 8:9], cache=cache, use_cache=True)
        handle.remove()
        x_dec, _, out = captured[1]
        host = model.model.layers[1].base_layer
        with torch.no_grad():
            r = torch.softmax(F.linear(host.input_layernorm(x_dec), router.weight), -1)[0, 0, 1]
        seen.add(float(r) >= 0.5)
        assert torch.equal(out, x_dec) == (float(r) < 0.5)
    assert seen == {True, False}


def test_generation_with_kv_cache_llama_and_gpt2(ids):
    """Greedy generation reads the cache (the method no longer forces use_cache=False); a left-padded batch
    decodes as each row alone does; decoding in training mode is refused."""
    for model in (_model(mod_layers=(1,)), tiny_gpt2()):
        if not hasattr(model, "lorakit"):
            lk.add_adapter(model, GammaModConfig(target_modules=["c_attn"], mod_layers=[0, 1]))
        _spread_router(model, seed=2, scale=5.0)
        assert lk.get_method("gamma_mod").generate_kwargs == {}
        prompts = [ids[0, :6], ids[1, :4]]
        batch = torch.zeros(2, 6, dtype=torch.long)
        mask = torch.zeros(2, 6, dtype=torch.long)
        for row, p in enumerate(prompts):
            batch[row, 6 - len(p):], mask[row, 6 - len(p):] = p, 1
        with torch.no_grad():
            out = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
            for row, p in enumerate(prompts):
                alone = model.generate(p[None], max_new_tokens=4, do_sample=False, pad_token_id=0)
                assert out[row, 6:].tolist() == alone[0, len(p):].tolist()
    model.train()
    with pytest.raises(AdapterError, match="model.eval"):
        model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_cached_decoding_equals_a_full_forward_when_every_token_is_kept(ids):
    """With every token kept (r > 0.005 at this init, decode_threshold=0), the empty-slot cache must change
    nothing: the decoded token's logits equal the full forward's at its position; with skipped tokens the two
    differ (a cached token's skip decision is its own, made once, as in the official decoding)."""
    for decode_threshold, same in ((0.0, True), (1.0, False)):
        model = _model(mod_layers=(0, 1), decode_threshold=decode_threshold)
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits[:, -1]
            cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
            step = model(input_ids=ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
        assert torch.allclose(step, full, atol=1e-5) == same



def test_beam_search_from_the_cache_equals_beam_search_without_it():
    """Beam search reorders the KV cache's rows at every step (``reorder_cache``); which slots of a MoD block's cache
    hold skipped tokens must follow. With one rule for prefill and decode (r > 0.4999 / r >= 0.5) the cached beams
    are those of the full forwards (``use_cache=False``); was: the skipped-slot masks stayed in the old row order."""
    model = _model(mod_layers=(0, 1), inference_threshold=0.4999, decode_threshold=0.5)
    _spread_router(model, seed=1, scale=3.0)
    for seed in range(4):
        prompt = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            cached = model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
            full = model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0,
                                  use_cache=False)
        assert cached.tolist() == full.tolist(), seed

@pytest.fixture(scope="module")
def tokenizer():
    from lorakit.data import pretraining_texts

    return tiny_bpe_tokenizer(pretraining_texts(n_per_task=20), vocab_size=300)


@pytest.mark.parametrize("keep_supervised", [True, False])
def test_training_loop_keeps_the_answer_tokens(tokenizer, keep_supervised):
    """Masked routing learning through ``lorakit.training.train``: the loop offers the supervised (completion)
    tokens as the routing extra SUPERVISED_KEY, and every MoD block keeps them (official ``topk(r + mask)``,
    mod.py l. 148-153, the mask 1 on the question and answer); the prompt tokens are routed."""
    from lorakit.data import load_examples
    from lorakit.training import TrainConfig, train

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id))
    lk.add_adapter(model, GammaModConfig(target_modules=["q_proj"], r=4, mod_layers=[1],
                                         keep_supervised=keep_supervised))
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(
        (kw["attention_mask"].bool(), current_routing().extras.get(SUPERVISED_KEY))), with_kwargs=True)
    with record_routing(model) as traces:
        train(model, tokenizer, load_examples("reverse", "train", n=16, seed=0),
              TrainConfig(steps=2, batch_size=4, lr=1e-2, seed=0, init_batches=1), progress=False)
    kept = [e["selected"][..., 1] for e in next(v for k, v in traces.items() if k.startswith("model.layers.1["))]
    assert len(kept) == len(seen) == 2
    skipped_answer = 0
    for (real, answer), chosen in zip(seen, kept):
        assert answer is not None and bool(answer.any(1).all()) and not bool((answer & ~real).any())
        skipped_answer += int((answer & ~chosen).sum())
        assert bool((real & ~answer & ~chosen).any())  # prompt tokens were routed away
    assert (skipped_answer == 0) == keep_supervised


def test_target_forms_resolve_to_paths_plus_blocks():
    model = tiny_llama()
    lk.add_adapter(model, GammaModConfig(target_modules="all-linear", mod_layers=[0]))
    targets = model.lorakit.configs["default"].target_modules
    assert targets[-2:] == ["model.layers.0", "model.layers.1"]
    assert "model.layers.1.mlp.down_proj" in targets and "lm_head" not in targets


def test_config_errors():
    with pytest.raises(ConfigError, match="capacity_factor"):
        GammaModConfig(capacity_factor=0.0)
    with pytest.raises(ConfigError, match="inference_threshold"):
        GammaModConfig(inference_threshold=1.5)
    with pytest.raises(ConfigError, match="decode_threshold"):
        GammaModConfig(decode_threshold=-0.1)
    with pytest.raises(ConfigError, match="dense_first_layers"):
        GammaModConfig(dense_first_layers=-1)
    with pytest.raises(ConfigError, match=r"mod_layers=\[3, 3\] names block\(s\) \[3\] more than once"):
        GammaModConfig(mod_layers=[3, 3])
    # was accepted: no MoD block, a plain LoRA whose router never trains (a saved [] loaded the same way)
    with pytest.raises(ConfigError, match=r"mod_layers=\[\] converts no block.*leave it None"):
        GammaModConfig(mod_layers=[])
    with pytest.raises(ConfigError, match="blocks this model lacks"):
        lk.add_adapter(tiny_llama(), GammaModConfig(target_modules=["q_proj"], mod_layers=[5]))
    # more blocks asked of ARank than the bounds leave: refused when the adapter is added (the CLI then stops before
    # its "before" evaluation), not at the training loop's init
    with pytest.raises(ConfigError, match="num_mod_layers=3"):
        lk.add_adapter(tiny_llama(), GammaModConfig(target_modules=["q_proj"], num_mod_layers=3, dense_first_layers=0,
                                                    dense_last_layers=0))


def test_num_mod_layers_that_mod_layers_would_override_is_refused():
    """mod_layers sets the MoD blocks by hand and ARank never runs (docs/gamma-mod.md), so mod_layers=[3] with
    num_mod_layers=2 silently converted one block. ARank's own saved choice (len(mod_layers) == num_mod_layers)
    still loads."""
    from lorakit.core.errors import ConfigError
    from lorakit.methods.gamma_mod import GammaModConfig

    with pytest.raises(ConfigError, match="num_mod_layers would be ignored"):
        GammaModConfig(mod_layers=[3], num_mod_layers=2)
    assert GammaModConfig(mod_layers=[3, 4], num_mod_layers=2).mod_layers == [3, 4]


def _edited(folder, **fields):
    import json

    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("edit,match", [
    ([0], r"adapter_config.json has mod_layers=\[0\], but the saved adapter routed blocks \[1\] \(its tensors "
          r"\*.mod_block\).*Set mod_layers=\[1\]"),
    ([0, 1], r"has mod_layers=\[0, 1\], but the saved adapter routed blocks \[1\]"),
    ([1, 1], r"mod_layers=\[1, 1\] names block\(s\) \[1\] more than once"),
    ([1, 2], r"mod_layers=\[1, 2\] names blocks this model lacks \(it has 2, indices 0..1\)"),
])
def test_a_hand_edited_mod_layers_is_refused_at_load(edit, match, tmp_path):
    """Was: the saved adapter said nothing about its MoD blocks but the config, so mod_layers edited to other blocks
    loaded silently and routed blocks the shared router and LoRA were never trained on. Now each block saves its
    ``mod_block`` flag and load (and lorakit inspect, the same check) refuses a config that disagrees with it, as it
    refuses a duplicate or a block the model lacks, leaving the model untouched."""
    lk.save_adapter(_model(mod_layers=(1,)), tmp_path / "a")
    _edited(tmp_path / "a", mod_layers=edit)
    fresh = tiny_llama()
    with pytest.raises((lk.AdapterLoadError, ConfigError), match=match):
        lk.load_adapter(fresh, tmp_path / "a")
    assert not hasattr(fresh, "lorakit") or not fresh.lorakit.configs


def test_an_out_of_range_mod_layers_names_the_adapter_folder_at_load(tmp_path):
    """prepare_gamma_mod's check (mod_layers naming a block the model lacks) raised during a load said nothing of
    where the config came from; load_adapter and lorakit inspect's tensor check now name the folder (the same
    ConfigError, so callers catching it are unchanged)."""
    from lorakit.io.peft_format import check_adapter_tensors, read_adapter_config

    folder = tmp_path / "gm"
    lk.save_adapter(_model(mod_layers=(1,)), folder)
    _edited(folder, mod_layers=[5])
    says = f"{folder}: GammaModConfig.mod_layers=[5] names blocks this model lacks (it has 2, indices 0..1)"
    with pytest.raises(ConfigError) as e:
        lk.load_adapter(tiny_llama(), folder)
    assert str(e.value).startswith(says), str(e.value)
    with pytest.raises(ConfigError) as e:
        check_adapter_tensors(tiny_llama(), folder, read_adapter_config(folder), {})
    assert str(e.value).startswith(says), str(e.value)


def test_arank_choice_is_recorded_in_the_blocks_and_a_file_without_the_record_still_loads(tmp_path, ids):
    """ARank's choice sets the blocks' saved flags (so reloads are checked against it); an older file without the
    flags loads with its config's mod_layers as before."""
    from safetensors.torch import load_file, save_file

    model = _model(mod_layers=None, dense_first_layers=0, dense_last_layers=0, num_mod_layers=1)
    gamma_mod_init(model, "default", [{"input_ids": ids}])
    chosen = model.lorakit.configs["default"].mod_layers
    lk.save_adapter(model, tmp_path / "a")
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sorted(int(k.split(".")[-2]) for k, v in weights.items() if k.endswith("mod_block") and int(v)) == chosen
    other = [1 - chosen[0]]
    _edited(tmp_path / "a", mod_layers=other)
    with pytest.raises(lk.AdapterLoadError, match=rf"routed blocks \[{chosen[0]}\]"):
        lk.load_adapter(tiny_llama(), tmp_path / "a")
    save_file({k: v for k, v in weights.items() if not k.endswith("mod_block")},
              tmp_path / "a" / "adapter_model.safetensors", metadata={"format": "pt"})
    old = lk.load_adapter(tiny_llama(), tmp_path / "a")
    assert [b.enabled for b in gamma_mod_blocks(old, "default")] == [i in other for i in range(2)]
