"""Routed LoRAs without a learned router: routed_lora (per-row key), mm_lora (per-token modality), reclora (per-user
weight-space mixture). Exactness against loop references and against the individual adapters."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import lorakit as lk
from lorakit.core.delta import LayerInfo
from lorakit.core.model import adapter_layers
from lorakit.methods.routed import (MMLoraConfig, MMLoraLinear, RecLoraConfig, RecLoraLinear, RoutedLoraConfig,
                                    RoutedLoraLinear)
from lorakit.mixtures import record_routing

from lk_models import tiny_llama, tiny_llama_for, word_level_tokenizer

INFO = LayerInfo("linear", 12, 10, False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[str]:
    """lorakit LoRA r=4 (q, v), lorakit rsLoRA r=2 (q, o), PEFT LoRA r=4 (v, o); all non-zero."""
    root = tmp_path_factory.mktemp("routed_sources")
    paths = [str(root / n) for n in ("math", "code", "chat")]
    configs = [lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
               lk.LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "o_proj"],
                             init_lora_weights=False)]
    for i, cfg in enumerate(configs):
        torch.manual_seed(i)
        lk.save_adapter(lk.add_adapter(tiny_llama(), cfg), paths[i])
    torch.manual_seed(2)
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(r=4, lora_alpha=16, target_modules=["v_proj", "o_proj"],
                                                             init_lora_weights=False))
    peft_model.save_pretrained(paths[2])
    return paths


def _randomise(delta, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return delta


def blocks(delta):
    """Per expert (A (r, in), B (out, r), scaling) sliced out of a bank."""
    out, start = [], 0
    for e, r in enumerate(delta.ranks):
        out.append((delta.lora_A[start:start + r], delta.lora_B[:, start:start + r],
                    float(delta.rank_scaling[start])))
        start += r
    return out


def single_adapter_output(path, ids):
    model = tiny_llama()
    lk.load_adapter(model, path)
    return model(input_ids=ids).logits


# -- routed_lora ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mapping", [None, {"a": 2, "b": [0.2, 0.5, 0.3], "c": -1}])
def test_routed_lora_delta_matches_a_loop_reference(mapping):
    config = RoutedLoraConfig(expert_r=[3, 2, 4], expert_alpha=[6, 2, 8], expert_use_rslora=[False, True, False],
                              key_to_expert=mapping, default_expert=1)
    delta = _randomise(RoutedLoraLinear(INFO, config)).eval()
    x = torch.randn(4, 5, 12)
    keys = torch.tensor([0, 1, 2, -1])
    with lk.routing(keys=keys):
        got = delta(x, torch.zeros(4, 5, 10), None)
    table = [[0, 0, 1], [0.2, 0.5, 0.3], [0, 0, 0]] if mapping else [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    expected = torch.zeros(4, 5, 10)
    for row, key in enumerate(keys.tolist()):
        weights = table[key] if key >= 0 else [0, 1, 0]  # default_expert=1 for rows without a key
        for e, (A, B, s) in enumerate(blocks(delta)):
            expected[row] += weights[e] * s * (x[row] @ A.T @ B.T)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_routed_lora_rows_equal_their_single_adapter(sources, ids):
    model = tiny_llama()
    lk.add_adapter(model, RoutedLoraConfig(adapter_paths=sources))
    with torch.no_grad(), lk.routing(keys=["code", None, "chat"]):  # string keys = the source folders' names
        got = model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(got[0], single_adapter_output(sources[1], ids)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1], tiny_llama()(input_ids=ids).logits[1], atol=1e-6, rtol=0)
        torch.testing.assert_close(got[2], single_adapter_output(sources[2], ids)[2], atol=1e-5, rtol=0)
        with lk.routing(keys=torch.tensor([0, 0, 0])):  # integer keys: expert by index
            torch.testing.assert_close(model(input_ids=ids).logits, single_adapter_output(sources[0], ids),
                                       atol=1e-5, rtol=0)


def test_routed_lora_nested_record_routing_keeps_the_outer_trace(sources, ids):
    """Issue 10: leaving an inner record_routing block leaves the outer one recording."""
    model = tiny_llama()
    lk.add_adapter(model, RoutedLoraConfig(adapter_paths=sources))
    with torch.no_grad(), lk.routing(keys=["code", None, "chat"]), record_routing(model) as outer:
        with record_routing(model) as inner:
            model(input_ids=ids)
        model(input_ids=ids)
    assert all(len(v) == 1 for v in inner.values()) and all(len(v) == 2 for v in outer.values()) and outer


def test_routed_lora_keys_follow_generate_beams(sources, ids):
    """Issue 10: each beam / returned sequence keeps its prompt row's key (the rule serving banks use)."""
    model = tiny_llama()
    lk.add_adapter(model, RoutedLoraConfig(adapter_paths=sources))
    kw = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0)
    with torch.no_grad(), lk.routing(keys=["code", "chat"]):
        got = model.generate(input_ids=ids[:2, :5], **kw)
    for i, src in enumerate([sources[1], sources[2]]):
        alone = lk.load_adapter(tiny_llama(), src).generate(input_ids=ids[i:i + 1, :5], **kw)
        assert torch.equal(got[2 * i:2 * i + 2], alone)


