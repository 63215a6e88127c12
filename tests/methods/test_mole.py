"""LLaVA-MoLE: top-1 and dense expert FFNs equal a per-token loop; the straight-through top-1 weight trains the
router from the task loss; the MoLE balance loss (no ×E) on a hand example."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.methods.mole import MoleConfig, mole_extra_loss
from lorakit.mixtures import record_routing
from lorakit.mixtures.base import AuxRecord
from lorakit.mixtures.router import RouterOutput

from lk_models import tiny_gpt2, tiny_llama
from methods.test_mixlora import ffn_layers, perturb, reference_ffn


def test_defaults_follow_the_release():
    config = MoleConfig()
    assert (config.num_experts, config.r, config.lora_alpha, config.dense) == (3, 16, 32, False)
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "mlp"]
    model = lk.add_adapter(tiny_llama(), MoleConfig(r=4))
    delta = ffn_layers(model)[0].adapters["default"]
    assert delta.router.gate.bias is not None and delta.n_experts == 3


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("dense", [False, True], ids=["top1", "dense"])
def test_batched_path_equals_loop_reference(factory, dense):
    model = factory()
    lk.add_adapter(model, MoleConfig(target_modules=["mlp"], r=4, lora_dropout=0.0, dense=dense))
    perturb(model, scale=0.05)
    layer = ffn_layers(model)[0]
    delta = layer.adapters["default"]
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = layer(x)
        gate = delta.router.gate
        probs = torch.softmax(x.reshape(-1, 32) @ gate.weight.T + gate.bias, -1)
        if dense:
            weights, selected = probs, torch.ones_like(probs, dtype=torch.bool)
        else:
            selected = torch.nn.functional.one_hot(probs.argmax(-1), 3).bool()
            weights = selected.float()  # the released sparse path: no gate weight on the expert output
        ref = reference_ffn(layer.base_layer, delta, x, weights, selected)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def test_top1_weight_is_one_and_the_task_loss_trains_the_router(ids):
    model = tiny_llama()
    lk.add_adapter(model, MoleConfig(target_modules=["mlp"], r=4, lora_dropout=0.0, router_aux_loss_coef=0.0))
    perturb(model)
    with torch.no_grad(), record_routing(model) as traces:
        model(input_ids=ids)
    for (trace,) in traces.values():
        assert (trace["selected"].sum(-1) == 1).all()
        assert torch.equal(trace["weights"], trace["selected"].float())
    model.train()
    loss = model(input_ids=ids, labels=ids).loss + mole_extra_loss(model, "default")
    loss.backward()
    for layer in ffn_layers(model):
        gate = layer.adapters["default"].router.gate
        assert gate.weight.grad.abs().sum() > 0 and gate.bias.grad.abs().sum() > 0


def test_balance_loss_on_a_hand_example():
    model = tiny_llama()
    lk.add_adapter(model, MoleConfig(target_modules=["mlp"], r=4))
    layers = ffn_layers(model)

    def record(probs, mask):
        probs = torch.tensor(probs)
        selected = torch.nn.functional.one_hot(probs.argmax(-1), 3).bool()
        out = RouterOutput(logits=probs.log(), probs=probs, weights=probs * selected, selected=selected)
        return AuxRecord(out=out, token_mask=torch.tensor(mask), keys=None)

    layers[0].adapters["default"]._aux.append(record([[0.6, 0.3, 0.1], [0.5, 0.2, 0.3]], [True, True]))
    layers[1].adapters["default"]._aux.append(record([[0.1, 0.1, 0.8], [0.3, 0.6, 0.1]], [True, False]))
    # real tokens: f = (2/3, 0, 1/3), mean p = (0.4, 0.2, 0.4): Σ f·p = 0.4 (no ×E), × coef 0.01
    torch.testing.assert_close(mole_extra_loss(model, "default"), torch.tensor(0.004))
    assert not layers[0].adapters["default"]._aux  # records are consumed


def test_dense_mixes_all_experts_and_stays_zero_init(ids):
    model = tiny_llama()
    ref = model(input_ids=ids).logits
    lk.add_adapter(model, MoleConfig(r=4, dense=True))
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=0)
    with torch.no_grad(), record_routing(model) as traces:
        model(input_ids=ids)
    for (trace,) in traces.values():
        assert trace["selected"].all()
        torch.testing.assert_close(trace["weights"].sum(-1), torch.ones(ids.shape))
