"""SMoRA against the official code (StyxXuan/smora, packages/peft/src/peft/tuners/srmole/layer.py):
biased sigmoid gate, k-scaled normalised top-k scores, α/k scaling, per-forward bias update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.core.delta import LayerInfo
from lorakit.core.model import adapter_layers
from lorakit.methods.smora import SmoraConfig, SmoraLinear
from lorakit.mixtures import record_routing, reset_router_stats, router_stats

from lk_models import tiny_llama, tiny_llama_for, word_level_tokenizer


def official_srmole(x, A, B, Wg, biases, k, alpha, training, rate):
    """Transcription of SRMoLELinear.forward (srmole/layer.py, dropout off, dense_compute path) and of
    update_layer's scaling. Returns (delta, biases after the forward)."""
    scaling = alpha / k  # layer.py:83  scaling = lora_alpha / activate_r
    logits = torch.sigmoid(x @ Wg.T)  # :157-158  router(x_dropped), sigmoid
    logits = logits + biases[None, None, :]  # :162-163
    top_k_logits, indices = logits.topk(k, dim=-1)  # :164
    biases = biases.clone()
    if training:  # :167-175
        expert_counts = torch.bincount(indices.view(-1), minlength=A.shape[0]).float()
        e_i = expert_counts.mean() - expert_counts
        biases += rate * e_i.sign()
    sparse_logits = torch.zeros_like(logits).scatter(-1, indices, top_k_logits)  # :179-180
    gating_output = sparse_logits / sparse_logits.sum(dim=-1, keepdim=True)  # :181
    gating_output = gating_output * k  # :183
    xf = x.reshape(-1, x.shape[-1])
    g = gating_output.reshape(-1, A.shape[0])
    mid = torch.einsum("rj,ij->ir", A, xf)  # :196
    out = torch.einsum("ir,jr->ijr", mid, B)  # :197
    out = torch.einsum("ijr,ir->ij", out, g)  # :198
    return (out * scaling).view(*x.shape[:-1], -1), biases  # :211-214


def _random_delta(r=16, k=4, alpha=8.0, rate=1e-5, d_in=12, d_out=10):
    torch.manual_seed(0)
    delta = SmoraLinear(LayerInfo("linear", d_in, d_out, False),
                        SmoraConfig(r=r, top_k=k, lora_alpha=alpha, lora_dropout=0.0, bias_update_rate=rate))
    with torch.no_grad():
        delta.lora_B.normal_()
        delta.router.selection_bias.normal_(std=0.3)  # large enough to change which ranks are chosen
    return delta


@pytest.mark.parametrize("training", [False, True])
def test_forward_and_bias_update_equal_official(training):
    delta = _random_delta(rate=0.01).train(training)
    before = delta.router.selection_bias.clone()
    x = torch.randn(2, 5, 12)
    A, B, Wg = delta.lora_A.detach(), delta.lora_B.detach(), delta.router.gate.weight.detach()
    want, want_bias = official_srmole(x, A, B, Wg, delta.router.selection_bias.clone(), 4, 8.0, training, 0.01)
    got = delta(x, torch.zeros(2, 5, 10), None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta.router.selection_bias, want_bias)
    moved = (delta.router.selection_bias - before).abs()
    assert torch.allclose(moved, torch.full((16,), 0.01 if training else 0.0))  # ±u per rank in training


def test_update_size_at_the_paper_setting():
    """r=64, k=8, α=16 (the official Llama-2 config): per token the update is α · Σ ĝ_i/k · b_i a_iᵀ x; the
    earlier softmax gate at α/k had 1/k of this size."""
    delta = _random_delta(r=64, k=8, alpha=16.0, d_in=32, d_out=24)
    x = torch.randn(3, 7, 32)
    want, _ = official_srmole(x, delta.lora_A.detach(), delta.lora_B.detach(), delta.router.gate.weight.detach(),
                              delta.router.selection_bias.clone(), 8, 16.0, False, 0)
    got = delta.eval()(x, torch.zeros(3, 7, 24), None)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert abs(float(got.detach().norm() / want.norm()) - 1.0) < 1e-5
    assert delta.scaling == 2.0 and delta.top_k * delta.scaling == 16.0