def test_routed_lora_key_names_follow_sorted_task_ids():
    config = RoutedLoraConfig(num_experts=2, key_to_expert={"text": -1, "vision": 0, "speech": 1})
    delta = RoutedLoraLinear(INFO, config)
    assert delta.keys.names == ["speech", "text", "vision"]  # task id j = the j-th sorted name
    _randomise(delta)
    x = torch.randn(3, 2, 12)
    with lk.routing(keys=torch.tensor([0, 1, 2])):
        by_id = delta(x, torch.zeros(3, 2, 10), None)
    with lk.routing(keys=["speech", "text", "vision"]):
        by_name = delta(x, torch.zeros(3, 2, 10), None)
    torch.testing.assert_close(by_id, by_name, atol=0, rtol=0)
    assert torch.equal(by_id[1], torch.zeros(2, 10))  # "text" maps to no LoRA: Phi-4's text-only mode
    with pytest.raises(lk.AdapterError, match="names no expert"), lk.routing(keys=["audio", "text", "text"]):
        delta(x, torch.zeros(3, 2, 10), None)
    with pytest.raises(lk.AdapterError, match="out of range"), lk.routing(keys=torch.tensor([3, 0, 0])):
        delta(x, torch.zeros(3, 2, 10), None)
    with pytest.raises(lk.AdapterError, match="one key per row"), lk.routing(keys=torch.tensor([0, 1])):
        delta(x, torch.zeros(3, 2, 10), None)
    assert torch.equal(delta(x, torch.zeros(3, 2, 10), None), torch.zeros(3, 2, 10))  # no keys: base
    by_index = _randomise(RoutedLoraLinear(INFO, RoutedLoraConfig(num_experts=2)))
    with lk.routing(keys=torch.tensor([5, -1, 1])):  # without a mapping, ids past the experts have none
        out = by_index(x, torch.zeros(3, 2, 10), None)
    assert torch.equal(out[:2], torch.zeros(2, 2, 10)) and out[2].abs().max() > 0


def test_routed_lora_gradients_reach_only_the_rows_experts(ids):
    model = tiny_llama()
    lk.add_adapter(model, RoutedLoraConfig(target_modules=["q_proj"], expert_r=[2, 3, 2]))
    model.train()
    with lk.routing(keys=torch.tensor([1, 1, -1])):
        model(input_ids=ids, labels=ids).loss.backward()
    for _, layer in adapter_layers(model):
        delta = layer.adapters["default"]
        owner = delta.owner
        assert delta.lora_A.grad[owner != 1].abs().max() == 0 and delta.lora_B.grad[:, owner != 1].abs().max() == 0
        assert delta.lora_B.grad[:, owner == 1].abs().max() > 0  # B = 0 at init: only B gets a gradient


