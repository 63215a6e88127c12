"""LLaVA-MoLE against the official code (forwchen/LLaVA-MoLE moe.py): top-1 and dense paths; the straight-through
top-1 weight trains the router from the task loss; the MoLE balance loss (no ×E) on a hand example."""

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
    assert delta.router.gate.bias is not None and delta.num_experts == 3


def official_lora_moe_lm(mlp, delta, x, dense):
    """Transcription of ``LoRA_MOE_LM.forward`` (moe.py:113-134) with ``forward_lora_moe`` (:88-99, dense) and
    ``forward_lora_moe_sparse`` (:101-110); ``LoRALayer.forward`` (:26-29) is ``X Aᵀ Bᵀ · α/r`` (dropout off).
    The release is Llama-only (gate/up/down); for GPT-2 the same rule is applied to c_fc / c_proj."""
    spec = delta.spec
    gate_lin = delta.router.gate
    logits = x @ gate_lin.weight.T + gate_lin.bias  # :115  self.router(x)
    routing = torch.softmax(logits, dim=-1)  # :116
    index = routing.max(-1, keepdim=True)[1]  # :117

    def lora(name, i, X):  # moe[i](X)
        return X @ delta.lora_A[name][i].T @ delta.lora_B[name][i].T * delta.scaling

    def forward_lora_moe(X, name):  # :88-99
        out = [lora(name, i, X) for i in range(delta.num_experts)]
        return getattr(mlp, name)(X) + (torch.stack(out, 2) * routing[:, :, :, None]).sum(2)

    def forward_lora_moe_sparse(X, name):  # :101-110
        lora_out = torch.zeros_like(getattr(mlp, name)(X))
        for i in range(delta.num_experts):
            id1, id2, _ = torch.where(index == i)
            lora_out[id1, id2] = lora(name, i, X[id1, id2])
        return getattr(mlp, name)(X) + lora_out

    mix = forward_lora_moe if dense else forward_lora_moe_sparse
    act = getattr(mlp, spec.act)
    if spec.gate:
        h = act(mix(x, spec.gate)) * mix(x, spec.up)  # :121-128
    else:
        h = act(mix(x, spec.up))
    return mix(h, spec.down)  # :130-133


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("dense", [False, True], ids=["top1", "dense"])
def test_forward_equals_official(factory, dense):
    model = factory()
    lk.add_adapter(model, MoleConfig(target_modules=["mlp"], r=4, lora_dropout=0.0, dense=dense))
    perturb(model, scale=0.05)
    layer = ffn_layers(model)[0]
    delta = layer.adapters["default"]
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer(x)
        want = official_lora_moe_lm(layer.base_layer, delta, x, dense)
        assert (want - layer.base_layer(x)).abs().max() > 1e-2  # the experts change the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_router_is_a_default_initialised_linear_with_bias():
    model = lk.add_adapter(tiny_llama(), MoleConfig(r=4, dense=True))
    gate = ffn_layers(model)[0].adapters["default"].router.gate
    bound = 1 / 32 ** 0.5  # nn.Linear(d_model, E) default: U(±1/√in) for weight and bias (moe.py:86)
    assert gate.weight.abs().max() <= bound and gate.weight.abs().max() > 0.5 * bound
    assert gate.bias.abs().max() <= bound and gate.bias.abs().max() > 0


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


def test_dense_stays_zero_init_and_counts_the_argmax_for_the_balance_loss(ids):
    model = tiny_llama()
    ref = model(input_ids=ids).logits
    lk.add_adapter(model, MoleConfig(r=4, dense=True))
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=0)
    with torch.no_grad(), record_routing(model) as traces:
        model(input_ids=ids)
    for (trace,) in traces.values():
        # every expert is mixed with its probability; the balance loss counts the argmax (model.py:279-285,
        # routing idx = the one-hot of the top-1 expert)
        assert (trace["selected"].sum(-1) == 1).all()
        assert (trace["weights"] > 0).all()
        torch.testing.assert_close(trace["weights"].sum(-1), torch.ones(ids.shape))
        torch.testing.assert_close(trace["weights"].argmax(-1), trace["selected"].float().argmax(-1))
