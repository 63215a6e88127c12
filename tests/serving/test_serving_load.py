"""Loading many PEFT-format adapters into banks: speed-shaped behaviour (exact sizing, growth, reuse), PEFT
interop, and clear errors that leave the registry as it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lk_models import tiny_llama
from lorakit.serving import bank_adapters, bank_routing, load_adapters, registry_of


def _ids(batch, seq, seed=0):
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def many(tmp_path_factory, sh):
    root = tmp_path_factory.mktemp("many")
    return {f"m{i}": sh.make_adapter(root / f"m{i}", 100 + i, r=1 + i % 5, lora_alpha=2 + i % 3,
                                     target_modules=sh.ALL if i % 3 else ["q_proj", "v_proj", "down_proj"])
            for i in range(40)}


def test_many_adapters_exact_sizing_growth_and_reuse(many, sh):
    names = list(many)
    model = tiny_llama()
    reg = load_adapters(model, {n: many[n] for n in names[:30]})
    q = model.model.layers[0].self_attn.q_proj.bank
    k = model.model.layers[0].self_attn.k_proj.bank
    assert q.capacity == 31 and q.r_max == 5  # sized by what is loaded (+ the zero slot)
    assert k.n_adapters == 20  # adapters not targeting k_proj take no slot there
    load_adapters(model, {n: many[n] for n in names[30:]})  # grows
    assert q.capacity == 41 and len(reg) == 40
    reg.remove("m3")
    assert "m3" not in reg and q.n_adapters == 39
    load_adapters(model, {"again": many["m3"]})
    assert q.capacity == 41  # the freed slot is reused

    rows = ["m39", "again", None, "m0", "m17", "m17", "m5", "m12"]
    ref = sh.reference_model({n: many[n if n != "again" else "m3"] for n in rows if n})
    ids = _ids(len(rows), 6)
    with torch.no_grad():
        with bank_routing(model, rows):
            got = model(input_ids=ids).logits
        assert (got - sh.per_row(ref, ids, rows)).abs().max() <= 1e-5
    assert not any(".bank." in k for k in model.state_dict())  # banks are never saved with the model


def test_peft_saved_adapters_match_peft_mixed_batch(tmp_path):
    peft = pytest.importorskip("peft")
    dirs = {}
    for i, extra in enumerate([{}, {"use_rslora": True, "lora_alpha": 12}, {"target_modules": ["q_proj", "embed_tokens"]}]):
        cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                   init_lora_weights=False)
        cfg.update(extra)
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
        pm.save_pretrained(tmp_path / f"p{i}")
        dirs[f"p{i}"] = tmp_path / f"p{i}"
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(dirs["p0"]), adapter_name="p0")
    for n in ["p1", "p2"]:
        pm.load_adapter(str(dirs[n]), adapter_name=n)
    pm.eval()
    rows = ["p2", "p0", "__base__", "p1", "p0"]
    ids = _ids(len(rows), 5, 3)
    served = tiny_llama()
    load_adapters(served, dirs)
    with torch.no_grad():
        expected = pm(input_ids=ids, adapter_names=rows).logits
        with bank_routing(served, rows):
            got = served(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-5


def _load_fails(model, dirs, match):
    reg_before = getattr(model, "lorakit_bank", None)
    names_before = list(reg_before.names) if reg_before else []
    with pytest.raises(lk.LorakitError, match=match):
        load_adapters(model, dirs)
    reg = getattr(model, "lorakit_bank", None)
    assert (list(reg.names) if reg else []) == names_before  # all or nothing


def test_errors_name_the_problem(tmp_path, sh, many):
    model = tiny_llama()
    load_adapters(model, {"ok": many["m1"]})
    ids = _ids(2, 4)

    with pytest.raises(lk.AdapterError, match=r"unknown adapter 'ok2'.*Did you mean: ok"):
        with bank_routing(model, ["ok", "ok2"]):
            pass
    with pytest.raises(lk.AdapterError, match="already banked"):
        load_adapters(model, {"ok": many["m1"]})

    dora = sh.make_adapter(tmp_path / "dora", 1, r=2, lora_alpha=4, use_dora=True)
    _load_fails(model, {"fine": many["m2"], "dora": dora}, "DoRA")
    attached = tiny_llama()
    lk.load_adapter(attached, dora, "d")
    with pytest.raises(lk.LorakitError, match="DoRA"):
        bank_adapters(attached)

    # A tensor with the wrong shape: the message names the tensor and both shapes.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((many["m1"] / "adapter_config.json").read_text())
    tensors = load_file(many["m1"] / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    good = tensors[key]
    tensors[key] = torch.zeros(good.shape[0] + 1, good.shape[1])
    save_file(tensors, bad / "adapter_model.safetensors")
    _load_fails(model, {"fine": many["m2"], "bad": bad}, r"up_proj\.lora_A\.weight.*shape \(3, 32\).*expect \(2, 32\)")

    tensors[key] = good.clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    _load_fails(model, {"bad": bad}, "non-finite")

    tensors[key] = good
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, bad / "adapter_model.safetensors")
    _load_fails(model, {"bad": bad}, r"q_proj\.lora_B\.weight.*missing")

    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 2)
    tensors["base_model.model.model.layers.0.self_attn.nope.lora_A.weight"] = torch.zeros(2, 32)
    save_file(tensors, bad / "adapter_model.safetensors")
    _load_fails(model, {"bad": bad}, "match no module")

    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    _load_fails(model, {"bad": bad}, "not a valid safetensors file")

    cfg = json.loads((many["m1"] / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["norm"]  # whole Linear / Embedding copies bank exactly (issue 10); an RMSNorm cannot
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    _load_fails(model, {"bad": bad}, "modules_to_save module 'model.norm'")

    # Raw ids outside the registry, and ids that do not fit the batch.
    with torch.no_grad():
        with lk.routing(adapter_ids=torch.tensor([0, 7])), pytest.raises(lk.AdapterError, match="out of range"):
            model(input_ids=ids)
        with lk.routing(adapter_ids=torch.tensor([0, 0, 0])), pytest.raises(lk.AdapterError, match="3 rows"):
            model(input_ids=ids)
    with pytest.raises(lk.AdapterError, match="no banked adapters"):
        registry_of(tiny_llama())


def test_bank_dtype_and_device_follow_the_base(many):
    model = tiny_llama(dtype=torch.bfloat16)
    load_adapters(model, {"a": many["m4"], "b": many["m5"]})
    assert model.model.layers[0].self_attn.q_proj.bank.A.dtype == torch.bfloat16
    with torch.no_grad(), bank_routing(model, ["a", "b", None]):
        out = model(input_ids=_ids(3, 4)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_relative_to_a_changed_base_is_refused_not_served_wrong(init, tmp_path):
    """PEFT's PiSSA / OLoRA files (``init_lora_weights="pissa"``) hold A, B for the residual base W − s·B₀A₀ the
    init leaves; a bank adds s·BA to the shared, untouched base, so every row answered with the wrong weights
    (logits off by ~10 on the bundled model), and the store would have served it attached, re-running the init
    on the base every other row shares. Both refuse it and name the export that makes it bankable."""
    from lorakit.serving import AdapterStore

    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), init=init)
    lk.save_adapter(model, tmp_path / "a")
    with pytest.raises(lk.AdapterError, match=rf"init_lora_weights='{init}'.*lorakit export"):
        load_adapters(tiny_llama(), {"a": tmp_path / "a"})
    with pytest.raises(lk.AdapterError, match=rf"init_lora_weights='{init}'"):
        AdapterStore(tiny_llama(), [tmp_path]).register("a", tmp_path / "a")
    lk.save_adapter(model, tmp_path / "plain", original_base=True)  # what `lorakit export` writes: banks exactly
    reference = tiny_llama()
    lk.load_adapter(reference, tmp_path / "a")
    banked = tiny_llama()
    load_adapters(banked, {"p": tmp_path / "plain"})
    ids = _ids(2, 6)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        with bank_routing(banked, ["p", "p"]):
            torch.testing.assert_close(banked(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_a_huge_edited_rank_is_named_by_its_tensor_before_the_banks_grow(tmp_path, many):
    """Banks are sized by the config's r before the tensors are read: an adapter_config.json edited to r=10**12
    failed with torch's "can't allocate memory" (no tensor named; on a device, an out-of-memory in a running
    server). The file header's shapes are checked first."""
    model = tiny_llama()
    load_adapters(model, {"ok": many["m1"]})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((many["m1"] / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((many["m1"] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 10**12, "rank_pattern": {}}))
    _load_fails(model, {"bad": bad}, r"lora_A\.weight' has shape \(\d+, 32\) .* expect \(1000000000000, 32\): "
                                     r"adapter_config.json gives .* r=1000000000000")