def test_defaults_follow_the_official_code():
    c = SmoraConfig()
    assert c.bias_update_rate == 1e-5  # layer.py:111
    delta = SmoraLinear(LayerInfo("linear", 8, 8, False), c)
    assert delta.router.gate.bias is None  # layer.py:82
    assert (delta.lora_B == 0).all()  # layer.py:94
    assert lk.get_method("smora").on_step is None  # the bias moves inside forward, not per optimizer step


def test_exactly_k_ranks_active_per_token(ids):
    model = tiny_llama()
    lk.add_adapter(model, SmoraConfig(r=16, top_k=3, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.adapters["default"].lora_B.normal_()
    with record_routing(model) as traces:
        model(input_ids=ids)
    assert len(traces) == 4  # 2 layers × (q_proj, down_proj)
    for entries in traces.values():
        (trace,) = entries
        assert trace["selected"].shape == (*ids.shape, 16)
        assert (trace["selected"].sum(-1) == 3).all()
        assert (trace["weights"][~trace["selected"]] == 0).all()
        torch.testing.assert_close(trace["weights"].sum(-1), torch.ones(ids.shape))


class Host(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x)


def _skewed_host(rate: float) -> Host:
    torch.manual_seed(0)
    host = Host()
    lk.add_adapter(host, SmoraConfig(r=8, top_k=2, target_modules=["proj"], bias_update_rate=rate))
    (delta,) = [layer.adapters["default"] for _, layer in adapter_layers(host)]
    with torch.no_grad():
        delta.router.gate.weight[:2] += 0.5  # inputs have a positive mean: ranks 0 and 1 win every token
    return host.train()


def _imbalance(model) -> float:
    loads = [torch.tensor(s["load"]) for s in router_stats(model).values()]
    return float(sum(v.std() / v.mean() for v in loads) / len(loads))


@pytest.mark.parametrize("rate", [0.02, 0.0])
def test_selection_bias_moves_load_toward_balance(rate):
    host = _skewed_host(rate)
    g = torch.Generator().manual_seed(1)
    history = []
    for _ in range(60):
        reset_router_stats(host)
        host(torch.randn(64, 16, generator=g) + 2.0)
        history.append(_imbalance(host))
    bias = host.proj.adapters["default"].router.selection_bias
    assert history[0] > 1.5  # nearly all tokens on 2 of 8 ranks
    if rate == 0:
        assert min(history) > 1.5 and (bias == 0).all()
        return
    assert max(history[-10:]) < 0.5 * history[0]
    assert (bias[:2] < 0).all() and (bias[2:] > bias[:2].max()).all()  # overloaded ranks pushed down


def test_inference_does_not_move_the_bias():
    host = _skewed_host(0.05).eval()
    host(torch.randn(4, 16))
    assert (host.proj.adapters["default"].router.selection_bias == 0).all()


def test_bias_round_trips_through_save_and_load(tmp_path):
    host = _skewed_host(0.05)
    for _ in range(5):
        host(torch.randn(32, 16) + 2.0)
    host.eval()
    x = torch.randn(7, 16) + 2.0
    want = host(x)
    lk.save_adapter(host, tmp_path)
    torch.manual_seed(0)
    fresh = Host()  # the same base weights as _skewed_host's
    lk.load_adapter(fresh, tmp_path)
    assert (fresh.proj.adapters["default"].router.selection_bias != 0).any()
    torch.testing.assert_close(fresh(x), want, atol=1e-6, rtol=0)


def test_training_loop_moves_the_bias_once_per_forward():
    from lorakit.data import load_examples
    from lorakit.training import TrainConfig, train

    examples = load_examples("reverse,sort", "train", n=8)
    tokenizer = word_level_tokenizer(examples)
    model = tiny_llama_for(tokenizer, bos_token_id=1, eos_token_id=2)
    lk.add_adapter(model, SmoraConfig(r=8, top_k=2, target_modules=["q_proj", "v_proj"], bias_update_rate=0.01))
    train(model, tokenizer, examples, TrainConfig(steps=3, batch_size=4, lr=1e-2, max_length=64, device="cpu"),
          progress=False)
    for _, layer in adapter_layers(model):
        bias = layer.adapters["default"].router.selection_bias
        # ±u per training forward, 3 forwards; every value is a multiple of u
        assert (bias != 0).any() and bias.abs().max() <= 3 * 0.01 + 1e-7
        torch.testing.assert_close(bias / 0.01, (bias / 0.01).round(), atol=1e-4, rtol=0)
