"""MixDA: knowledge stage (domain adapters routed by key, general-data MSE regulariser), task stage (gate over
[domains…, FFN] on the last real token, frozen domain adapters, optional task adapter), stage switching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.core.delta import LayerInfo
from lorakit.core.model import adapter_layers, adapter_state
from lorakit.methods.mixda import MixdaAdapter, MixdaConfig, mixda_extra_loss, set_mixda_stage
from lorakit.mixtures import record_routing

from lk_models import tiny_llama, tiny_llama_for, word_level_tokenizer

INFO = LayerInfo("linear", 16, 6, False)  # a down_proj: intermediate 16 -> hidden 6


def randomised(delta: MixdaAdapter, seed: int = 0) -> MixdaAdapter:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*delta.parameters(), *(b for n, b in delta.named_buffers() if n.rsplit(".", 1)[-1] in
                                         ("weight", "bias", "down_weight", "down_bias", "up_weight", "up_bias"))]:
            t.copy_(torch.randn(t.shape, generator=g) * 0.4)
    return delta


def adapter_outputs(delta: MixdaAdapter, x: torch.Tensor) -> list[torch.Tensor]:
    """Loop reference: a_k(x) = U_k GELU(D_k x + d_k) + u_k for each domain adapter k."""
    b = delta.bottleneck
    outs = []
    for k in range(delta.n_domains):
        h = F.gelu(x @ delta.down_weight[k * b:(k + 1) * b].T + delta.down_bias[k * b:(k + 1) * b])
        outs.append(h @ delta.up_weight[:, k * b:(k + 1) * b].T + delta.up_bias[k])
    return outs


def test_knowledge_stage_routes_rows_to_their_domain_adapter():
    delta = randomised(MixdaAdapter(INFO, MixdaConfig(n_domains=3, reduction=4))).eval()
    x = torch.randn(4, 5, 16)
    with lk.routing(keys=torch.tensor([2, 0, -1, 1])):
        got = delta(x, torch.zeros(4, 5, 6), None)
    outs = adapter_outputs(delta, x)
    for row, k in enumerate([2, 0, None, 1]):
        expected = torch.zeros(5, 6) if k is None else outs[k][row]
        torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=0)


def test_task_stage_gate_sums_to_one_with_the_ffn_share_and_mixes_adapters():
    delta = randomised(MixdaAdapter(INFO, MixdaConfig(n_domains=3, reduction=4, stage="task", gate_hidden=8))).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with lk.routing(token_mask=mask):
        g = delta.gate_weights(x)
        got = delta(x, torch.zeros(2, 5, 6), None)
    assert g.shape == (2, 4)  # K domain adapters + the FFN
    torch.testing.assert_close(g.sum(-1), torch.ones(2), atol=1e-6, rtol=0)
    assert (g > 0).all() and (g[:, -1] < 1).all()
    outs = adapter_outputs(delta, x)
    expected = sum(g[:, k, None, None] * outs[k] for k in range(3))  # Σ_k g_k (Wx + a_k) + g_FFN Wx − Wx
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_gate_reads_the_last_real_token():
    delta = randomised(MixdaAdapter(INFO, MixdaConfig(n_domains=2, stage="task"))).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])  # right- and left-padded rows
    noisy = x.clone()
    noisy[0, 4:] = torch.randn(2, 16)
    noisy[1, :2] = torch.randn(2, 16)
    with lk.routing(token_mask=mask):
        torch.testing.assert_close(delta.gate_weights(noisy), delta.gate_weights(x), atol=0, rtol=0)
    expected = torch.softmax(delta.gate(torch.stack([x[0, 3], x[1, 5]])), dim=-1)
    with lk.routing(token_mask=mask):
        torch.testing.assert_close(delta.gate_weights(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(delta.gate_weights(x), torch.softmax(delta.gate(x[:, -1]), -1), atol=1e-6, rtol=0)


def test_gate_layout_follows_moe_gating():
    delta = MixdaAdapter(LayerInfo("linear", 4096, 1024, False), MixdaConfig(n_domains=2))
    kinds = [type(m).__name__ for m in delta.gate]
    assert kinds == ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU",
                     "Dropout", "Linear"]
    assert delta.gate[1].out_features == 768 and delta.gate[-1].out_features == 3  # K + 1
    assert delta.bottleneck == 256  # intermediate / 16
    small = MixdaAdapter(INFO, MixdaConfig(n_domains=2))
    assert small.gate[1].out_features == 4  # min(768, in / 4)


def test_stages_decide_what_trains(ids):
    model = tiny_llama()
    lk.add_adapter(model, MixdaConfig(n_domains=2, task_adapter=True))
    trainable = {n.split(".adapters.default.")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"down_weight", "down_bias", "up_weight", "up_bias"}
    keys_before = set(lk.adapter_state_dict(model))
    set_mixda_stage(model, "default", "task")
    trainable = {n.split(".adapters.default.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"gate", "task_down", "task_up"}
    assert set(lk.adapter_state_dict(model)) == keys_before  # same file layout in both stages
    assert adapter_state(model).configs["default"].stage == "task"
    model.train()
    with lk.routing(keys=torch.tensor([0, 1, 0])):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".gate." in n or ".task_" in n for n in grads)


def test_fresh_adapters_equal_the_base_in_both_stages(ids):
    base = tiny_llama()(input_ids=ids).logits
    for stage in ("knowledge", "task"):
        model = tiny_llama()
        lk.add_adapter(model, MixdaConfig(n_domains=2, stage=stage, task_adapter=True))
        with torch.no_grad(), lk.routing(keys=torch.tensor([0, 1, -1])):
            torch.testing.assert_close(model(input_ids=ids).logits, base, atol=1e-6, rtol=0)


def test_general_data_mse_regulariser(ids):
    model = tiny_llama()
    lk.add_adapter(model, MixdaConfig(n_domains=2, general_mse_coef=3.0))
    deltas = [layer.adapters["default"] for _, layer in adapter_layers(model)]
    for i, d in enumerate(deltas):
        randomised(d, seed=i)
    model.train()
    captured = {}

    def keep_input(module, args):
        captured.setdefault(module, []).append(args[0])

    hooks = [layer.base_layer.register_forward_pre_hook(keep_input) for _, layer in adapter_layers(model)]
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    with lk.routing(keys=torch.tensor([0, 1, -1]), token_mask=mask):  # row 2 is general data
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    loss = mixda_extra_loss(model, "default")
    per_layer = []
    for (_, layer), d in zip(adapter_layers(model), deltas):
        x = captured[layer.base_layer][0][2, :6]  # the general row's real tokens
        outs = torch.stack(adapter_outputs(d, x))  # (K, tokens, out)
        per_layer.append(outs.pow(2).mean())
    torch.testing.assert_close(loss, 3.0 * torch.stack(per_layer).mean(), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(d.up_weight.grad is not None and d.up_weight.grad.abs().max() > 0 for d in deltas)
    assert mixda_extra_loss(model, "default") == 0  # records are consumed
    with lk.routing(keys=torch.tensor([0, 1, 0])):  # no general rows: nothing to regularise
        model(input_ids=ids)
    assert mixda_extra_loss(model, "default") == 0


def test_knowledge_then_task_through_save_and_load(ids, tmp_path):
    model = tiny_llama()
    lk.add_adapter(model, MixdaConfig(n_domains=2, domains=["bio", "law"]))
    for i, (_, layer) in enumerate(adapter_layers(model)):
        randomised(layer.adapters["default"], seed=i)
    with torch.no_grad(), lk.routing(keys=["law", "bio", None]):  # string keys: the domain names
        knowledge = model(input_ids=ids).logits
    lk.save_adapter(model, tmp_path / "k")
    fresh = tiny_llama()
    lk.load_adapter(fresh, tmp_path / "k", is_trainable=True)
    with torch.no_grad(), lk.routing(keys=torch.tensor([1, 0, -1])):
        torch.testing.assert_close(fresh(input_ids=ids).logits, knowledge, atol=1e-6, rtol=0)
    set_mixda_stage(fresh, "default", "task")
    with torch.no_grad(), record_routing(fresh) as traces:
        out = fresh(input_ids=ids).logits
    weights = next(iter(traces.values()))[0]["weights"]  # (batch, seq, K + 1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 9), atol=1e-6, rtol=0)
    assert (out - tiny_llama()(input_ids=ids).logits).abs().max() > 1e-3  # the gate mixes the trained adapters


def test_config_validation():
    with pytest.raises(lk.ConfigError, match="n_domains"):
        MixdaConfig()
    with pytest.raises(lk.ConfigError, match="key_to_domain"):
        MixdaConfig(n_domains=2, key_to_domain={"a": 2})
    with pytest.raises(lk.ConfigError):
        MixdaConfig(n_domains=2, stage="finetune")
    with pytest.raises(lk.AdapterError, match="not a MixDA"):
        set_mixda_stage(lk.add_adapter(tiny_llama(), lk.LoraConfig()), "default", "task")


def test_two_stages_in_the_training_loop():
    from lorakit.data import load_examples
    from lorakit.training import TrainConfig, train

    examples = load_examples("reverse,rotate,sort", "train", n=6)
    tokenizer = word_level_tokenizer(examples)
    model = tiny_llama_for(tokenizer)
    lk.add_adapter(model, MixdaConfig(n_domains=2, key_to_domain={"reverse": 0, "rotate": 1, "sort": -1},
                                      task_adapter=True))
    config = TrainConfig(steps=3, batch_size=6, lr=0.01, max_length=64, log_every=100, device="cpu")

    def snapshot():
        return {k: v.clone() for k, v in lk.adapter_state_dict(model).items()}

    start = snapshot()
    train(model, tokenizer, examples, config, progress=False)  # knowledge stage: sort rows are general data
    names = {k.split(".down_proj.")[-1].split(".")[0] for k, v in lk.adapter_state_dict(model).items()
             if not torch.equal(v, start[k])}
    assert names == {"down_weight", "down_bias", "up_weight", "up_bias"}
    set_mixda_stage(model, "default", "task")
    middle = snapshot()
    train(model, tokenizer, examples, config, progress=False)
    names = {k.split(".down_proj.")[-1].split(".")[0] for k, v in lk.adapter_state_dict(model).items()
             if not torch.equal(v, middle[k])}
    assert names and names <= {"gate", "task_down", "task_up"}
