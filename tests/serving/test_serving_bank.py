"""Mixed-adapter batches through the banks equal each row run alone, and the reference per-row path."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lk_models import tiny_gpt2, tiny_llama
from lorakit.serving import bank_routing, load_adapters
from lorakit.serving.bank import make_plan

TOL = 1e-5


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, sh):
    """Five adapters: mixed ranks, alpha, rsLoRA, rank_pattern, different module subsets, embedding, bias."""
    root = tmp_path_factory.mktemp("mixed")
    specs = {
        "r2": dict(r=2, lora_alpha=4),
        "r8": dict(r=8, lora_alpha=3),
        "rs": dict(r=4, lora_alpha=16, use_rslora=True, rank_pattern={"v_proj": 6}, alpha_pattern={"q_proj": 5}),
        "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "emb": dict(r=3, lora_alpha=6, target_modules=["embed_tokens", "up_proj"], layers_to_transform=None),
        "bias": dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["o_proj", "down_proj"]),
    }
    return {name: sh.make_adapter(root / name, seed, **cfg) for seed, (name, cfg) in enumerate(specs.items())}


@pytest.fixture(scope="module")
def models(mixed, sh):
    served = tiny_llama()
    load_adapters(served, mixed)
    return served, sh.reference_model(mixed)


def _ids(batch, seq, seed=0):
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows", [
    ["r2", "r8", "rs", "qv", "emb", "bias", None],  # every row its own adapter (BGMV rows path)
    ["r2", "r8", "rs", "qv", "emb", "bias"],  # in load order: gather-free SGMV on bank views
    ["r8", "r8", "r8", "r8"],  # one adapter for the whole batch (single path)
    ["qv", None, "r2", "qv", "r2", None, "r2", "qv"],  # shared adapters, unsorted (rows path)
    [None, None, "r2", "r2", "r8", "r8"],  # sorted equal blocks (grouped path on views)
    [None, None],  # no adapter at all
])
def test_mixed_batch_equals_each_row_alone(models, rows, sh):
    served, ref = models
    ids = _ids(len(rows), 7)
    with torch.no_grad():
        with bank_routing(served, rows):
            got = served(input_ids=ids).logits
        alone = sh.per_row(ref, ids, rows)
        with lk.routing(adapter_names=rows):
            reference = ref(input_ids=ids).logits
        base = served(input_ids=ids).logits  # outside the block: banks do nothing
    assert (got - alone).abs().max() <= TOL
    # The core's stacked reference path drops lora_B.bias (LoraLinear.plain_units ignores lora_bias), so rows
    # of the "bias" adapter are checked against running alone only.
    keep = torch.tensor([r != "bias" for r in rows])
    assert (got[keep] - reference[keep]).abs().max() <= TOL
    for i, name in enumerate(rows):
        changed = (got[i] - base[i]).abs().max() > 1e-3
        assert changed == (name is not None)


def test_all_three_plans_are_exercised(models):
    served, _ = models
    bank = served.model.layers[0].self_attn.q_proj.bank
    ranks = bank.ranks
    s = lambda *v: torch.tensor(v)[:, None]  # noqa: E731
    assert make_plan(s(1, 1, 1), ranks).mode == "single"
    assert make_plan(s(3, 1, 2), ranks).mode == "rows"
    assert make_plan(s(1, 2, 3), ranks).mode == "grouped"  # sorted, contiguous: views, no gather
    assert make_plan(s(0, 0, 1, 1, 2, 2), ranks).mode == "grouped"  # equal blocks, "no adapter" included
    assert make_plan(s(1, 1, 2, 3, 3, 3), ranks).mode == "rows"  # unequal blocks would need padding
    assert make_plan(s(1, 3), ranks).mode == "rows"  # not contiguous: would need a weight copy
    assert make_plan(s(2, 1, 2, 1, 2, 1), ranks).mode == "rows"
    assert make_plan(s(1, 2), ranks, weighted=True).mode == "rows"
    assert make_plan(s(0, 0), ranks).mode == "none"


def test_weighted_combination_equals_weighted_sum(models):
    served, ref = models
    ids = _ids(3, 6, 1)
    rows = [{"r2": 0.7, "r8": 0.3}, "qv", {"rs": -0.5, "emb": 1.5, "bias": 0.25}]
    with torch.no_grad():
        with bank_routing(served, rows):
            got = served(input_ids=ids).logits
        # Reference: the core's weighted path (adapter_weights: name -> per-row weight).
        weights = {n: torch.zeros(3) for n in ["r2", "r8", "qv", "rs", "emb", "bias"]}
        for i, r in enumerate(rows):
            for n, w in (r.items() if isinstance(r, dict) else [(r, 1.0)]):
                weights[n][i] = w
        with lk.routing(adapter_weights=weights):
            expected = ref(input_ids=ids).logits
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("rows", [
    ["r2", "r8", "rs", "qv", "emb", "bias", None],
    [{"r2": 0.7, "r8": 0.3}, "qv", {"rs": -0.5, "emb": 1.5, "bias": 0.25}, None],
])
def test_row_blocks_equal_one_block(models, rows, monkeypatch):
    """The inference per-row path works through cache-sized blocks of rows; one row per block gives the
    same result as the whole batch at once (and as the autograd path, which never blocks)."""
    import lorakit.serving.bank as bank_mod

    served, _ = models
    ids = _ids(len(rows), 5, 2)
    with torch.enable_grad():
        with bank_routing(served, rows):
            graded = served(input_ids=ids).logits.detach()
    with torch.no_grad():
        with bank_routing(served, rows):
            whole = served(input_ids=ids).logits
        monkeypatch.setattr(bank_mod, "ROW_BLOCK_BYTES", 1)
        with bank_routing(served, rows):
            blocked = served(input_ids=ids).logits
    assert (blocked - whole).abs().max() <= TOL
    assert (blocked - graded).abs().max() <= TOL


def test_generate_with_cache_and_left_padding_equals_per_row(models):
    served, ref = models
    rows = ["r8", None, "emb", "qv"]
    prompts = [_ids(1, n, seed)[0] for seed, n in enumerate([5, 3, 6, 2])]
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=pad)
    from lorakit.serving import generate
    got = generate(served, ids, rows, attention_mask=mask, use_cache=True, **kw)
    for i, (p, name) in enumerate(zip(prompts, rows)):
        if name is None:
            with lk.disable_adapters(ref):
                alone = ref.generate(input_ids=p[None], **kw)
        else:
            lk.set_adapter(ref, name)
            alone = ref.generate(input_ids=p[None], **kw)
        assert torch.equal(got[i, width:], alone[0, len(p):]), (i, name)


def test_conv1d_model_gpt2(tmp_path, sh):
    dirs = {f"g{i}": sh.make_adapter(tmp_path / f"g{i}", i, tiny_gpt2, r=2 + i, lora_alpha=4,
                                  target_modules=["c_attn", "c_proj", "c_fc"]) for i in range(3)}
    served = tiny_gpt2()
    load_adapters(served, dirs)
    ref = sh.reference_model(dirs, tiny_gpt2)
    rows = ["g2", "g0", None, "g1"]
    ids = _ids(4, 5)
    with torch.no_grad(), bank_routing(served, rows):
        got = served(input_ids=ids).logits
    with torch.no_grad():
        assert (got - sh.per_row(ref, ids, rows)).abs().max() <= TOL


def test_attached_adapters_join_the_bank(mixed, sh):
    model = sh.reference_model({k: mixed[k] for k in ["r2", "rs", "emb"]})
    from lorakit.serving import bank_adapters
    bank_adapters(model)
    rows = ["rs", "emb", "r2", None]
    ids = _ids(4, 5, 2)
    with torch.no_grad():
        with bank_routing(model, rows):
            got = model(input_ids=ids).logits
        with lk.routing(adapter_names=rows):
            expected = model(input_ids=ids).logits
    assert (got - expected).abs().max() <= TOL


def test_decode_shapes_and_bf16_run(models):
    served, _ = models
    x = torch.randn(3, 1, 32)
    layer = served.model.layers[1].mlp.up_proj
    with torch.no_grad(), bank_routing(served, ["r8", None, "emb"]):
        y = layer(x)
        y2 = layer(x[:, 0])  # (batch, in) without a sequence axis
    assert y.shape == (3, 1, 64) and torch.allclose(y[:, 0], y2, atol=1e-6)


def test_all_linear_default_targets(tmp_path, sh):
    d = sh.make_adapter(tmp_path / "al", 3, r=4, lora_alpha=8, target_modules="all-linear")
    served = tiny_llama()
    reg = load_adapters(served, [d])
    assert reg.names == ["al"]
    assert set(sh.ALL) <= {p.rsplit(".", 1)[-1] for p in reg.banks}


def test_kernel_hook_is_called_and_can_fall_back(models):
    from lorakit.serving import register_kernel

    served, _ = models
    calls = []

    def fallback(x, A, B, slots, weights, r_used, **kw):
        calls.append(tuple(x.shape))
        return None  # "shape not handled": the torch path runs

    ids = _ids(2, 3)
    with torch.no_grad():
        with bank_routing(served, ["r8", "r2"]):
            expected = served(input_ids=ids).logits
        register_kernel("cpu", fallback)
        try:
            with bank_routing(served, ["r8", "r2"]):
                got = served(input_ids=ids).logits
        finally:
            register_kernel("cpu", None)
    assert calls and torch.equal(got, expected)


def test_generate_repeats_row_adapters_for_num_return_sequences(models):
    from lorakit.serving import generate

    served, ref = models
    ids = _ids(2, 4, 5)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    got = generate(served, ids, ["qv", "r2"], num_return_sequences=2, num_beams=2, **kw)
    for i, name in enumerate(["qv", "r2"]):
        lk.set_adapter(ref, name)
        alone = ref.generate(input_ids=ids[i:i + 1], num_return_sequences=2, num_beams=2, **kw)
        assert torch.equal(got[2 * i: 2 * i + 2], alone)


# -- host work per forward: shared routing, cached plans and their invalidation ----------------------------------
def test_banks_with_one_table_share_one_slot_gather_per_forward(models):
    from lorakit.serving import bank as bank_mod
    from lorakit.serving import registry_of

    served, _ = models
    banks = list(registry_of(served).banks.values())
    with torch.no_grad(), bank_routing(served, ["r2", "qv", "emb", None]):
        served(input_ids=_ids(4, 3))
        shared = bank_mod._ROWS_CACHE["entry"][3]
    tables = {bank._layout()[0] for bank in banks}
    # one gather per distinct id -> slot table (adapters with different target modules give several), not per bank
    assert len(shared.slots) == len(tables) < len(banks)


def test_cached_plans_follow_bank_changes_under_one_ids_tensor(mixed, sh):
    from lorakit.serving import registry_of

    served = tiny_llama()
    reg = load_adapters(served, {"r2": mixed["r2"], "r8": mixed["r8"]})
    ids = reg.route(["r2", "r8"])[0]
    x = _ids(2, 5)
    with torch.no_grad(), lk.routing(adapter_ids=ids):
        first = served(input_ids=x).logits
        assert torch.equal(served(input_ids=x).logits, first)  # the banks' cached plans
        reg.remove("r8")
        load_adapters(served, {"qv": mixed["qv"]})  # takes r8's freed id: same ids tensor, new tables
        assert registry_of(served).ids["qv"] == 1
        got = served(input_ids=x).logits
    with torch.no_grad(), bank_routing(served, ["r2", "qv"]):  # a fresh ids tensor: nothing cached
        fresh = served(input_ids=x).logits
    assert torch.equal(got, fresh) and (got[0] - first[0]).abs().max() <= TOL
    assert (got[1] - sh.per_row(sh.reference_model({"qv": mixed["qv"]}), x[1:], ["qv"])[0]).abs().max() <= TOL


def test_kernel_registered_inside_one_routing_block_is_used(models):
    from lorakit.serving import register_kernel

    served, _ = models
    calls = []

    def counting(x, A, B, slots, weights, r_used, **kw):
        calls.append(r_used)
        return None  # the torch path computes: outputs stay comparable bit for bit

    x = _ids(3, 2)
    with torch.no_grad(), bank_routing(served, ["r8", "r2", None]):
        expected = served(input_ids=x).logits
        register_kernel("cpu", counting)
        try:
            got = served(input_ids=x).logits  # same routing (cached plans), but a kernel is registered now
        finally:
            register_kernel("cpu", None)
        again = served(input_ids=x).logits
    assert calls and torch.equal(got, expected) and torch.equal(again, expected)


def test_routing_reinstalls_banks_after_delete_adapter_unwraps_layers(sh, tmp_path):
    from lorakit.serving import bank_adapters

    served = tiny_llama()
    lk.add_adapter(served, lk.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]), "a")
    bank_adapters(served, ["a"])
    x = _ids(2, 4)
    with torch.no_grad():
        with bank_routing(served, ["a", None]):
            before = served(input_ids=x).logits
        lk.delete_adapter(served, "a")  # q_proj / v_proj get their plain base layers back
        with bank_routing(served, ["a", None]):
            after = served(input_ids=x).logits
        base = served(input_ids=x).logits
    assert torch.equal(after, before)
    assert not torch.equal(after[0], base[0]) and torch.equal(after[1], base[1])


def test_banked_embedding_lora_on_a_float_scaled_embedding(tmp_path):
    """BioGPT's embedding scales its lookup by a Python float: a banked embedding LoRA is scaled so too, as PEFT
    scales it (peft/tuners/lora/layer.py 0.21.2 Embedding.forward, ``_get_embed_scale``). The reference is PEFT's
    model on the row with the adapter and the base on the row without. Was: the bank applied only a tensor scale
    (Gemma's), so that row's embedding LoRA came out sqrt(32) times too small."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import BioGptConfig, BioGptForCausalLM

    def biogpt():
        torch.manual_seed(0)
        return BioGptForCausalLM(BioGptConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, vocab_size=96, max_position_embeddings=64)).eval()

    peft_model = get_peft_model(biogpt(), PeftLoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                                         init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "emb")
    ids = _ids(2, 6)
    with torch.no_grad():
        want = peft_model(input_ids=ids[:1]).logits
        base = biogpt()(input_ids=ids[1:]).logits
        served = biogpt()
        load_adapters(served, {"emb": tmp_path / "emb"})
        with bank_routing(served, ["emb", None]):
            got = served(input_ids=ids).logits
    torch.testing.assert_close(got[1:], base, rtol=0, atol=TOL)
    torch.testing.assert_close(got[:1], want, rtol=0, atol=TOL)
