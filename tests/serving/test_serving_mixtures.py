"""Adapters the banks cannot hold, served by the same engine in their own forward: router-driven lorakit
mixtures (MixLoRA, MoLE, MeteoRA, X-LoRA), DoRA (unmerged) and LoRA with trainable token rows. Greedy outputs
equal ``model.generate`` with the adapter active (X-LoRA with ``use_cache=False``, as its scaling pass needs), in
batches that also carry banked LoRA rows and base rows."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lk_models import save_random_adapter, tiny_llama
from lorakit.core.errors import AdapterError
from lorakit.methods.meteora import MeteoraConfig
from lorakit.methods.mixlora import MixLoraConfig
from lorakit.methods.mole import MoleConfig
from lorakit.methods.xlora import XLoraConfig
from lorakit.serving import generate as bank_generate
from lorakit.serving import load_adapters
from lorakit.serving.engine import Engine
from lorakit.serving.sampling import SamplingParams
from lorakit.serving.store import AdapterStore

EOS = 2
CONFIGS = {
    "mixlora": lambda: MixLoraConfig(r=4, num_experts=4, top_k=2),
    "mole": lambda: MoleConfig(r=4),
    "meteora": lambda: MeteoraConfig(num_experts=3, expert_r=[4, 4, 4]),
    "xlora": lambda: XLoraConfig(num_experts=3, expert_r=[4, 4, 4]),
    "dora": lambda: lk.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    # trained embedding rows (PEFT's trainable_token_indices), tokens the random prompts hit
    "tokens": lambda: lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                    trainable_token_indices=list(range(3, 96, 4))),
}


def _cut(ids):
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


@pytest.mark.parametrize("method", list(CONFIGS))
def test_engine_serves_unbanked_adapter_with_banked_rows(method, tmp_path, sh):
    root = tmp_path / "adapters"
    save_random_adapter(root / method, CONFIGS[method](), seed=5)
    # every linear layer: an FFN-level mixture (MixLoRA, MoLE) wraps the whole MLP, whose inner projections also
    # take the banked rows (their host paths go through the wrapper's base_layer)
    sh.make_adapter(root / "plain", seed=3, r=4)
    model = tiny_llama()
    store = AdapterStore(model, [root], max_loras=4)
    store.register_dir(root)
    assert method in store.attached and "plain" not in store.attached
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4, max_batch=8)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (6, 4, 9, 3, 7)]
    specs = [method, "plain", None, method, "plain"]
    reqs = engine.generate(prompts, specs, SamplingParams(max_tokens=8))

    reference = tiny_llama()
    lk.load_adapter(reference, root / method, method)
    banked = tiny_llama()
    load_adapters(banked, {"plain": root / "plain"})
    for p, s, r in zip(prompts, specs, reqs):
        assert r.error is None, r.error
        if s == method:
            lk.set_adapter(reference, method)
            out = reference.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False,
                                     use_cache=method != "xlora")
            lk.set_adapter(reference, [])
        else:
            out = bank_generate(banked, torch.tensor([p]), [s], max_new_tokens=8, do_sample=False)
        assert r.output_ids == _cut(out[0, len(p):].tolist()), s
    assert engine.cache.used_blocks == 0
    with pytest.raises(AdapterError, match="weighted mix"):
        engine.submit([4, 5], {method: 0.5, "plain": 0.5})
    store.unregister(method)  # evicts the attached adapter from the model
    assert method not in lk.adapter_names(model)


def test_engine_serves_a_dylora_adapter_at_the_chosen_rank(tmp_path):
    """DyLoRA (nested ranks) served with ``AdapterStore(rank=b)`` (``lorakit serve --rank b``) generates as the
    model with the adapter loaded at rank b (``lorakit.load_adapter(..., config_overrides={"rank": b})``), which
    differs from rank r_max; a rank above the adapter's r is refused at registration."""
    from lorakit.core.errors import ConfigError
    from lorakit.methods.dylora import DyLoraConfig

    root = tmp_path / "adapters"
    save_random_adapter(root / "dy", DyLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=7)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 8)]
    outputs = {}
    for rank in (1, 4):
        model = tiny_llama()
        store = AdapterStore(model, [root], max_loras=2, rank=rank)
        store.register_dir(root)
        engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4, max_batch=4)
        reqs = engine.generate(prompts, ["dy", "dy"], SamplingParams(max_tokens=6))
        reference = tiny_llama()
        lk.load_adapter(reference, root / "dy", "dy", config_overrides={"rank": rank})
        for p, r in zip(prompts, reqs):
            assert r.error is None, r.error
            out = reference.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)
            assert r.output_ids == _cut(out[0, len(p):].tolist())
        outputs[rank] = [r.output_ids for r in reqs]
    assert outputs[1] != outputs[4]
    with pytest.raises(ConfigError, match="rank"):
        AdapterStore(tiny_llama(), [root], rank=5).register_dir(root)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(AdapterError, match="positive integer"):
            AdapterStore(tiny_llama(), [root], rank=bad)
    # an adapter served in the model's own layers must have a name the layers can hold
    store = AdapterStore(tiny_llama(), [root])
    for reserved in ("eval", "training"):
        with pytest.raises(AdapterError, match="attribute"):
            store.register(reserved, root / "dy")
    assert store.names() == []


