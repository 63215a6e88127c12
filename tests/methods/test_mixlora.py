"""MixLoRA: the batched FFN mixture equals a per-token loop over merged expert FFNs; routing (top-k, top-p,
switch with capacity); the pooled, padding-masked balance loss; router stats; generation; training. Reference
values against the official code (TUDB-Labs/MoE-PEFT @ 40f8cb7, written out at the end of this file)."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lorakit as lk
from lorakit.core.delta import Conv1D
from lorakit.core.layer import AdapterLayer
from lorakit.core.model import adapter_state
from lorakit.data import load_examples
from lorakit.methods.mixlora import MixLoraConfig, mixlora_extra_loss
from lorakit.mixtures import record_routing, reset_router_stats, router_stats
from lorakit.mixtures.base import pop_aux_records
from lorakit.mixtures.ffn_experts import MixLoraFFN
from lorakit.mixtures.router import CapacityTop1, RouterOutput
from lorakit.training import TrainConfig, train

from lk_models import tiny_gpt2, tiny_llama


def perturb(model, name="default", seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".adapters.{name}." in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def ffn_layers(model):
    return [m for m in model.modules() if isinstance(m, AdapterLayer) and m.info.kind == "ffn"]


# -- slow reference: per token, per selected expert, the full FFN with merged expert weights ----------------
def _weight(mlp, name):
    module = getattr(mlp, name)
    module = getattr(module, "base_layer", module)
    w = module.weight.T if Conv1D and isinstance(module, Conv1D) else module.weight  # (out, in)
    return w.float(), (module.bias.float() if module.bias is not None else None)


def reference_ffn(mlp, delta: MixLoraFFN, x, weights, selected):
    spec = delta.spec
    act = getattr(mlp, spec.act)

    def proj(name, v, e=None):
        w, b = _weight(mlp, name)
        if e is not None:
            w = w + delta.scaling * delta.lora_B[name][e].float() @ delta.lora_A[name][e].float()
        return v @ w.T + (b if b is not None else 0)

    def ffn(v, e=None):
        h = act(proj(spec.gate, v, e)) * proj(spec.up, v, e) if spec.gate else act(proj(spec.up, v, e))
        return proj(spec.down, h, e)

    flat = x.reshape(-1, x.shape[-1]).float()
    out = torch.zeros(flat.shape[0], delta.info.out_features)
    for t in range(flat.shape[0]):
        chosen = selected[t].nonzero().flatten().tolist()
        if not chosen:
            out[t] = ffn(flat[t])
        for e in chosen:
            out[t] += weights[t, e] * ffn(flat[t], e)
    return out.view(*x.shape[:-1], -1)


def reference_routing(delta, x, routing, top_k=2, top_p=0.8, capacity=None):
    """Routing written as loops, independent of the library's router code."""
    flat = x.reshape(-1, x.shape[-1]).float()
    probs = torch.softmax(flat @ delta.router.gate.weight.float().T, -1)
    n, num_experts = probs.shape
    weights, selected = torch.zeros(n, num_experts), torch.zeros(n, num_experts, dtype=torch.bool)
    seq_len = x.shape[-2]
    used = {}
    for t in range(n):
        order = probs[t].argsort(descending=True).tolist()
        if routing == "topk":
            chosen = order[:top_k]
        elif routing == "top_p":
            chosen, mass = [], 0.0
            for e in order:
                if mass >= top_p:
                    break
                chosen.append(e)
                mass += float(probs[t, e])
        else:  # switch: top-1 within capacity per sequence
            key = (t // seq_len, order[0])
            used[key] = used.get(key, 0) + 1
            chosen = order[:1] if used[key] <= capacity else []
        for e in chosen:
            selected[t, e] = True
            weights[t, e] = 1.0 if routing == "switch" else probs[t, e] / probs[t, chosen].sum()
    return weights, selected


def expert_grads(delta):
    grads = {f"{k}.{n}": p.grad.clone() for k in ("lora_A", "lora_B") for n, p in getattr(delta, k).items()}
    delta.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("strategy", ["topk", "top_p", "switch"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_batched_path_equals_loop_reference(factory, strategy, packed):
    model = factory()
    lk.add_adapter(model, MixLoraConfig(target_modules=["mlp"], num_experts=4, r=4, lora_dropout=0.0,
                                        routing_strategy=strategy, expert_capacity=2 if strategy == "switch" else None))
    perturb(model, scale=0.05)  # the expert terms dominate the base FFN's output, values stay O(1)
    layer = ffn_layers(model)[0]
    delta = layer.adapters["default"]
    delta.packed_rows = packed
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    probe = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    fast = layer(x)
    (fast * probe).sum().backward()
    fast_grads = expert_grads(delta)
    with torch.no_grad():
        weights, selected = reference_routing(delta, x, strategy, capacity=2)
        assert torch.equal(delta.route(x).selected, selected)
    ref = reference_ffn(layer.base_layer, delta, x, weights, selected)
    (ref * probe).sum().backward()
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    for name, grad in expert_grads(delta).items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    if strategy == "switch":
        assert not selected.any(-1).all(), "capacity 2 of 4 experts over 7 tokens must drop some"


def test_fresh_adapter_equals_base_and_is_trainable_end_to_end():
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits
    lk.add_adapter(model, MixLoraConfig(num_experts=4, r=4))  # default targets: q/k/v/o + mlp
    kinds = {type(d).__name__ for layer in ffn_layers(model) for d in layer.adapters.values()}
    assert kinds == {"MixLoraFFN"}
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=0)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss + mixlora_extra_loss(model, "default")
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".router.gate." in n for n in grads)  # balance loss (the task gradient is 0 while every B is 0)
    assert any(".lora_B.down_proj" in n for n in grads) and any("q_proj.adapters.default.lora_B" in n for n in grads)


def test_top_p_keeps_experts_until_mass_exceeds_p():
    model = tiny_llama()
    lk.add_adapter(model, MixLoraConfig(target_modules=["mlp"], num_experts=4, r=4, routing_strategy="top_p",
                                        top_p=0.8))
    delta = ffn_layers(model)[0].adapters["default"]
    probs = torch.tensor([0.15, 0.5, 0.10, 0.25])  # sorted: 0.5, 0.25 (0.75 < 0.8), 0.15 (0.9 > 0.8) -> 3 kept
    with torch.no_grad():
        delta.router.gate.weight.zero_()
        delta.router.gate.weight[:, 0] = probs.log()
    x = torch.zeros(1, 1, 32)
    x[..., 0] = 1.0  # logits = log(probs)
    out = delta.route(x)
    assert out.selected[0].tolist() == [True, True, False, True]
    torch.testing.assert_close(out.weights[0], torch.tensor([0.15, 0.5, 0.0, 0.25]) / 0.9)


def test_switch_capacity_drops_tokens_to_the_base_ffn():
    model = tiny_llama()
    lk.add_adapter(model, MixLoraConfig(target_modules=["mlp"], num_experts=4, r=4, routing_strategy="switch",
                                        expert_capacity=1))
    config = adapter_state(model).configs["default"]
    assert (config.router_init_range, config.jitter_noise, config.router_z_loss_coef) == (1.0, 0.01, 0.001)
    perturb(model)
    layer = ffn_layers(model)[0]
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), record_routing(model) as traces:
        out = layer(x)
    with torch.no_grad(), lk.disable_adapters(model):
        base = layer(x)
    selected = next(iter(traces.values()))[0]["selected"]  # (2, 8, 4)
    assert selected.sum(1).max() <= 1, "more tokens than the capacity in one expert of one sequence"
    dropped = ~selected.any(-1)
    assert dropped.sum() >= 8  # 8 tokens per sequence, at most 4 slots
    torch.testing.assert_close(out[dropped], base[dropped], atol=1e-6, rtol=0)
    assert (out[~dropped] - base[~dropped]).abs().amax(-1).min() > 1e-4


