"""SMoRA: exact batched rank routing, k active ranks per token, load-driven selection bias."""

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


class Host(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x)


def _deltas(model):
    return [layer.adapters["default"] for _, layer in adapter_layers(model)]


def test_batched_forward_equals_per_token_loop():
    torch.manual_seed(0)
    config = SmoraConfig(r=16, top_k=4, lora_alpha=8, lora_dropout=0.0)
    delta = SmoraLinear(LayerInfo("linear", 12, 10, False), config).eval()
    with torch.no_grad():
        delta.lora_B.normal_()
        delta.router.gate.weight.normal_()
        delta.router.selection_bias.normal_(std=2.0)  # large enough to change which ranks are chosen
    x = torch.randn(2, 5, 12)
    got = delta(x, torch.zeros(2, 5, 10), None)

    A, B, Wg, b = delta.lora_A, delta.lora_B, delta.router.gate.weight, delta.router.selection_bias
    want = torch.zeros(10, 10)
    changed_by_bias = 0
    for t, xt in enumerate(x.reshape(-1, 12)):
        logits = Wg @ xt
        chosen = (logits + b).topk(4).indices  # the bias picks the ranks ...
        g = torch.softmax(logits[chosen], dim=0)  # ... the unbiased scores weigh them
        changed_by_bias += int(set(chosen.tolist()) != set(logits.topk(4).indices.tolist()))
        want[t] = config.lora_alpha / config.top_k * sum(g[j] * B[:, i] * (A[i] @ xt) for j, i in enumerate(chosen))
    assert changed_by_bias > 0
    torch.testing.assert_close(got.reshape(-1, 10), want, atol=1e-5, rtol=0)


def test_scaling_is_alpha_over_k():
    delta = SmoraLinear(LayerInfo("linear", 4, 4, False), SmoraConfig(r=64, top_k=8, lora_alpha=16))
    assert delta.scaling == 2.0


def test_exactly_k_ranks_active_per_token(ids):
    model = tiny_llama()
    lk.add_adapter(model, SmoraConfig(r=16, top_k=3, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for d in _deltas(model):
            d.lora_B.normal_()
    with record_routing(model) as traces:
        model(input_ids=ids)
    assert len(traces) == 4  # 2 layers × (q_proj, down_proj)
    for entries in traces.values():
        (trace,) = entries
        assert trace["selected"].shape == (*ids.shape, 16)
        assert (trace["selected"].sum(-1) == 3).all()
        assert (trace["weights"][~trace["selected"]] == 0).all()
        torch.testing.assert_close(trace["weights"].sum(-1), torch.ones(ids.shape))


def _imbalance(model) -> float:
    """Coefficient of variation of the per-rank load, averaged over layers."""
    loads = [torch.tensor(s["load"]) for s in router_stats(model).values()]
    return float(sum(v.std() / v.mean() for v in loads) / len(loads))


def _skewed_host(rate: float) -> Host:
    torch.manual_seed(0)
    host = Host()
    lk.add_adapter(host, SmoraConfig(r=8, top_k=2, target_modules=["proj"], bias_update_rate=rate))
    (delta,) = _deltas(host)
    with torch.no_grad():
        delta.router.gate.weight[:2] += 0.05  # inputs have a positive mean: ranks 0 and 1 win every token
    return host.train()


@pytest.mark.parametrize("rate", [0.05, 0.0])
def test_selection_bias_moves_load_toward_balance(rate):
    host = _skewed_host(rate)
    on_step = lk.get_method("smora").on_step
    g = torch.Generator().manual_seed(1)
    history = []
    for step in range(1, 41):
        reset_router_stats(host)
        host(torch.randn(64, 16, generator=g) + 2.0)
        history.append(_imbalance(host))
        on_step(host, "default", step, 40)
    (delta,) = _deltas(host)
    assert history[0] > 1.5  # nearly all tokens on 2 of 8 ranks
    if rate == 0:
        assert min(history) > 1.5 and (delta.router.selection_bias == 0).all()
        return
    assert max(history[-10:]) < 0.5 * history[0]
    bias = delta.router.selection_bias
    assert (bias[:2] < 0).all() and (bias[2:] > bias[:2].max()).all()  # overloaded ranks pushed down
    assert (delta.pending_load == 0).all()  # consumed by the update


def test_padding_does_not_count_toward_load():
    host = _skewed_host(0.05)
    (delta,) = _deltas(host)
    x = torch.randn(2, 6, 16) + 2.0
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]])
    with lk.routing(token_mask=mask):
        host(x)
    assert int(delta.pending_load.sum()) == 8 * 2  # 8 real tokens × k
    host.eval()
    host(x)  # inference does not move the bias
    assert int(delta.pending_load.sum()) == 16


def test_bias_round_trips_through_save_and_load(tmp_path):
    host = _skewed_host(0.05)
    on_step = lk.get_method("smora").on_step
    for step in range(1, 6):
        host(torch.randn(32, 16) + 2.0)
        on_step(host, "default", step, 5)
    host.eval()
    x = torch.randn(7, 16) + 2.0
    want = host(x)
    lk.save_adapter(host, tmp_path)
    torch.manual_seed(0)
    fresh = Host()  # the same base weights as _skewed_host's
    lk.load_adapter(fresh, tmp_path)
    (delta,) = _deltas(fresh)
    assert (delta.router.selection_bias != 0).any()
    torch.testing.assert_close(fresh(x), want, atol=1e-6, rtol=0)


def test_training_loop_updates_the_bias_after_each_step():
    from lorakit.data import load_examples
    from lorakit.training import TrainConfig, train

    examples = load_examples("reverse,sort", "train", n=8)
    tokenizer = word_level_tokenizer(examples)
    model = tiny_llama_for(tokenizer, bos_token_id=1, eos_token_id=2)
    lk.add_adapter(model, SmoraConfig(r=8, top_k=2, target_modules=["q_proj", "v_proj"], bias_update_rate=0.01))
    train(model, tokenizer, examples, TrainConfig(steps=3, batch_size=4, lr=1e-2, max_length=64, device="cpu"),
          progress=False)
    for d in _deltas(model):
        bias = d.router.selection_bias
        assert (bias != 0).any() and bias.abs().max() <= 3 * 0.01 + 1e-9  # ±u per step, 3 steps
        assert (d.pending_load == 0).all()