@pytest.mark.parametrize("banked_first", [False, True])
def test_engine_serves_gamma_mod_with_banked_rows_on_every_linear(banked_first, tmp_path, sh):
    """γ-MoD wraps whole decoder blocks (AdapterLayer on ``model.layers.i``), so a banked LoRA's host paths
    (``model.layers.i.self_attn.q_proj``) lie under a wrapper's ``base_layer``. A banked adapter on every linear layer
    must still load and serve next to it, whichever was made resident first (was: AttributeError "AdapterLayer has
    no attribute `self_attn`" and the request failed); greedy outputs equal offline generation."""
    from lorakit.methods.gamma_mod import GammaModConfig

    root = tmp_path / "adapters"
    save_random_adapter(root / "gmod", GammaModConfig(r=4, target_modules=["q_proj", "v_proj"], mod_layers=[1],
                                        inference_threshold=0.0, decode_threshold=0.0), seed=5)
    sh.make_adapter(root / "plain", seed=3, r=4)  # q, k, v, o, gate, up, down
    model = tiny_llama()
    store = AdapterStore(model, [root], max_loras=4)
    store.register_dir(root)
    assert "gmod" in store.attached and "plain" not in store.attached
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4, max_batch=8)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (6, 4, 9, 3)]
    specs = ["plain", "gmod", None, "plain"] if banked_first else ["gmod", "plain", None, "plain"]
    first = engine.generate(prompts[:1], specs[:1], SamplingParams(max_tokens=8))  # one of them resident first
    reqs = first + engine.generate(prompts[1:], specs[1:], SamplingParams(max_tokens=8))

    reference = tiny_llama()
    lk.load_adapter(reference, root / "gmod", "gmod")
    banked = tiny_llama()
    load_adapters(banked, {"plain": root / "plain"})
    for p, s, r in zip(prompts, specs, reqs):
        assert r.error is None, r.error
        if s == "gmod":
            lk.set_adapter(reference, "gmod")
            out = reference.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)
            lk.set_adapter(reference, [])
        else:
            out = bank_generate(banked, torch.tensor([p]), [s], max_new_tokens=8, do_sample=False)
        assert r.output_ids == _cut(out[0, len(p):].tolist()), s
    assert engine.cache.used_blocks == 0
    store.unregister("gmod")  # the block wrappers go; the banked adapter keeps serving
    again = engine.generate(prompts[3:], ["plain"], SamplingParams(max_tokens=8))[0]
    assert again.error is None and again.output_ids == reqs[3].output_ids
