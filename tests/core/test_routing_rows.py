"""Mixed batches (issue 10, faults 2, 7 and 8): unknown names fail before compute, generate's beams keep their
row's adapter, and modules_to_save follow each row. Right values: each adapter run alone on its own copy of the
model (the others deleted), and the base model."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit import serving
from lk_models import tiny_llama


def _model(**extra):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(target_modules="all-linear", r=4, init_lora_weights=False, **extra), "a")
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=16,
                                        init_lora_weights=False, **extra), "b")
    if extra.get("modules_to_save"):  # make each adapter's copy differ from the base and from each other
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith("copies"):
                    for i, copy_ in enumerate(module.values()):
                        for p in copy_.parameters():
                            p.add_(0.05 * (i + 1) * torch.randn_like(p))
    return model


def _alone(model, name):
    m = copy.deepcopy(model)
    for other in lk.adapter_names(m):
        if other != name:
            lk.delete_adapter(m, other)
    if name is None:
        lk.unload(m)
    else:
        lk.set_adapter(m, name)
    return m


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- fault 2: unknown names ----------------------------------------------------------------------------------
@pytest.mark.parametrize("routing_kw", [
    dict(adapter_names=["defualt", "default"]),
    dict(adapter_weights={"defualt": torch.ones(2)}),
    dict(adapter_names=["default", None], adapter_weights={"default": torch.ones(2), "dfault": torch.ones(2)}),
])
def test_unknown_routing_name_fails_before_any_compute(routing_kw, ids):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    with lk.routing(**routing_kw):
        with pytest.raises(lk.AdapterError, match=r"'(defualt|dfault)'.*Did you mean: default"):
            model(input_ids=ids[:2])
        with pytest.raises(lk.AdapterError, match="Did you mean: default"):
            model.generate(input_ids=ids[:2], max_new_tokens=2, do_sample=False)
        with pytest.raises(lk.AdapterError, match="Did you mean: default"):
            model.model(input_ids=ids[:2])  # a submodule called directly: the first adapted layer checks
    assert calls == [1]  # only the direct submodule call reached the embedding; the model's forwards did not


def test_none_and_base_rows_are_the_base(ids):
    model = _model()
    with lk.routing(adapter_names=[None, "__base__", "a"]):
        y = _logits(model, ids)
    base = _logits(_alone(model, None), ids)
    assert torch.allclose(y[:2], base[:2], atol=1e-5)
    assert torch.allclose(y[2:], _logits(_alone(model, "a"), ids[2:]), atol=1e-5)


def test_unknown_bank_names_fail_at_entry(ids):
    model = _model()
    serving.bank_adapters(model)
    with pytest.raises(lk.AdapterError, match="'aa'.*Did you mean: a"):
        with serving.bank_routing(model, ["aa", None]):
            pass
    with pytest.raises(lk.AdapterError, match="'bb'.*Did you mean: b"):
        with serving.bank_routing(model, [{"a": 0.5, "bb": 0.5}, None]):
            pass


# -- fault 7: beams and return sequences ---------------------------------------------------------------------
GEN = [dict(num_beams=3), dict(num_beams=3, num_return_sequences=2), dict(num_beams=2, num_return_sequences=2)]


@pytest.mark.parametrize("kw", GEN)
def test_generate_beams_keep_their_rows_adapter(kw, ids):
    model = _model()
    prompts, names = ids[:, :5], ["a", "b", None]
    kw = dict(kw, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with lk.routing(adapter_names=names):
        mixed = model.generate(input_ids=prompts, **kw)
    banked = copy.deepcopy(model)
    serving.bank_adapters(banked)
    served = serving.generate(banked, prompts, names, **kw)
    k = kw.get("num_return_sequences", 1)
    for i, n in enumerate(names):
        alone = _alone(model, n).generate(input_ids=prompts[i:i + 1], **kw)
        assert torch.equal(mixed[i * k:(i + 1) * k], alone), n
        assert torch.equal(served[i * k:(i + 1) * k], alone), n


def test_adapter_weights_follow_beams(ids):
    model = _model()
    w = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])}
    kw = dict(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    with lk.routing(adapter_weights=w):
        mixed = model.generate(input_ids=ids[:2, :5], **kw)
    for i, n in enumerate(["a", "b"]):
        assert torch.equal(mixed[i:i + 1], _alone(model, n).generate(input_ids=ids[i:i + 1, :5], **kw))


def test_rows_that_do_not_divide_the_batch_fail(ids):
    model = _model()
    with lk.routing(adapter_names=["a", "b"]), pytest.raises(lk.AdapterError, match="2 rows for a batch of 3"):
        model(input_ids=ids)


# -- fault 8: modules_to_save on every path ------------------------------------------------------------------
def test_modules_to_save_per_row(ids):
    model = _model(modules_to_save=["lm_head"])
    names = ["b", None, "a"]
    with lk.routing(adapter_names=names):
        y = _logits(model, ids)
    for i, n in enumerate(names):
        assert torch.allclose(y[i:i + 1], _logits(_alone(model, n), ids[i:i + 1]), atol=1e-5), n
    with lk.routing(adapter_names=["a"]):  # beams of one row
        y = model.generate(input_ids=ids[:1, :4], num_beams=2, max_new_tokens=3, do_sample=False, pad_token_id=0)
    ref = _alone(model, "a").generate(input_ids=ids[:1, :4], num_beams=2, max_new_tokens=3, do_sample=False,
                                      pad_token_id=0)
    assert torch.equal(y, ref)


def test_modules_to_save_refusals(ids):
    model = _model(modules_to_save=["lm_head"])
    with lk.routing(adapter_weights={"a": torch.ones(3)}), pytest.raises(lk.AdapterError, match="modules_to_save"):
        model(input_ids=ids)
    lk.set_adapter(model, ["a", "b"])
    with pytest.raises(lk.AdapterError, match="modules_to_save"):
        model(input_ids=ids)
    with pytest.raises(lk.AdapterError, match="modules_to_save"):
        lk.merge_and_unload(model)
    assert lk.adapter_names(model) == ["a", "b"] and not lk.core.model.merged_adapters(model)  # nothing changed


def test_merge_and_unload_keeps_the_copy_of_the_adapter_that_has_one(ids):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "plain")
    lk.add_adapter(model, lk.LoraConfig(target_modules=["v_proj"], init_lora_weights=False,
                                        modules_to_save=["lm_head"]), "head")
    with torch.no_grad():
        model.lm_head.copies["head"].weight.add_(0.1)
    lk.set_adapter(model, ["plain", "head"])
    y = _logits(model, ids)
    assert not torch.allclose(y, _logits(_alone(model, "plain"), ids), atol=1e-3)
    plain = lk.merge_and_unload(model)
    assert torch.allclose(_logits(plain, ids), y, atol=1e-5)


def test_bank_routing_ignores_attached_modules_to_save(ids, tmp_path):
    model = _model(modules_to_save=["lm_head"])
    ref = tiny_llama()
    lk.add_adapter(ref, lk.LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=16,
                                      init_lora_weights=False), "c")
    lk.save_adapter(ref, tmp_path / "c", "c")
    serving.load_adapters(model, {"c": tmp_path / "c"})  # "a" (with its lm_head copy) stays active
    with serving.bank_routing(model, ["c", None]):
        y = _logits(model, ids[:2])
    assert torch.allclose(y[:1], _logits(ref, ids[:1]), atol=1e-5)
    assert torch.allclose(y[1:], _logits(_alone(model, None), ids[1:2]), atol=1e-5)


def test_bank_only_layers_accept_attached_names(ids, tmp_path):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "a")
    other = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["k_proj"], init_lora_weights=False), "k")
    serving.load_adapters(model, {"k": lk.save_adapter(other, tmp_path / "k", "k")})  # k_proj: a bank-only layer
    with lk.routing(adapter_names=["a", None, "a"]):
        y = _logits(model, ids)
    assert torch.allclose(y, torch.cat([_logits(_alone(model, "a"), ids[:1]), _logits(tiny_llama(), ids[1:2]),
                                        _logits(_alone(model, "a"), ids[2:])]), atol=1e-5)


# -- per-row extras are declared, not guessed from a first dimension ------------------------------------------
def test_rows_routing_slices_only_declared_extras():
    """Rows 1 and 3 of a 4-row batch: a declared per-row vector and a declared per-token mask are sliced (the mask
    also cut to the rows' own length, 3); an undeclared (4, 2) table, whose first dimension happens to equal the row
    count, and a plain list pass unchanged, as does every extra when nothing is declared."""
    from lorakit.core.routing import ADAPTER_EXTRAS_KEY, rows_routing

    table, vector = torch.arange(8.0).reshape(4, 2), torch.arange(12.0).reshape(4, 3)
    mask = torch.arange(20).reshape(4, 5) % 2 == 0
    extras = {"table": table, "user": vector, "supervised_mask": mask, "names": ["a", "b", "c", "d"],
              ADAPTER_EXTRAS_KEY: {"b": {"task_names": ["x", "y"]}}}
    index = torch.tensor([1, 3])
    with lk.routing(adapter_names=["a", "b", "a", "b"], token_mask=torch.ones(4, 5, dtype=torch.long), extras=extras,
                    row_extras=("user",), token_extras=("supervised_mask",)) as ctx:
        got = rows_routing(ctx, index, 4, "b", length=3)
    assert got["extras"]["table"] is table and got["extras"]["names"] == ["a", "b", "c", "d"]
    assert torch.equal(got["extras"]["user"], vector[[1, 3]])
    assert torch.equal(got["extras"]["supervised_mask"], mask[[1, 3], :3])
    assert got["token_mask"].shape == (2, 3) and got["adapter_names"] == ["b", "b"]
    assert got["extras"]["task_names"] == ["x", "y"] and ADAPTER_EXTRAS_KEY not in got["extras"]
    with lk.routing(adapter_names=["a", "b", "a", "b"], extras={"table": table, "user": vector}) as ctx:
        got = rows_routing(ctx, index, 4, "b")
    assert got["extras"]["table"] is table and got["extras"]["user"] is vector  # nothing declared: nothing sliced
    with pytest.raises(TypeError, match=r"row_extras=\('user',\)"):
        with lk.routing(row_extras="user"):
            pass


def test_training_routing_declares_its_per_row_extras():
    """The loop's routing context declares the supervised mask per token and the examples' vectors per row."""
    from lorakit.core.routing import SUPERVISED_KEY, current_routing
    from lorakit.training.objectives import batch_routing

    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "labels": torch.tensor([[-100, 5, 6, -100]] * 2), "routing": {"user_state": torch.zeros(2, 3)}}
    with batch_routing(batch, extras={"task_names": ["t"]}):
        ctx = current_routing()
    assert tuple(ctx.row_extras) == ("user_state",) and tuple(ctx.token_extras) == (SUPERVISED_KEY,)
