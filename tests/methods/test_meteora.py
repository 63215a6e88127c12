"""MeteoRA: a gate over existing LoRA adapters (lorakit and peft files, different ranks), supervised gate loss,
gate-only training, save/load without the source adapters, fast vs reference gate paths; the forward and the
gate loss against the official code (NJUDeepEngine/meteora @ 2d192ad, written out at the end of this file)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import LlamaForCausalLM

import lorakit as lk
from lorakit.core.delta import LayerInfo
from lorakit.core.model import adapter_layers
from lorakit.data import CausalLMCollator, TokenizedDataset, build_task_index, load_examples
from lorakit.methods.meteora import MeteoraConfig, MeteoraLinear, gate_labels, gate_loss, meteora_extra_loss
from lorakit.mixtures import record_routing
from lorakit.mixtures.base import pop_aux_records
from lorakit.training import TrainConfig, train

from lk_models import tiny_llama, tiny_llama_for, word_level_tokenizer

TASKS = ["reverse", "rotate", "sort"]


def constant_feature_llama() -> LlamaForCausalLM:
    """tiny_llama whose residual stream keeps feature 0 at 5 (embeddings set it, no block writes it), so the
    inputs of q/k/v/gate/up projections have a positive feature 0 for every token: a gate row on it wins always."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 5.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
    return model