def test_switch_capacity_from_factor_and_padding_takes_no_slot():
    policy = CapacityTop1(capacity=None, factor=1.0)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)  # 8 tokens of one sequence, all want expert 0
    out = RouterOutput(probs.log(), probs, probs, torch.ones_like(probs, dtype=torch.bool))
    routed = policy(out, torch.Size([1, 8]), None)
    assert routed.selected[:, 0].tolist() == [True, True] + [False] * 6  # capacity ceil(1.0 * 8 / 4) = 2
    assert torch.equal(routed.weights[:, 0], routed.selected[:, 0].float())  # straight-through value 1
    mask = torch.tensor([False, False, True, True, True, False, False, False])  # left padding takes no slot
    routed = policy(out, torch.Size([1, 8]), mask)
    assert routed.selected[2:5, 0].tolist() == [True, True, False]


def test_balance_loss_is_pooled_over_layers_and_ignores_padding():
    model = tiny_llama()
    lk.add_adapter(model, MixLoraConfig(target_modules=["mlp"], num_experts=4, r=4, lora_dropout=0.0))
    perturb(model)
    model.train()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0

    def forward(ids, token_mask):
        with lk.routing(token_mask=token_mask):
            model(input_ids=ids, attention_mask=mask)

    forward(ids, mask)
    records = [r for _, r in pop_aux_records(model, "default")]
    assert len(records) == 2  # one per layer
    probs = torch.cat([r.out.probs for r in records])
    selected = torch.cat([r.out.selected for r in records])
    keep = torch.cat([r.token_mask for r in records])
    f, p = selected[keep].float().mean(0), probs[keep].mean(0)
    expected = 0.001 * 4 * (f * p).sum()

    forward(ids, mask)
    loss = mixlora_extra_loss(model, "default")
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(layer.adapters["default"].router.gate.weight.grad.abs().sum() > 0 for layer in ffn_layers(model))

    other = ids.clone()
    other[1, 5:] = (other[1, 5:] + 17) % 96  # padding tokens change, so do their router inputs
    forward(other, mask)
    torch.testing.assert_close(mixlora_extra_loss(model, "default"), loss.detach())
    forward(ids, None)
    unmasked = mixlora_extra_loss(model, "default")
    forward(other, None)
    assert not torch.allclose(mixlora_extra_loss(model, "default"), unmasked)