def test_routed_lora_save_load_and_frozen_bank(sources, ids, tmp_path):
    model = tiny_llama()
    lk.add_adapter(model, RoutedLoraConfig(adapter_paths=sources, train_adapters=False))
    assert not any(p.requires_grad for p in model.parameters())
    routing = {"keys": torch.tensor([2, 0, 1])}
    with torch.no_grad(), lk.routing(**routing):
        out = model(input_ids=ids).logits
        lk.save_adapter(model, tmp_path / "r")
        fresh = tiny_llama()
        lk.load_adapter(fresh, tmp_path / "r")
        torch.testing.assert_close(fresh(input_ids=ids).logits, out, atol=1e-6, rtol=0)
    assert lk.read_adapter_config(tmp_path / "r").adapter_names == ["math", "code", "chat"]


# -- mm_lora --------------------------------------------------------------------------------------------------
def test_mm_lora_delta_matches_a_per_token_loop():
    config = MMLoraConfig(expert_r=[2, 4, 3], expert_alpha=[4, 4, 9], modality_to_expert=[1, -1, 0, 2])
    delta = _randomise(MMLoraLinear(INFO, config))
    x = torch.randn(2, 6, 12)
    modality = torch.tensor([[0, 1, 2, 3, -1, 0], [3, 3, 2, 1, 0, -1]])
    with lk.routing(extras={"modality": modality}):
        got = delta(x, torch.zeros(2, 6, 10), None)
    expected = torch.zeros(2, 6, 10)
    experts = blocks(delta)
    for b in range(2):
        for t in range(6):
            m = int(modality[b, t])
            e = [1, -1, 0, 2][m] if m >= 0 else -1
            if e >= 0:
                A, B, s = experts[e]
                expected[b, t] = s * (B @ (A @ x[b, t]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mm_lora_tokens_equal_their_modality_adapter(sources, ids):
    model = tiny_llama()
    lk.add_adapter(model, MMLoraConfig(adapter_paths=sources[:2]))
    with torch.no_grad():
        with lk.routing(extras={"modality": torch.ones_like(ids)}):
            torch.testing.assert_close(model(input_ids=ids).logits, single_adapter_output(sources[1], ids),
                                       atol=1e-5, rtol=0)
        with lk.routing(extras={"modality": torch.full_like(ids, -1)}):
            torch.testing.assert_close(model(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits,
                                       atol=1e-6, rtol=0)
        # no map: every token has default_modality 0 (text-only data)
        torch.testing.assert_close(model(input_ids=ids).logits, single_adapter_output(sources[0], ids),
                                   atol=1e-5, rtol=0)
        with record_routing(model) as traces, lk.routing(extras={"modality": torch.arange(9).repeat(3, 1) % 2}):
            model(input_ids=ids)
    selected = next(iter(traces.values()))[0]["selected"]  # (batch, seq, experts)
    assert torch.equal(selected[..., 1], (torch.arange(9).repeat(3, 1) % 2).bool())


def test_mm_lora_modality_sources_and_errors(ids):
    model = tiny_llama()
    lk.add_adapter(model, MMLoraConfig(target_modules=["q_proj"], expert_r=[2, 2], default_modality=None))
    with pytest.raises(lk.AdapterError, match="modality map"):
        model(input_ids=ids)
    with pytest.raises(lk.AdapterError, match="does not match"), lk.routing(extras={"modality": ids[:, :4] % 2}):
        model(input_ids=ids)
    with pytest.raises(lk.AdapterError, match="has no entry"), lk.routing(extras={"modality": ids}):
        model(input_ids=ids)
    other = tiny_llama()
    lk.add_adapter(other, MMLoraConfig(target_modules=["q_proj"], expert_r=[2, 2], modality_source="token_mask"))
    with torch.no_grad(), lk.routing(token_mask=torch.zeros_like(ids)):
        other(input_ids=ids)


# -- reclora --------------------------------------------------------------------------------------------------
def reclora_delta(**kwargs) -> RecLoraLinear:
    config = RecLoraConfig(num_experts=3, r=2, lora_alpha=4, lora_dropout=0.0, user_dim=5, **kwargs)
    return _randomise(RecLoraLinear(INFO, config), seed=1).eval()


@pytest.mark.parametrize("sqrt", [False, True])
def test_reclora_matches_a_loop_reference(sqrt):
    delta = reclora_delta(sqrt_after_softmax=sqrt, temperature=1.5)
    x, u = torch.randn(3, 4, 12), torch.randn(3, 5)
    with lk.routing(extras={"user_state": u}):
        got = delta(x, torch.zeros(3, 4, 10), None)
    expected = torch.zeros(3, 4, 10)
    for b in range(3):
        logits = delta.gate[4](torch.relu(delta.gate[1](torch.nn.functional.layer_norm(
            u[b], (5,), delta.gate[0].weight, delta.gate[0].bias))))
        alpha = torch.softmax(logits / 1.5, dim=-1)
        alpha = alpha.sqrt() if sqrt else alpha
        A = sum(alpha[k] * delta.lora_A[k] for k in range(3))  # (r, in)
        B = sum(alpha[k] * delta.lora_B[k] for k in range(3))  # (out, r)
        expected[b] = (x[b] @ A.T @ B.T) * 2.0  # α / r = 4 / 2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def official_loreclayer(x, user_state, gate, lora_A_adapter, lora_B_adapter, r, scaling, temperature, sqrt):
    """Gebro13/RecLoRA @ 90f45f9, modeling_lorec_trash_v1.py ``Loreclayer.forward`` (lines 137-188) on the default
    gate (``which_in_gate`` unset; ``ctr_final_layer`` = LN → Linear → ReLU → Dropout → Linear, lines 95-101),
    ``enable_softmax`` with soft routing (as every run in multi_run.sh), dropout off. The bank is two bias-free
    Linears (lines 109-110): ``lora_A_adapter`` (in·r, N_m), ``lora_B_adapter`` (r·out, N_m)."""
    ctr_final_states = gate(user_state) / temperature
    ctr_final_states = torch.softmax(ctr_final_states, dim=-1)
    if sqrt:
        ctr_final_states = torch.sqrt(ctr_final_states)
    lora_A_weights = (ctr_final_states @ lora_A_adapter.T).reshape(-1, r, x.shape[-1]).permute(0, 2, 1)  # (b, in, r)
    lora_B_weights = (ctr_final_states @ lora_B_adapter.T).reshape(-1, r, lora_B_adapter.shape[0] // r)  # (b, r, out)
    return torch.bmm(torch.bmm(x, lora_A_weights), lora_B_weights) * scaling


@pytest.mark.parametrize("sqrt", [False, True])
@torch.no_grad()
def test_reclora_matches_the_official_loreclayer(sqrt):
    delta = reclora_delta(sqrt_after_softmax=sqrt, temperature=1.5)
    x, u = torch.randn(3, 4, 12), torch.randn(3, 5)
    # the official bank columns: meta-LoRA k's A (r, in) and Bᵀ (r, out), each flattened row-major
    bank_A = torch.stack([delta.lora_A[k].reshape(-1) for k in range(3)], dim=1)  # (in·r, N_m)
    bank_B = torch.stack([delta.lora_B[k].T.reshape(-1) for k in range(3)], dim=1)  # (r·out, N_m)
    norm, hidden, out = delta.gate[0], delta.gate[1], delta.gate[4]

    def ctr_final_layer(v):  # eval: Dropout(0.1) is the identity
        v = torch.nn.functional.layer_norm(v, (5,), norm.weight, norm.bias)
        return torch.relu(v @ hidden.weight.T + hidden.bias) @ out.weight.T + out.bias

    want = official_loreclayer(x, u, ctr_final_layer, bank_A, bank_B, 2, 4 / 2, 1.5, sqrt)  # scaling = alpha / r
    with lk.routing(extras={"user_state": u}):
        got = delta(x, torch.zeros(3, 4, 10), None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_reclora_one_hot_gate_is_one_meta_adapter_and_mixing_is_in_weight_space():
    delta = reclora_delta()
    x, u = torch.randn(2, 3, 12), torch.randn(2, 5)
    with torch.no_grad():
        delta.gate[4].weight.zero_()
        delta.gate[4].bias.copy_(torch.tensor([-1000.0, 1000.0, -1000.0]))
    with lk.routing(extras={"user_state": u}):
        got = delta(x, torch.zeros(2, 3, 10), None)
    torch.testing.assert_close(got, 2.0 * x @ delta.lora_A[1].T @ delta.lora_B[1].T, atol=1e-5, rtol=0)
    with torch.no_grad():
        delta.gate[4].bias.zero_()  # uniform gate: α = 1/3 each
    with lk.routing(extras={"user_state": u}):
        mixed = delta(x, torch.zeros(2, 3, 10), None)
    output_space = sum(2.0 / 3 * x @ delta.lora_A[k].T @ delta.lora_B[k].T for k in range(3))
    weight_space = 2.0 * x @ (delta.lora_A.mean(0).T) @ delta.lora_B.mean(0).T
    torch.testing.assert_close(mixed, weight_space, atol=1e-5, rtol=0)
    assert (mixed - output_space).abs().max() > 1e-3  # ΔW_u ≠ Σ α_k ΔW_k


def test_reclora_model_per_user_rows_and_errors(ids):
    model = tiny_llama()
    lk.add_adapter(model, RecLoraConfig(num_experts=4, r=2, user_dim=6, lora_dropout=0.0))
    kinds = [type(m).__name__ for m in next(layer for _, layer in adapter_layers(model)).adapters["default"].gate]
    assert kinds == ["LayerNorm", "Linear", "ReLU", "Dropout", "Linear"]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    users = torch.randn(3, 6)
    with torch.no_grad():
        with lk.routing(extras={"user_state": users}):
            batch = model(input_ids=ids).logits
        with lk.routing(extras={"user_state": users[1:2]}):
            alone = model(input_ids=ids[1:2]).logits
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)  # each row depends on its own user only
    with pytest.raises(lk.AdapterError, match="user vector"):
        model(input_ids=ids)
    with pytest.raises(lk.ConfigError, match="user_dim"):
        RecLoraConfig()


def test_reclora_user_vectors_of_another_width_are_an_adapter_error(ids):
    # user_dim=6 but 4-wide vectors: the gate's LayerNorm raised a bare RuntimeError (no field named)
    model = tiny_llama()
    lk.add_adapter(model, RecLoraConfig(num_experts=2, r=2, user_dim=6))
    with pytest.raises(lk.AdapterError, match=r"'user_state' user vectors of shape \(3, 4\).*\(3, 6\)"):
        with lk.routing(extras={"user_state": torch.randn(3, 4)}):
            model(input_ids=ids)


# -- the training loop routes each example to its task's expert ------------------------------------------------
def test_routed_lora_training_loop_trains_each_tasks_expert_only():
    from lorakit.data import load_examples
    from lorakit.training import TrainConfig, train

    examples = load_examples("reverse,rotate,sort", "train", n=8)
    tokenizer = word_level_tokenizer(examples)
    model = tiny_llama_for(tokenizer)
    lk.add_adapter(model, RoutedLoraConfig(target_modules=["q_proj", "v_proj"], expert_r=[2, 2, 2],
                                           key_to_expert={"reverse": 2, "rotate": 0, "sort": -1}))
    result = train(model, tokenizer, examples, TrainConfig(steps=6, batch_size=6, lr=0.01, max_length=64,
                                                           log_every=100, device="cpu"), progress=False)
    assert len(result.losses) == 6
    for _, layer in adapter_layers(model):
        delta = layer.adapters["default"]
        assert delta.lora_B[:, delta.owner == 1].abs().max() == 0  # no task maps to expert 1
        assert delta.lora_B[:, delta.owner == 0].abs().max() > 0 and delta.lora_B[:, delta.owner == 2].abs().max() > 0


def test_routed_lora_training_on_a_subset_of_the_mapped_tasks_trains_their_experts():
    # key_to_expert names reverse, rotate, sort; the data has rotate and sort only (task ids 0, 1). The ids were read
    # in the mapping's order, so rotate trained reverse's expert and sort trained rotate's, silently.
    from lorakit.data import load_examples
    from lorakit.training import TrainConfig, train

    tokenizer = word_level_tokenizer(load_examples("reverse,rotate,sort", "train", n=8))
    model = tiny_llama_for(tokenizer)
    lk.add_adapter(model, RoutedLoraConfig(target_modules=["q_proj"], expert_r=[2, 2, 2],
                                           key_to_expert={"reverse": 0, "rotate": 1, "sort": 2}))
    train(model, tokenizer, load_examples("rotate,sort", "train", n=8),
          TrainConfig(steps=2, batch_size=8, lr=0.01, max_length=64, log_every=100, device="cpu"), progress=False)
    for _, layer in adapter_layers(model):
        delta = layer.adapters["default"]
        assert delta.lora_B[:, delta.owner == 0].abs().max() == 0  # reverse: not in the data
        assert delta.lora_B[:, delta.owner == 1].abs().max() > 0 and delta.lora_B[:, delta.owner == 2].abs().max() > 0


def test_routed_lora_check_examples_refuses_data_that_reaches_no_expert_or_the_wrong_one():
    # each of these trained silently: rows without a key (default_expert=-1) or past the experts got the base,
    # and tasks named as the experts in another order trained each other's experts
    from lorakit.data import Example

    def data(*tasks):
        return [Example("p =>", " c", task=t) for t in tasks]

    config = RoutedLoraConfig(num_experts=2, expert_r=[2, 2])
    config.check_examples(data("a", "b"))
    with pytest.raises(lk.ConfigError, match="no training example has one: nothing would train"):
        config.check_examples(data(None, None))
    RoutedLoraConfig(num_experts=2, expert_r=[2, 2], default_expert=0).check_examples(data(None))
    with pytest.raises(lk.ConfigError, match=r"3 tasks \['a', 'b', 'c'\] for 2 experts.*\['c'\] would reach no expert"):
        config.check_examples(data("a", "b", "c"))
    mapped = RoutedLoraConfig(num_experts=2, expert_r=[2, 2], key_to_expert={"a": 1, "b": -1})
    mapped.check_examples(data("b"))
    with pytest.raises(lk.ConfigError, match=r"key_to_expert has no entry for task\(s\) \['c'\]"):
        mapped.check_examples(data("a", "c"))
    named = RoutedLoraConfig(num_experts=2, expert_r=[2, 2], adapter_names=["sql", "math"])
    with pytest.raises(lk.ConfigError, match=r"task 'math' \(id 0.*expert 0 \('sql'\).*\{'math': 1, 'sql': 0\}"):
        named.check_examples(data("math", "sql"))


def test_reclora_check_examples_needs_every_user_vector_at_user_dim():
    from lorakit.data import Example

    config = RecLoraConfig(num_experts=2, r=2, user_dim=3)
    config.check_examples([Example("p", "c", routing={"user_state": [1.0, 2.0, 3.0]})])
    with pytest.raises(lk.ConfigError, match="example 1 of the data has 2 numbers"):
        config.check_examples([Example("p", "c", routing={"user_state": [1.0, 2.0, 3.0]}),
                               Example("p", "c", routing={"user_state": [1.0, 2.0]})])
    with pytest.raises(lk.ConfigError, match="example 0 of the data has none"):
        config.check_examples([Example("p", "c", routing={"other": [1.0, 2.0, 3.0]})])