def _randomise(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and (name is None or f".{name}." in n):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def make_sources(tmp_path, factory) -> list[str]:
    """Three LoRA adapters named after tasks: lorakit r=4; lorakit rsLoRA r=2 (no up_proj); peft r=4 (no v_proj)."""
    paths = [str(tmp_path / t) for t in TASKS]
    for i, cfg in enumerate([lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
                             lk.LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj"])]):
        model = lk.add_adapter(factory(), cfg)
        _randomise(model, "default", i)
        lk.save_adapter(model, paths[i])
    peft_model = get_peft_model(factory(), PeftLoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"],
                                                          init_lora_weights=False))
    _randomise(peft_model, None, 2)
    peft_model.save_pretrained(paths[2])
    return paths


def meteora_deltas(model, name="default") -> list[MeteoraLinear]:
    return [layer.adapters[name] for _, layer in adapter_layers(model) if name in layer.adapters]


def force_gate(model, index: int) -> None:
    with torch.no_grad():
        for d in meteora_deltas(model):
            d.router.gate.weight.zero_()
            d.router.gate.weight[index, 0] = 1000.0  # logit 1000·x₀ ≫ 0: weight exactly 1 after softmax


def test_one_hot_gate_equals_that_adapter_alone(tmp_path, ids):
    paths = make_sources(tmp_path, constant_feature_llama)
    model = lk.add_adapter(constant_feature_llama(), MeteoraConfig(adapter_paths=paths, lora_dropout=0.0))
    stored = model.lorakit.configs["default"]
    assert stored.expert_r == [4, 2, 4] and stored.expert_alpha == [8, 6, 16]
    assert stored.expert_use_rslora == [False, True, False] and stored.adapter_names == TASKS
    adapted = sorted(p for p, _ in adapter_layers(model))
    assert adapted == sorted(stored.target_modules) and len(adapted) == 6  # union: q, v, up × 2 layers
    for i, path in enumerate(paths):
        force_gate(model, i)
        with record_routing(model) as traces:
            got = model(input_ids=ids).logits
        chosen = {int(c) for entries in traces.values() for e in entries for c in e["weights"].argmax(-1).flatten()}
        assert chosen == {i}
        alone = lk.load_adapter(constant_feature_llama(), path)
        torch.testing.assert_close(got, alone(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_gate_only_trains_only_the_gate_and_banks_are_frozen(tmp_path):
    paths = make_sources(tmp_path, tiny_llama)
    model = lk.add_adapter(tiny_llama(), MeteoraConfig(adapter_paths=paths))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("router.gate.weight") for n in trainable)
    sd = lk.adapter_state_dict(model)
    assert any(k.endswith(".lora_A") for k in sd) and any(k.endswith(".lora_B") for k in sd)
    lk.set_adapter(model, "default")  # re-activating must not make the banks trainable
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable

    both = lk.add_adapter(tiny_llama(), MeteoraConfig(adapter_paths=paths, train_adapters=True))
    names = {n.rsplit(".", 1)[-1] for n, p in both.named_parameters() if p.requires_grad}
    assert names == {"weight", "lora_A", "lora_B"}


def test_save_load_round_trip_without_the_source_adapters(tmp_path, ids):
    paths = make_sources(tmp_path / "src", tiny_llama)
    model = lk.add_adapter(tiny_llama(), MeteoraConfig(adapter_paths=paths, top_k=2, temperature=3.0))
    want = model(input_ids=ids).logits
    lk.save_adapter(model, tmp_path / "meteora")
    shutil.rmtree(tmp_path / "src")
    saved = json.loads((tmp_path / "meteora" / "adapter_config.json").read_text())
    assert saved["adapter_paths"] is None and saved["num_experts"] == 3 and saved["expert_r"] == [4, 2, 4]
    fresh = lk.load_adapter(tiny_llama(), tmp_path / "meteora", is_trainable=True)
    torch.testing.assert_close(fresh(input_ids=ids).logits, want, atol=1e-6, rtol=0)
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("router.gate.weight") for n in trainable)


def test_task_ids_map_through_sorted_task_names():
    examples = load_examples(",".join(TASKS), "train", n=2)
    config = MeteoraConfig(num_experts=3, task_to_adapter={"sort": 0, "reverse": 2, "rotate": 1})
    index = build_task_index(examples)  # what the training loop uses: sorted task names
    ids = torch.tensor([index[ex.task] for ex in examples])
    want = torch.tensor([config.task_to_adapter[ex.task] for ex in examples])
    assert torch.equal(gate_labels(config, ids), want)
    by_order = MeteoraConfig(num_experts=3)
    assert torch.equal(gate_labels(by_order, ids), ids)
    without = MeteoraConfig(num_experts=2, top_k=1, task_to_adapter={"a": 1, "b": -1})
    assert gate_labels(without, torch.tensor([0, 1])).tolist() == [1, -100]
    # With the ids named (the training loop passes the data's task names), a subset of tasks maps by name.
    assert gate_labels(config, torch.tensor([0, 1]), key_names=["rotate", "sort"]).tolist() == [1, 0]
    with pytest.raises(lk.ConfigError, match="task_to_adapter"):
        gate_labels(without, torch.tensor([2]))


def test_check_examples_refuses_tasks_without_an_adapter_before_training():
    # a task id past the adapters (or a task task_to_adapter lacks) stopped the run at its first batch
    examples = load_examples(",".join(TASKS), "train", n=2)
    MeteoraConfig(num_experts=3).check_examples(examples)
    MeteoraConfig(num_experts=2, task_to_adapter={"reverse": 0, "rotate": 1, "sort": -1}).check_examples(examples)
    with pytest.raises(lk.ConfigError, match=r"task_to_adapter is unset and the training data has 3 tasks"):
        MeteoraConfig(num_experts=2).check_examples(examples)
    with pytest.raises(lk.ConfigError, match=r"task_to_adapter has no entry for task\(s\) \['sort'\]"):
        MeteoraConfig(num_experts=2, task_to_adapter={"reverse": 0, "rotate": 1}).check_examples(examples)
    model = tiny_llama()
    lk.add_adapter(model, MeteoraConfig(num_experts=2, expert_r=[2, 2], target_modules=["q_proj"]))
    with pytest.raises(lk.ConfigError, match="3 tasks"):  # the training loop checks too, before step 0
        train(model, word_level_tokenizer(examples), examples, TrainConfig(steps=1, batch_size=2, device="cpu"),
              progress=False)


def test_supervised_gate_loss_decreases_training_gate_only(tmp_path):
    examples = load_examples(",".join(TASKS), "train", n=16)
    tokenizer = word_level_tokenizer(examples)

    def factory():
        return tiny_llama_for(tokenizer, bos_token_id=1, eos_token_id=2)

    paths = make_sources(tmp_path, factory)
    config = MeteoraConfig(adapter_paths=paths, lora_dropout=0.0, task_to_adapter=dict(zip(TASKS, range(3))))
    model = lk.add_adapter(factory(), config)
    batch = CausalLMCollator.from_tokenizer(tokenizer)(list(TokenizedDataset(examples[:12], tokenizer)))
    banks = {k: v.clone() for k, v in lk.adapter_state_dict(model).items() if "lora_" in k}

    def measured() -> float:
        model.train()
        with lk.routing(keys=batch["task_ids"], token_mask=batch["attention_mask"]):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return float(gate_loss(model, "default").detach())

    before = measured()
    result = train(model, tokenizer, examples, TrainConfig(steps=25, batch_size=8, lr=0.05, max_length=64,
                                                           log_every=100, device="cpu"), progress=False)
    after = measured()
    assert len(result.losses) == 25
    print(f"gate loss before {before:.3f}, after {after:.3f}")
    assert after < 0.5 * before, (before, after)
    for k, v in lk.adapter_state_dict(model).items():
        if k in banks:
            assert torch.equal(v, banks[k]), k


def _pair(**kwargs) -> tuple[MeteoraLinear, MeteoraLinear]:
    torch.manual_seed(0)
    info = LayerInfo("linear", 8, 6, False)
    common = dict(num_experts=4, expert_r=[2, 3, 2, 1], lora_dropout=0.0, train_adapters=True, **kwargs)
    fast = MeteoraLinear(info, MeteoraConfig(gate_path="fast", **common)).eval()
    ref = MeteoraLinear(info, MeteoraConfig(gate_path="reference", **common)).eval()
    with torch.no_grad():
        fast.lora_B.normal_()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("temperature", [1.0, 10.0])
@torch.no_grad()
def test_fast_and_reference_paths_agree_on_ordinary_logits(temperature):
    fast, ref = _pair(temperature=temperature)
    x = torch.randn(3, 5, 8) * 0.3
    a, b = fast.router(x), ref.router(x)
    assert torch.equal(a.selected, b.selected) and (a.selected.sum(-1) == 2).all()
    torch.testing.assert_close(a.weights, b.weights)
    torch.testing.assert_close(fast(x, torch.zeros(3, 5, 6), None), ref(x, torch.zeros(3, 5, 6), None))


@torch.no_grad()
def test_temperature_flattens_the_weights_of_the_chosen_adapters():
    x = torch.randn(20, 8)
    sharp, _ = _pair(temperature=1.0)
    flat, _ = _pair(temperature=20.0)
    assert flat.router(x).weights.max(-1).values.mean() < sharp.router(x).weights.max(-1).values.mean()


@torch.no_grad()
def test_fast_path_keeps_the_true_runner_up_when_softmax_underflows():
    fast, ref = _pair()
    with torch.no_grad():
        for d in (fast, ref):
            d.router.gate.weight.zero_()
            d.router.gate.weight[:, 0] = torch.tensor([0.0, -400.0, -300.0, -200.0])
    x = torch.zeros(1, 8)
    x[0, 0] = 1.0  # logits = (0, -400, -300, -200)
    a, b = fast.router(x), ref.router(x)
    assert a.selected[0].nonzero().flatten().tolist() == [0, 3]  # the true top-2
    assert b.selected[0, 0] and b.selected[0].sum() == 2  # probabilities (1, 0, 0, 0): any runner-up ties
    assert float(b.weights[0, 0]) == 1.0 and float(a.weights[0, 0]) == 1.0
    torch.testing.assert_close(fast(x, torch.zeros(1, 6), None), ref(x, torch.zeros(1, 6), None))


@torch.no_grad()
def test_top1_gives_weight_one():
    fast, ref = _pair(top_k=1)
    x = torch.randn(10, 8)
    for d in (fast, ref):
        w = d.router(x).weights
        assert ((w == 1.0).sum(-1) == 1).all() and ((w == 0).sum(-1) == 3).all()


@pytest.mark.parametrize("bad", [{"use_dora": True}, {"rank_pattern": {"v_proj": 2}}])
def test_unsupported_source_adapters_are_refused(tmp_path, bad):
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **bad))
    lk.save_adapter(model, tmp_path / "src")
    with pytest.raises(lk.ConfigError, match=next(iter(bad))):
        lk.add_adapter(tiny_llama(), MeteoraConfig(adapter_paths=[str(tmp_path / "src")], top_k=1))