def test_switch_adds_the_z_loss():
    model = tiny_llama()
    lk.add_adapter(model, MixLoraConfig(target_modules=["mlp"], num_experts=4, r=4, routing_strategy="switch",
                                        jitter_noise=0.0, router_aux_loss_coef=0.0))
    model.train()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(4))
    model(input_ids=ids)
    logits = torch.cat([r.out.logits for _, r in pop_aux_records(model, "default")])
    expected = 0.001 * (torch.logsumexp(logits, -1) ** 2).mean()
    model(input_ids=ids)
    torch.testing.assert_close(mixlora_extra_loss(model, "default"), expected)


def test_router_stats_and_traces_report_loads(ids):
    model = tiny_llama()
    lk.add_adapter(model, MixLoraConfig(target_modules=["mlp"], num_experts=4, r=4))
    reset_router_stats(model)
    with torch.no_grad(), record_routing(model) as traces:
        model(input_ids=ids)
    stats = router_stats(model)
    assert len(stats) == 2 and len(traces) == 2
    for key, s in stats.items():
        assert s["tokens"] == ids.numel() and sum(s["load"]) == 2 * ids.numel()  # top-2
        assert math.isclose(sum(s["load_fraction"]), 1.0) and 0 < s["entropy"] <= math.log(4)
        (trace,) = traces[key]
        assert trace["selected"].shape == (*ids.shape, 4) and (trace["selected"].sum(-1) == 2).all()
        torch.testing.assert_close(trace["weights"].sum(-1), torch.ones(ids.shape))
        assert trace["selected"].sum((0, 1)).tolist() == s["load"]


def test_generate_with_kv_cache_matches_no_cache():
    model = tiny_llama()
    lk.add_adapter(model, MixLoraConfig(num_experts=4, r=4))
    perturb(model, scale=0.5)
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
        with lk.disable_adapters(model):
            base = model.generate(ids, use_cache=True, **kwargs)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base)


