"""MixDA against the official code (tianyang-x/Mixture-of-Domain-Adapters): the output Σ_k g_k a_k(x) +
g_{K+1} FFN(x), the gate trained in both stages, the stage-1 MSE between the mixed layer output and the FFN
output on general data, stage switching, the two stages in the training loop."""

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


def official_adapters(delta: MixdaAdapter, x: torch.Tensor) -> list[torch.Tensor]:
    """``MixtureOfDomainAdapter.forward`` (src/models/mixda_adapter.py:38-42): adapter_up(GELU(adapter_down(x)))
    for each of the K adapters (their weights are the rank blocks of lorakit's stacked tensors)."""
    b = delta.bottleneck
    outs = []
    for k in range(delta.num_domain_adapters):
        down = F.gelu(x @ delta.down_weight[k * b:(k + 1) * b].T + delta.down_bias[k * b:(k + 1) * b])
        outs.append(down @ delta.up_weight[:, k * b:(k + 1) * b].T + delta.up_bias[k])
    return outs


def official_output(delta: MixdaAdapter, x: torch.Tensor, ffn: torch.Tensor, keep=None) -> torch.Tensor:
    """``RobertaOutput.forward`` (src/models/transformers/modeling_roberta.py:407-432): all_results = [ka(x)…],
    gating_weights = MoeGating(x) (:1733-1742: x[:, -1], the layer stack, softmax), then
    ``stack(all_results + [dense(x)], dim=3) @ gating_weights.unsqueeze(3)``. ``keep``: the gate entries a
    one-domain stage-1 run has (the official trains one domain adapter per run: entries [a_k, FFN])."""
    all_results = official_adapters(delta, x)
    logits = delta.gate(x[:, -1].unsqueeze(1))  # (batch, 1, K+1)
    if keep is not None:
        logits = logits.masked_fill(~keep[:, None, :], float("-inf"))
    gating_weights = torch.softmax(logits, dim=-1)
    all_results.append(ffn)
    return (torch.stack(all_results, dim=3) @ gating_weights.unsqueeze(3)).squeeze(-1)


def test_task_stage_output_equals_official():
    delta = randomised(MixdaAdapter(INFO, MixdaConfig(num_experts=3, reduction=4, stage="task", gate_hidden=8))).eval()
    x, ffn = torch.randn(2, 5, 16), torch.randn(2, 5, 6)
    got = ffn + delta(x, ffn, None)
    torch.testing.assert_close(got, official_output(delta, x, ffn), atol=1e-5, rtol=1e-5)
    g = delta.gate_weights(x)
    assert g.shape == (2, 4) and (g[:, -1] < 0.99).all()  # the gate down-weights the FFN


def test_one_domain_knowledge_stage_equals_official_stage_one():
    """Stage 1 (mixda_stage_one.py: num_of_kas=1, gating on unless --disable_moe): every row, whatever its key."""
    delta = randomised(MixdaAdapter(INFO, MixdaConfig(num_experts=1, reduction=4, gate_hidden=8))).eval()
    x, ffn = torch.randn(3, 5, 16), torch.randn(3, 5, 6)
    for keys in (torch.tensor([0, -1, 0]), None):
        with lk.routing(keys=keys):
            got = ffn + delta(x, ffn, None)
        torch.testing.assert_close(got, official_output(delta, x, ffn), atol=1e-5, rtol=1e-5)


def test_knowledge_stage_gates_each_domain_row_over_its_adapter_and_the_ffn():
    delta = randomised(MixdaAdapter(INFO, MixdaConfig(num_experts=3, reduction=4, gate_hidden=8))).eval()
    x, ffn = torch.randn(4, 5, 16), torch.randn(4, 5, 6)
    with lk.routing(keys=torch.tensor([2, 0, -1, 1])):
        got = ffn + delta(x, ffn, None)
    keep = torch.tensor([[0, 0, 1, 1], [1, 0, 0, 1], [1, 1, 1, 1], [0, 1, 0, 1]], dtype=torch.bool)
    torch.testing.assert_close(got, official_output(delta, x, ffn, keep), atol=1e-5, rtol=1e-5)