def test_config_needs_adapters_or_a_count():
    with pytest.raises(lk.ConfigError, match="adapter_paths"):
        MeteoraConfig()
    with pytest.raises(lk.ConfigError, match="top_k"):
        MeteoraConfig(num_experts=2, top_k=3)


# -- the official code (NJUDeepEngine/meteora @ 2d192ad), written out from its equations -------------------------
def official_moe_linear_delta(x, gate_w, A, B, scalings, r, top_k, T, accelerated):
    """``MoELinear.forward`` (MoELoRA/layer.py) minus the base output, dropout off. Accelerated path (lines
    574-600, training inner loop ``_accelerated_forward_inner_loop`` 629-653): top-k on the gate logits, weight 1
    when k = 1, else softmax(top-k / T). Non-accelerated path (543-573 with ``_original_forward_inner_loop``
    658-707): softmax over all logits, top-k, renormalise; T is not used. Adapter i owns rows ``i·r:(i+1)·r`` of
    ``lora_A.weight`` and the same columns of ``lora_B.weight`` (lines 641-644: identical ranks)."""
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ gate_w.T  # moe_gate: Linear(in, n_loras, bias=False)
    if accelerated:
        weights, selected = torch.topk(logits, top_k, dim=-1)
        weights = torch.ones_like(weights) if top_k == 1 else torch.softmax(weights / T, dim=1)
    else:
        weights, selected = torch.topk(torch.softmax(logits, dim=1), top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    result = torch.zeros(flat.shape[0], B.shape[0])
    lora_mask = torch.nn.functional.one_hot(selected, num_classes=gate_w.shape[0])  # (N, k, n)
    for i in range(gate_w.shape[0]):
        token_idx, top_idx = torch.where(lora_mask[:, :, i])
        A_i, B_i = A[i * r:(i + 1) * r], B[:, i * r:(i + 1) * r]
        out = (flat[token_idx] @ A_i.T) @ B_i.T * scalings[i] * weights[token_idx, top_idx, None]
        result.index_add_(0, token_idx, out)
    return result.view(*x.shape[:-1], -1)


def official_gate_loss(module_logits, moe_label_rows):
    """``lora_gate_loss_func`` (base_model/llama/modeling_llama_meteor.py, lines 171-252): every module's logits
    (batch, seq, n) lose their last position, the labels (``labels[..., 1, 1:]``, line 1517) their first; one
    cross-entropy (ignore_index -100) over all modules concatenated."""
    logits = torch.cat([m[..., :-1, :].reshape(-1, m.shape[-1]).float() for m in module_logits])
    labels = torch.cat([moe_label_rows[:, 1:].reshape(-1) for _ in module_logits])
    return torch.nn.functional.cross_entropy(logits, labels)


@pytest.mark.parametrize("gate_path,top_k,temperature", [("fast", 2, 3.0), ("fast", 1, 1.0), ("reference", 2, 1.0)])
@torch.no_grad()
def test_forward_equals_the_official_moe_linear(gate_path, top_k, temperature):
    alphas = [4.0, 8.0, 2.0, 6.0]
    config = MeteoraConfig(num_experts=4, expert_r=[2] * 4, expert_alpha=alphas, top_k=top_k,
                           temperature=temperature, gate_path=gate_path, lora_dropout=0.0, train_adapters=True)
    torch.manual_seed(1)
    delta = MeteoraLinear(LayerInfo("linear", 8, 6, False), config).eval()
    delta.lora_B.normal_()
    x = torch.randn(3, 5, 8) * 0.5
    want = official_moe_linear_delta(x, delta.router.gate.weight, delta.lora_A, delta.lora_B, [a / 2 for a in alphas],
                                     2, top_k, temperature, accelerated=gate_path == "fast")
    torch.testing.assert_close(delta(x, torch.zeros(3, 5, 6), None), want, atol=1e-5, rtol=1e-5)


def test_gate_loss_equals_the_official_lora_gate_loss_func():
    """With one task per sequence, the official shift pairs position t's logits with position t+1's label, so it
    scores every real token but the last of each sequence: lorakit on that token mask gives the official value."""
    model = lk.add_adapter(tiny_llama(), MeteoraConfig(num_experts=3, expert_r=[2, 2, 2], lora_dropout=0.0))
    model.train()
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(4))
    attention = torch.ones_like(ids)
    attention[1, 5:] = 0
    attention[2, 3:] = 0
    tasks = torch.tensor([2, 0, 1])
    moe_labels = tasks[:, None].expand_as(ids).masked_fill(attention == 0, -100)  # padding is -100 (ignored)
    last_real = torch.nn.functional.one_hot(attention.sum(1) - 1, ids.shape[1]).bool()
    scored = attention.bool() & ~last_real

    def forward():
        with lk.routing(keys=tasks, token_mask=scored):
            model(input_ids=ids, attention_mask=attention)

    forward()
    module_logits = [r.out.logits.view(3, 7, 3) for _, r in pop_aux_records(model, "default")]
    assert len(module_logits) == 4  # q_proj and v_proj (the defaults) in two layers
    want = 50.0 * official_gate_loss(module_logits, moe_labels)  # moe_aux_loss_coef = 50. (line 1401)
    forward()
    torch.testing.assert_close(meteora_extra_loss(model, "default"), want)
