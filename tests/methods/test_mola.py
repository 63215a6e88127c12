"""MoLA against the official code (GCYZSL/MoLA): the per-layer mixture forward, the expert allocation, the
router initialisation and the per-decoder-layer balance loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.core.targeting import layer_index
from lorakit.methods.mola import MolaConfig

from lk_models import tiny_llama


def official_linear_moe(x, router_w, experts, top_k, scaling):
    """Transcription of ``Linear_MoE.forward`` (src/mola_lora_hacked.py:831-887, dropout off), LoRA part only.
    ``experts``: list of (A (r, in), B (out, r))."""
    batch_size, sequence_length, hidden_dim = x.shape
    x = x.view(-1, hidden_dim)
    router_logits = x @ router_w.T  # :840
    routing_weights_before = F.softmax(router_logits, dim=1, dtype=torch.float)  # :842
    routing_weights, selected_experts = torch.topk(routing_weights_before, top_k, dim=-1)  # :843
    routing_weights /= routing_weights.sum(dim=-1, keepdim=True)  # :844
    expert_mask = F.one_hot(selected_experts, num_classes=len(experts)).permute(2, 1, 0)  # :847
    final = torch.zeros(batch_size * sequence_length, experts[0][1].shape[0])
    for expert_idx, (A, B) in enumerate(experts):  # :853-878
        idx, top_x = torch.where(expert_mask[expert_idx])
        if top_x.shape[0] == 0:
            continue
        current_state = x[None, top_x].reshape(-1, hidden_dim)
        expert_output = (current_state @ A.T @ B.T) * scaling
        final.index_add_(0, top_x, expert_output * routing_weights[top_x, idx, None])
    return final.reshape(batch_size, sequence_length, -1), router_logits


def official_balance_loss(gate_logits, num_experts, top_k):
    """Transcription of ``load_balancing_loss_func`` (src/mola_modeling_llama_hacked.py:22-74): one entry of
    ``gate_logits`` per decoder layer, that layer's modules' router logits concatenated (:248-268, :524-528)."""
    overall_loss = torch.tensor(0, dtype=torch.float32)
    for layer_i in range(len(gate_logits)):
        routing_weights = F.softmax(gate_logits[layer_i], dim=-1)  # :51
        _, selected_experts = torch.topk(routing_weights, top_k[layer_i], dim=-1)  # :53
        expert_mask = F.one_hot(selected_experts.reshape(-1), num_experts[layer_i])  # :56-58
        expert_mask_1 = torch.sum(expert_mask, dim=-2)  # :59
        tokens_per_expert = expert_mask_1 / torch.sum(expert_mask_1)  # :61
        router_prob_per_expert = torch.mean(routing_weights, dim=0)  # :69
        overall_loss += torch.sum(tokens_per_expert * router_prob_per_expert) * num_experts[layer_i]  # :72-73
    return overall_loss


def _deltas(model):
    return {path: layer.adapters["default"] for path, layer in adapter_layers(model)}


def _randomised(config):
    model = tiny_llama()
    lk.add_adapter(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for d in _deltas(model).values():
            d.lora_B.normal_(std=0.1)
            d.router.gate.weight.normal_(std=1.0)  # peaked routers: the top-k choice matters
    return model


def test_forward_equals_official_linear_moe():
    model = _randomised(MolaConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts="3-5", top_k=2,
                                   target_modules=["q_proj", "down_proj"]))
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, p=path: inputs.__setitem__(p, a[0].detach()))
             for path, layer in adapter_layers(model)]
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    outputs = {}
    hooks += [layer.register_forward_hook(lambda m, a, o, p=path: outputs.__setitem__(p, o.detach()))
              for path, layer in adapter_layers(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for path, layer in adapter_layers(model):
        d = layer.adapters["default"]
        E, r = d.num_experts, d.r
        assert E == (3 if layer_index(path + ".", None) == 0 else 5)  # "3-5" over the 2 layers
        experts = [(d.lora_A[e * r:(e + 1) * r].detach(), d.lora_B[:, e * r:(e + 1) * r].detach()) for e in range(E)]
        want, _ = official_linear_moe(inputs[path], d.router.gate.weight.detach(), experts, 2, 8 / 4)
        base = layer.base_layer(inputs[path])
        torch.testing.assert_close(outputs[path] - base, want, atol=1e-5, rtol=1e-4)


def test_balance_loss_equals_official_per_decoder_layer():
    config = MolaConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts="2-4", top_k=2,
                        target_modules="all-linear", use_balance_loss=True)
    model = _randomised(config).train()
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, p=path: inputs.__setitem__(p, a[0].detach()))
             for path, layer in adapter_layers(model)]
    ids = torch.randint(0, 96, (3, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    got = lk.get_method("mola").extra_loss(model, "default")

    deltas = _deltas(model)
    per_layer = {}
    for path, x in inputs.items():  # the official concatenates the modules' logits of one decoder layer
        logits = x.reshape(-1, x.shape[-1]) @ deltas[path].router.gate.weight.detach().T
        per_layer.setdefault(layer_index(path + ".", None), []).append(logits)
    layers = sorted(per_layer)
    gate_logits = tuple(torch.cat(per_layer[i], dim=0) for i in layers)
    assert [g.shape[0] for g in gate_logits] == [7 * 24, 7 * 24]  # 7 adapted modules × 24 tokens per layer
    want = 0.001 * official_balance_loss(gate_logits, [2, 4], [2, 2])  # coefficient: modeling file :1149, :1321
    torch.testing.assert_close(got.detach(), want, atol=1e-7, rtol=1e-5)
    assert got.requires_grad


def test_balance_loss_only_when_enabled():
    model = _randomised(MolaConfig(r=4, num_experts="2-4", target_modules=["q_proj"])).train()
    assert MolaConfig().use_balance_loss is False and MolaConfig().router_aux_loss_coef == 0.001
    model(input_ids=torch.randint(0, 96, (2, 5)))
    assert float(lk.get_method("mola").extra_loss(model, "default")) == 0.0


def test_uniform_routing_gives_loss_one_per_layer():
    from lorakit.mixtures.router import assignment_balance_loss

    probs = torch.full((6, 4), 0.25)
    selected = torch.zeros(6, 4, dtype=torch.bool)
    selected[torch.arange(6)[:, None], torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [1, 2]])] = True
    torch.testing.assert_close(assignment_balance_loss(probs, selected), torch.tensor(1.0))


def test_router_and_experts_initialised_as_official():
    model = tiny_llama()
    lk.add_adapter(model, MolaConfig(r=4, num_experts="8-8", target_modules=["up_proj"]))
    for d in _deltas(model).values():
        w = d.router.gate.weight
        bound = 1 / math.sqrt(w.shape[1])  # kaiming_uniform_(a=√5): U(-1/√in, 1/√in)  (mola_lora_hacked.py:741)
        assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
        assert d.router.gate.bias is None and (d.lora_B == 0).all()


def test_an_allocation_with_more_groups_than_layers_is_refused_naming_num_experts():
    """Was: num_experts="2-4-6" on tiny_llama's 2 layers added an adapter whose third group (6 experts) went to no
    layer: the allocation the user typed was silently not the one trained."""
    model = tiny_llama()
    with pytest.raises(lk.ConfigError, match=r"num_experts='2-4-6' allocates experts over 3 groups of layers, but the "
                                             r"model has 2 decoder layers; give at most 2 counts") as e:
        lk.add_adapter(model, MolaConfig(num_experts="2-4-6", top_k=1, target_modules=["q_proj"]))
    assert e.value.field == "MolaConfig.num_experts" and not lk.adapter_names(model)
    lk.add_adapter(model, MolaConfig(num_experts="2-4", top_k=1, target_modules=["q_proj"]))