def test_gate_reads_the_last_real_token():
    delta = randomised(MixdaAdapter(INFO, MixdaConfig(num_experts=2, stage="task"))).eval()
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
    delta = MixdaAdapter(LayerInfo("linear", 4096, 1024, False), MixdaConfig(num_experts=2))
    kinds = [type(m).__name__ for m in delta.gate]
    assert kinds == ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU",
                     "Dropout", "Linear"]  # modeling_roberta.py:1717-1731, MoeGating(interm, 768, K+1, 3, 0.2)
    assert delta.gate[1].out_features == 768 and delta.gate[-1].out_features == 3  # K + 1
    assert delta.gate[0].p == 0.2 and delta.bottleneck == 256  # intermediate / 16
    small = MixdaAdapter(INFO, MixdaConfig(num_experts=2))
    assert small.gate[1].out_features == 4  # min(768, in / 4)


def _trainable(model):
    return {n.split(".adapters.default.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


def test_stages_decide_what_trains(ids):
    """Stage 1 enables grad on the adapters and the gating (mixda_stage_one.py:107-114); stage 2 on the gate and
    the task adapter, the domain adapters frozen."""
    model = tiny_llama()
    lk.add_adapter(model, MixdaConfig(num_experts=2, task_adapter=True))
    assert _trainable(model) == {"down_weight", "down_bias", "up_weight", "up_bias", "gate"}
    keys_before = set(lk.adapter_state_dict(model))
    set_mixda_stage(model, "default", "task")
    assert _trainable(model) == {"gate", "task_down", "task_up"}
    assert set(lk.adapter_state_dict(model)) == keys_before  # same file layout in both stages
    assert adapter_state(model).configs["default"].stage == "task"
    model.train()
    with lk.routing(keys=torch.tensor([0, 1, 0])):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".gate." in n or ".task_" in n for n in grads)


def test_fresh_adapter_scales_the_ffn_by_its_gate_share(ids):
    """a_k = 0 at init, so the layer outputs g_{K+1} · FFN(x): not the base model (as in the official code)."""
    assert not lk.get_method("mixda").zero_init
    model = tiny_llama()
    lk.add_adapter(model, MixdaConfig(num_experts=2, stage="task"))
    (_, layer), *_ = adapter_layers(model)
    x = torch.randn(3, 9, layer.base_layer.in_features)
    with torch.no_grad():
        g = layer.adapters["default"].gate_weights(x)
        torch.testing.assert_close(layer(x), g[:, -1, None, None] * layer.base_layer(x), atol=1e-6, rtol=1e-6)
    assert (g[:, -1] < 0.9).all()


def test_general_data_mse_equals_official_sample_loss(ids):
    """mixda_stage_one.py:218-237: MSE between the FFN output and the mixed layer output at every adapted layer,
    mean over features, tokens, layers (and rows), on general data only; × general_mse_coef."""
    model = tiny_llama()
    lk.add_adapter(model, MixdaConfig(num_experts=2, general_mse_coef=3.0))
    deltas = [layer.adapters["default"] for _, layer in adapter_layers(model)]
    for i, d in enumerate(deltas):
        randomised(d, seed=i)
    model.train()
    for d in deltas:
        d.gate.eval()  # no gate dropout: the outputs the hooks see are the ones the loss was taken on
    ffn_out, mixed_out = {}, {}
    hooks = [layer.base_layer.register_forward_hook(lambda m, a, o, p=path: ffn_out.__setitem__(p, o.detach()))
             for path, layer in adapter_layers(model)]
    hooks += [layer.register_forward_hook(lambda m, a, o, p=path: mixed_out.__setitem__(p, o.detach()))
              for path, layer in adapter_layers(model)]
    with lk.routing(keys=torch.tensor([-1, 1, -1])):  # rows 0 and 2 are general data
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    loss = mixda_extra_loss(model, "default")
    paths = [path for path, _ in adapter_layers(model)]
    mlp_logits = torch.stack([ffn_out[p][[0, 2]] for p in paths], dim=1)  # (rows, layers, seq, hidden)
    adapter_logits = torch.stack([mixed_out[p][[0, 2]] for p in paths], dim=1)
    want = F.mse_loss(mlp_logits, adapter_logits, reduction="none").mean(-1).mean(-1).mean(0).mean()
    torch.testing.assert_close(loss.detach(), 3.0 * want, atol=1e-6, rtol=1e-5)
    loss.backward()
    assert all(d.up_weight.grad is not None and d.up_weight.grad.abs().max() > 0 for d in deltas)
    assert all(d.gate[-1].weight.grad.abs().max() > 0 for d in deltas)  # the MSE trains the gate too
    assert mixda_extra_loss(model, "default") == 0  # records are consumed
    with lk.routing(keys=torch.tensor([0, 1, 0])):  # no general rows: nothing to regularise
        model(input_ids=ids)
    assert mixda_extra_loss(model, "default") == 0


def test_padding_is_left_out_of_the_mse(ids):
    model = tiny_llama()
    lk.add_adapter(model, MixdaConfig(num_experts=1))
    for i, (_, layer) in enumerate(adapter_layers(model)):
        randomised(layer.adapters["default"], seed=i)
    model.train()
    for _, layer in adapter_layers(model):
        layer.adapters["default"].gate.eval()
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    with lk.routing(keys=torch.tensor([-1, -1, -1]), token_mask=mask):
        model(input_ids=ids, attention_mask=mask)
    padded = mixda_extra_loss(model, "default")
    with lk.routing(keys=torch.tensor([-1, -1, -1])):
        model(input_ids=ids[:, :-3])
    torch.testing.assert_close(padded, mixda_extra_loss(model, "default"), atol=1e-6, rtol=1e-5)


def test_knowledge_then_task_through_save_and_load(ids, tmp_path):
    model = tiny_llama()
    lk.add_adapter(model, MixdaConfig(num_experts=2, domains=["bio", "law"]))
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
        fresh(input_ids=ids)
    weights = next(iter(traces.values()))[0]["weights"]  # (batch, seq, K + 1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 9), atol=1e-6, rtol=0)
    assert (weights > 0).all()  # the task stage gates every row over all adapters and the FFN


def test_config_validation():
    with pytest.raises(lk.ConfigError, match="num_experts"):
        MixdaConfig()
    with pytest.raises(lk.ConfigError, match="key_to_domain"):
        MixdaConfig(num_experts=2, key_to_domain={"a": 2})
    with pytest.raises(lk.ConfigError):
        MixdaConfig(num_experts=2, stage="finetune")
    with pytest.raises(lk.AdapterError, match="not a MixDA"):
        set_mixda_stage(lk.add_adapter(tiny_llama(), lk.LoraConfig()), "default", "task")


def test_two_stages_in_the_training_loop():
    from lorakit.data import load_examples
    from lorakit.training import TrainConfig, train

    examples = load_examples("reverse,rotate,sort", "train", n=6)
    tokenizer = word_level_tokenizer(examples)
    model = tiny_llama_for(tokenizer)
    lk.add_adapter(model, MixdaConfig(num_experts=2, key_to_domain={"reverse": 0, "rotate": 1, "sort": -1},
                                      task_adapter=True))
    config = TrainConfig(steps=3, batch_size=6, lr=0.01, max_length=64, log_every=100, device="cpu")

    def changed(before):
        return {k.split(".down_proj.")[-1].split(".")[0] for k, v in lk.adapter_state_dict(model).items()
                if not torch.equal(v, before[k])}

    start = {k: v.clone() for k, v in lk.adapter_state_dict(model).items()}
    train(model, tokenizer, examples, config, progress=False)  # knowledge stage: sort rows are general data
    assert changed(start) == {"down_weight", "down_bias", "up_weight", "up_bias", "gate"}
    set_mixda_stage(model, "default", "task")
    middle = {k: v.clone() for k, v in lk.adapter_state_dict(model).items()}
    train(model, tokenizer, examples, config, progress=False)
    assert changed(middle) and changed(middle) <= {"gate", "task_down", "task_up"}


def test_mixda_check_examples_names_tasks_the_mapping_lacks_or_domains_in_another_order():
    from lorakit.data import Example

    data = [Example("p", "c", task=t) for t in ("legal", "med", "web")]
    MixdaConfig(num_experts=2).check_examples(data)  # ids past the domains: general rows, by design
    MixdaConfig(num_experts=2, key_to_domain={"legal": 1, "med": 0, "web": -1}).check_examples(data)
    with pytest.raises(lk.ConfigError, match=r"key_to_domain has no entry for task\(s\) \['web'\]"):
        MixdaConfig(num_experts=2, key_to_domain={"legal": 1, "med": 0}).check_examples(data)
    # domains named in another order than the sorted tasks: task 'legal' (id 0) trained domain 'med''s adapter
    with pytest.raises(lk.ConfigError, match=r"task 'legal' \(id 0.*expert 0 \('med'\)"):
        MixdaConfig(domains=["med", "legal"]).check_examples(data[:2])