@pytest.fixture(scope="module")
def tokenizer():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [e.prompt + e.completion for e in load_examples("reverse", "train", n=48, seed=0)]
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=280, special_tokens=["<pad>", "<s>", "</s>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_training_reduces_loss(tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id))
    lk.add_adapter(model, MixLoraConfig(num_experts=4, r=4, target_modules=["q_proj", "v_proj", "mlp", "lm_head"]))
    router_before = ffn_layers(model)[0].adapters["default"].router.gate.weight.detach().clone()
    result = train(model, tokenizer, load_examples("reverse", "train", n=48, seed=0),
                   TrainConfig(steps=25, batch_size=8, lr=1e-2, seed=0, device="cpu"), progress=False)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, result.losses
    assert not torch.equal(ffn_layers(model)[0].adapters["default"].router.gate.weight, router_before)
    assert all(not layer.adapters["default"]._aux for layer in ffn_layers(model)), "routing records leaked"


def test_config_validation_names_the_fix():
    with pytest.raises(lk.ConfigError, match="routing_strategy"):
        MixLoraConfig(routing_strategy="dynamic")
    with pytest.raises(lk.ConfigError, match="top_k"):
        MixLoraConfig(num_experts=2, top_k=3)
    assert MixLoraConfig().router_init_range == 0.02 and MixLoraConfig().router_z_loss_coef == 0.0
    roundtrip = MixLoraConfig.from_dict(MixLoraConfig(routing_strategy="switch").to_dict())
    assert roundtrip == MixLoraConfig(routing_strategy="switch")


def test_perf_row_runs_on_a_tiny_model():
    from lorakit.bench.mixlora_perf import mixlora_perf_row
    from lorakit.bench.perf import EXTRA_ROWS, QUICK

    assert EXTRA_ROWS["mixlora"] is mixlora_perf_row
    (row,) = mixlora_perf_row(QUICK, "cpu")
    assert row["model"] == "llama-tiny" and row["mixlora/lora"]["min"] > 0


# -- the official code (TUDB-Labs/MoE-PEFT @ 40f8cb7), written out from its equations ---------------------------
# moe_peft/adapters/mixlora/model.py ("model.py"), moe_peft/models/modeling_llama.py, moe_peft/common/lora_linear.py.
def official_lora_proj(mlp, delta, name, e, v):
    """lora_linear.py ``Lora.forward`` / ``lora_forward`` (lines 314-329): ``base(x) + lora_b(lora_a(x))·scaling``
    (dropout off), the expert's LoRA on the frozen projection ``name``."""
    base = getattr(mlp, name)  # the frozen host Linear (no bias in Llama)
    return base(v) + (v @ delta.lora_A[name][e].T) @ delta.lora_B[name][e].T * delta.scaling


def official_expert_ffn(mlp, delta, e, v):
    """modeling_llama.py ``LlamaMLP._lora_forward`` (lines 325-349): w2'(act(w1' x) ⊙ w3' x)."""
    w1 = official_lora_proj(mlp, delta, "gate_proj", e, v)
    w3 = official_lora_proj(mlp, delta, "up_proj", e, v)
    return official_lora_proj(mlp, delta, "down_proj", e, mlp.act_fn(w1) * w3)


def official_mixtral_sparse_moe(mlp, delta, x, top_k):
    """model.py ``MixtralSparseMoe.forward`` (lines 164-240) with ``_mixlora_compatible_forward`` (12-29):
    float32 gate, softmax over all experts, top-k, renormalise, ``index_add_`` of w · FFN_e(x) per expert."""
    hidden = x.reshape(-1, x.shape[-1]).float()
    router_logits = hidden @ delta.router.gate.weight.float().T  # gate_: Linear(d, E, bias=False)
    routing_weights, selected = torch.topk(torch.softmax(router_logits, dim=1), top_k, dim=-1)
    routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
    final = torch.zeros(hidden.shape[0], x.shape[-1])
    expert_mask = torch.nn.functional.one_hot(selected, num_classes=delta.num_experts).permute(2, 1, 0)  # (E, k, N)
    for e in range(delta.num_experts):
        idx, top_x = torch.where(expert_mask[e])
        final.index_add_(0, top_x, official_expert_ffn(mlp, delta, e, hidden[top_x]) * routing_weights[top_x, idx, None])
    return final.view(x.shape), router_logits


def official_mixtral_balance_loss(gate_logits, num_experts, top_k, attention_mask):
    """model.py ``_mixtral_load_balancing_loss_func`` (lines 32-83), attention-mask branch; ``gate_logits`` are
    every layer's router logits concatenated layer after layer (common/moe_utils.py ``unpack_router_logits``)."""
    routing_weights = torch.softmax(gate_logits, dim=-1)
    _, selected = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = torch.nn.functional.one_hot(selected, num_experts)  # (L·B·S, k, E)
    batch, seq = attention_mask.shape
    layers = routing_weights.shape[0] // (batch * seq)
    slot_mask = attention_mask[None, :, :, None, None].expand(layers, batch, seq, top_k, num_experts).reshape(
        -1, top_k, num_experts)
    tokens_per_expert = (expert_mask.float() * slot_mask).sum(0) / slot_mask.sum(0)  # (k, E)
    prob_mask = attention_mask[None, :, :, None].expand(layers, batch, seq, num_experts).reshape(-1, num_experts)
    router_prob_per_expert = (routing_weights * prob_mask).sum(0) / prob_mask.sum(0)  # (E,)
    return (tokens_per_expert * router_prob_per_expert.unsqueeze(0)).sum() * num_experts


def official_dynamic_top_p(probs, top_p):
    """model.py ``_dynamic_top_p`` (lines 243-256, temperature 0) on the softmax probabilities, as
    ``DynamicSparseMoe.forward`` calls it (391-394): the kept probabilities (not renormalised) and a (N, E) mask."""
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    over = sorted_p.cumsum(dim=-1) > top_p
    threshold = torch.nn.functional.one_hot(over.long().argmax(dim=-1), num_classes=order.shape[-1]).bool()
    dropped = over & ~threshold  # the expert whose mass crosses top_p is kept
    kept = torch.zeros_like(dropped).scatter(1, order, ~dropped)
    return probs * kept, kept


def official_switch_route(probs, capacity):
    """model.py ``SwitchSparseMoe.route`` (lines 557-580): argmax one-hot, priority = cumsum over the sequence
    (dim -2 of (batch, seq, E)), tokens past ``expert_capacity`` masked out."""
    onehot = torch.nn.functional.one_hot(probs.argmax(-1), num_classes=probs.shape[-1])  # (B, S, E)
    return (onehot * (onehot.cumsum(dim=-2) <= capacity)).bool()


def _capture_ffn_io(model):
    seen = []
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
             for layer in ffn_layers(model)]
    return seen, hooks


def test_topk_forward_and_balance_loss_equal_the_official_mixtral_sparse_moe():
    model = tiny_llama()
    lk.add_adapter(model, MixLoraConfig(target_modules=["mlp"], num_experts=4, top_k=2, r=4, lora_dropout=0.0))
    perturb(model, scale=0.05)
    model.train()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    seen, hooks = _capture_ffn_io(model)
    with lk.routing(token_mask=mask):
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    logits = []
    for layer, (x, out) in zip(ffn_layers(model), seen):
        want, layer_logits = official_mixtral_sparse_moe(layer.base_layer, layer.adapters["default"], x, top_k=2)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        logits.append(layer_logits)
    want_loss = 0.001 * official_mixtral_balance_loss(torch.cat(logits), 4, 2, mask)  # config.py default coef
    torch.testing.assert_close(mixlora_extra_loss(model, "default"), want_loss)


def _routed_with_probs(x, **config):
    """lorakit's routing of x by a fresh MixLoRA FFN delta, and the softmax of its gate logits (x's shape, E last)."""
    model = lk.add_adapter(tiny_llama(), MixLoraConfig(target_modules=["mlp"], num_experts=4, r=4, **config))
    delta = ffn_layers(model)[0].adapters["default"]
    with torch.no_grad():
        return delta.route(x), torch.softmax(x @ delta.router.gate.weight.T, -1)


def test_top_p_and_switch_selection_equal_the_official_routers():
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(6))
    routed, probs = _routed_with_probs(x, routing_strategy="top_p", top_p=0.8, router_init_range=0.5)
    official_weights, kept = official_dynamic_top_p(probs.reshape(-1, 4), 0.8)
    assert torch.equal(routed.selected, kept) and (kept.sum(-1) > 1).any()
    # the documented deviation: the official code keeps the unnormalised probabilities, lorakit renormalises
    torch.testing.assert_close(routed.weights, official_weights / official_weights.sum(-1, keepdim=True))

    routed, probs = _routed_with_probs(x, routing_strategy="switch", expert_capacity=2, jitter_noise=0.0)
    official = official_switch_route(probs, 2).reshape(-1, 4)  # probs (B, S, E): capacity per sequence
    assert torch.equal(routed.selected, official) and not official.any(-1).all()


def official_switch_router_loss(router_logits, z_coef, aux_coef):
    """model.py ``SwitchRouterLoss.forward`` (lines 480-485) with ``_switch_router_z_loss_func`` (452-455) and
    ``_switch_load_balancing_loss_func`` (458-469): the argmax is recomputed from the probabilities, so tokens
    the capacity dropped still count for their argmax expert."""
    z = (torch.logsumexp(router_logits, dim=-1) ** 2).sum() / router_logits.shape[0]
    probs = torch.softmax(router_logits, dim=-1)
    num_experts = probs.shape[-1]
    argmax = torch.nn.functional.one_hot(probs.argmax(-1), num_classes=num_experts).float()
    aux = (argmax.mean(0) * probs.mean(0)).mean() * num_experts ** 2
    return z_coef * z + aux_coef * aux


def test_switch_losses_equal_the_official_switch_router_loss():
    model = tiny_llama()
    lk.add_adapter(model, MixLoraConfig(target_modules=["mlp"], num_experts=4, r=4, routing_strategy="switch",
                                        expert_capacity=2, jitter_noise=0.0, router_aux_loss_coef=0.01))
    model.train()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(7))
    model(input_ids=ids)
    records = [r for _, r in pop_aux_records(model, "default")]
    assert not torch.cat([r.out.selected for r in records]).any(-1).all()  # the capacity dropped some tokens
    want = official_switch_router_loss(torch.cat([r.out.logits for r in records]), 0.001, 0.01)
    model(input_ids=ids)
    torch.testing.assert_close(mixlora_extra_loss(model, "default"), want)
