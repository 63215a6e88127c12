"""The continuous-batching engine: greedy outputs equal ``model.generate`` under lorakit routing (per adapter,
base rows, mixed ranks, weighted mixes), a paged KV cache that queues and preempts within its budget and leaks
no block, sampling options, aborts, and the adapter tiers (LRU eviction, host cache, unload while running)."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading
import time

import pytest
import torch

from lk_models import tiny_llama
from lorakit.core.errors import AdapterError, AdapterLoadError, UnknownAdapterError
from lorakit.serving import generate as bank_generate
from lorakit.serving import bank_routing, load_adapters
from lorakit.serving.engine import Engine, EngineBusyError, EngineStopError, RequestError
from lorakit.serving.sampling import SamplingParams
from lorakit.serving.store import AdapterStore, confine

EOS = 2  # LlamaConfig's default eos_token_id (tiny_llama)


def _reference(model, prompt, spec, max_tokens):
    """HF ``generate`` (greedy, its own KV cache) with the row's adapter routed by lorakit; cut after EOS."""
    out = bank_generate(model, torch.tensor([prompt]), [spec], max_new_tokens=max_tokens, do_sample=False)
    ref = out[0, len(prompt):].tolist()
    return ref[: ref.index(EOS) + 1] if EOS in ref else ref


@pytest.mark.parametrize("budget_blocks,max_batch", [(64, 8), (7, 4)])
def test_engine_greedy_equals_generate(ranked_adapters, budget_blocks, max_batch, sh):
    """(64 blocks) everything fits; (7 blocks of 4 tokens) requests queue for blocks and running ones are preempted
    and recomputed — the greedy tokens are the same either way."""
    _, dirs = ranked_adapters
    model = tiny_llama()
    load_adapters(model, dirs)
    engine = Engine(model, kv_cache_bytes=sh.kv_budget(model, budget_blocks), block_size=4, max_batch=max_batch)
    assert engine.cache.num_blocks == budget_blocks
    prompts = sh.random_prompts(10)
    specs = ["a0", None, "a1", "a2", "a3", "a0", None, "a3", {"a0": 0.7, "a2": 0.3}, "a1"]
    reqs = engine.generate(prompts, specs, SamplingParams(max_tokens=12))
    for p, s, r in zip(prompts, specs, reqs):
        assert r.finish_reason in ("stop", "length") and r.error is None
        assert r.output_ids == _reference(model, p, s, 12), s
    assert engine.cache.used_blocks == 0 and not engine.running and not engine.waiting
    if budget_blocks == 7:
        assert engine.stats["preemptions"] > 0


def test_engine_refuses_what_can_never_run(ranked_adapters, sh):
    _, dirs = ranked_adapters
    model = tiny_llama()
    load_adapters(model, dirs)
    engine = Engine(model, kv_cache_bytes=sh.kv_budget(model, 10), block_size=4)  # 10 blocks: 40 tokens
    with pytest.raises(RequestError, match="context length"):
        engine.submit(list(range(3, 60)), None, SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match="whole KV cache"):
        engine.submit(list(range(3, 40)), None, SamplingParams(max_tokens=20))
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], None)
    with pytest.raises(AdapterError, match="a1"):
        engine.submit([5, 6], "a1x")


def test_engine_generate_refused_at_submission_leaves_nothing_queued(ranked_adapters, sh):
    """Engine.generate is all or nothing at submission (its docstring): a later prompt refused by submit (an
    unknown adapter) aborts the ones already queued, so no request runs on without a caller to collect it."""
    _, dirs = ranked_adapters
    model = tiny_llama()
    load_adapters(model, dirs)
    engine = Engine(model, kv_cache_bytes=sh.kv_budget(model, 16), block_size=4)
    prompts = sh.random_prompts(3)
    with pytest.raises(AdapterError, match="a1x"):
        engine.generate(prompts, ["a0", None, "a1x"], SamplingParams(max_tokens=4))
    engine.step()  # the aborts are taken up at the next step
    assert not engine.waiting and not engine.running and engine.cache.used_blocks == 0
    (req,) = engine.generate(prompts[:1], ["a0"], SamplingParams(max_tokens=4))  # the engine serves on
    assert req.finish_reason in ("stop", "length") and req.error is None


def test_engine_sampling_seed_topk_and_abort(ranked_adapters):
    _, dirs = ranked_adapters
    model = tiny_llama()
    load_adapters(model, dirs)
    engine = Engine(model, kv_cache_bytes=1 << 20, block_size=4)
    p = [5, 9, 14]
    run = lambda **kw: engine.generate([p], ["a1"], SamplingParams(max_tokens=8, ignore_eos=True, **kw))[0].output_ids
    greedy = run()
    assert run(temperature=1.5, top_k=1, seed=3) == greedy  # top-k 1 keeps only the argmax
    assert run(temperature=1.5, seed=7) == run(temperature=1.5, seed=7)
    assert len({tuple(run(temperature=2.0, seed=s)) for s in range(4)}) > 1
    assert run(temperature=1.0, top_p=1e-6, seed=1) == greedy  # the nucleus holds only the top token
    req = engine.submit(p, "a0", SamplingParams(max_tokens=40, ignore_eos=True))
    engine.step()
    assert engine.cache.used_blocks > 0
    engine.abort(req.request_id)
    engine.step()
    assert req.finish_reason == "abort" and engine.cache.used_blocks == 0


def test_engine_stop_strings_with_tokenizer():
    from lorakit.hub import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer()
    engine = Engine(model, tok, kv_cache_bytes=8 << 20)
    full = engine.generate(["The cat"], [None], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert full.text and full.finish_reason == "length"
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    cut = engine.generate(["The cat"], [None], SamplingParams(max_tokens=12, ignore_eos=True, stop=stop))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    streamed = []
    req = engine.submit("The cat", None, SamplingParams(max_tokens=12, ignore_eos=True),
                        on_event=lambda e: streamed.append(e))
    while not req.done.is_set():
        engine.step()
    assert "".join(e.text for e in streamed) == full.text and streamed[-1].finished


def test_store_tiers_lru_eviction_and_outputs(ranked_adapters, sh):
    root, dirs = ranked_adapters
    model = tiny_llama()
    store = AdapterStore(model, [root], max_loras=2, max_cpu_loras=3)
    assert sorted(store.register_dir(root)) == sorted(dirs)
    reference = tiny_llama()
    load_adapters(reference, dirs)
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4, max_batch=4)
    prompts = sh.random_prompts(12, seed=1)
    specs = [f"a{i % 4}" for i in range(12)]
    reqs = engine.generate(prompts, specs, SamplingParams(max_tokens=6))
    for p, s, r in zip(prompts, specs, reqs):
        assert r.output_ids == _reference(reference, p, s, 6)
    assert len(store.resident) <= 2 and store.stats["evictions"] > 0
    assert len(store._host) <= 3
    assert engine.cache.used_blocks == 0 and not store._pins


def test_store_takes_a_relative_root(ranked_adapters, monkeypatch):
    """``lorakit serve --adapters adapters/`` (the README's command) gives a relative root: the scanned folders
    must not be joined to it twice (was "adapter path 'adapters/a0' does not exist")."""
    root, dirs = ranked_adapters
    monkeypatch.chdir(root.parent)
    store = AdapterStore(tiny_llama(), [root.name], max_loras=2)
    assert sorted(store.register_dir(root.name)) == sorted(dirs)
    store.register("again", "a1")  # a client's relative path is still taken from the root
    assert store.paths["again"] == store.paths["a1"]


def test_store_unload_while_running_and_bad_files(ranked_adapters, tmp_path, sh):
    root, dirs = ranked_adapters
    model = tiny_llama()
    store = AdapterStore(model, [root, tmp_path], max_loras=4)
    store.register_dir(root)
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4)
    req = engine.submit([4, 5, 6], "a2", SamplingParams(max_tokens=10, ignore_eos=True))
    engine.step()
    store.unregister("a2")  # running request keeps its adapter until it finishes
    with pytest.raises(AdapterError, match="unknown adapter"):
        engine.submit([4], "a2")
    while not req.done.is_set():
        engine.step()
    assert req.finish_reason == "length" and "a2" not in store.resident
    # corrupt weights: refused when first used; the other adapters keep serving
    bad = sh.make_adapter(tmp_path / "bad", seed=1, r=2)
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    store.register("bad", bad)
    r_bad, r_ok = engine.generate([[4, 5], [4, 5]], ["bad", "a1"], SamplingParams(max_tokens=3))
    assert r_bad.finish_reason == "error" and "not a valid safetensors" in r_bad.error
    assert r_ok.finish_reason in ("stop", "length") and "bad" not in store.names()
    with pytest.raises(AdapterError, match="outside the allowed roots|'..'"):
        store.register("x", root / ".." / "elsewhere")
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(AdapterError, match="outside the allowed roots"):
        confine(tmp_path / "link", [tmp_path])
    with pytest.raises(AdapterLoadError):
        store.register("nope", tmp_path)  # a folder without an adapter config


def test_a_request_queued_before_its_adapter_is_unloaded_reads_as_a_later_one(ranked_adapters):
    """Was: the queued request failed with "adapter 'a1' is not registered" (an HTTP 400), a request after the
    unload with "unknown adapter 'a1'. ..." (a 404). Both now get the unknown-adapter error."""
    root, _ = ranked_adapters
    model = tiny_llama()
    store = AdapterStore(model, [root], max_loras=2)
    store.register_dir(root)
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4)
    queued = engine.submit([4, 5, 6], "a1", SamplingParams(max_tokens=3))
    store.unregister("a1")
    while not queued.done.is_set():
        engine.step()
    with pytest.raises(AdapterError) as later:
        engine.submit([4, 5, 6], "a1")
    assert str(later.value).startswith("unknown adapter 'a1'.") and "3 adapter(s) are loaded" in str(later.value)
    assert queued.finish_reason == "error" and queued.error == str(later.value)
    assert type(queued.exception) is UnknownAdapterError and type(later.value) is UnknownAdapterError


def test_self_moa_proposals_and_sequential_rounds():
    """Self-MoA (arXiv:2502.00674): n seeded samples of the same adapter (one shared prefill), then a synthesis pass
    over them, equal to n=1 requests with seed + i; the sequential variant carries the synthesized answer through
    windows of w-1 new samples."""
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.serving.self_moa import SelfMoAConfig, aggregation_prompt, self_moa, windows

    assert windows(4, None) == [(0, 4)] and windows(6, 3) == [(0, 3), (3, 5), (5, 6)]
    model, tok = load_model_and_tokenizer()
    engine = Engine(model, tok, kv_cache_bytes=8 << 20)
    params = SamplingParams(max_tokens=6, seed=11)
    answer, proposals = self_moa(engine, "The cat", None, params, SelfMoAConfig(n=3, temperature=1.0))
    assert engine.stats["forked"] == 2  # the 3 proposals, choices of one prompt, shared its prefill
    again = [engine.generate(["The cat"], [None], SamplingParams(max_tokens=6, temperature=1.0, seed=11 + i))[0].text
             for i in range(3)]
    assert proposals == again and len(set(proposals)) > 1
    assert answer == engine.generate([aggregation_prompt("The cat", proposals)], [None], params)[0].text
    seq, props = self_moa(engine, "The cat", None, params, SelfMoAConfig(n=4, window=2, temperature=1.0))
    s1 = engine.generate([aggregation_prompt("The cat", props[:2])], [None], params)[0].text
    s2 = engine.generate([aggregation_prompt("The cat", [s1, props[2]])], [None], params)[0].text
    s3 = engine.generate([aggregation_prompt("The cat", [s2, props[3]])], [None], params)[0].text
    assert seq == s3
    with pytest.raises(Exception, match="window"):
        SelfMoAConfig(n=3, window=1)


def test_store_prefetches_adapters_of_queued_requests(ranked_adapters):
    """Requests waiting for a slot get their adapters read into the host cache in the background (disk -> host),
    so admitting them later only copies host tensors into the banks."""
    import concurrent.futures as cf

    root, _ = ranked_adapters
    model = tiny_llama()
    store = AdapterStore(model, [root], max_loras=1, max_cpu_loras=8)
    store.register_dir(root)
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4, max_batch=1)
    reqs = [engine.submit([5, 6, 7], f"a{i}", SamplingParams(max_tokens=4, ignore_eos=True)) for i in range(3)]
    engine.step()  # a0 admitted; a1, a2 queued -> prefetched
    cf.wait(list(store._pending.values()))
    assert {"a1", "a2"} <= set(store._host) and store.resident == ["a0"]
    loads = store.stats["disk_loads"]
    while not all(r.done.is_set() for r in reqs):
        engine.step()
    assert store.stats["disk_loads"] == loads and store.stats["host_hits"] >= 2  # served from the host cache
    assert engine.cache.used_blocks == 0


def test_store_banks_grow_by_doubling_up_to_max_loras(tmp_path, sh):
    """Adapters loaded one at a time by a store grow each bank O(log n) times (capacity 2, 4, 8, ... capped at
    max_loras + the zero slot), not once per adapter (a full copy of the bank each time); outputs stay exact."""
    names = {f"g{i}": sh.make_adapter(tmp_path / f"g{i}", seed=50 + i, r=2 + i % 3) for i in range(12)}
    model = tiny_llama()
    store = AdapterStore(model, [tmp_path], max_loras=10)
    store.register_dir(tmp_path)
    capacities = []
    for n in names:
        assert store.ensure_resident(n)
        bank = model.model.layers[0].self_attn.q_proj.bank
        if not capacities or capacities[-1] != bank.capacity:
            capacities.append(bank.capacity)
    assert capacities == [2, 4, 8, 11]  # 1 + 10 slots at most: the cap bounds the doubling
    assert len(store.resident) == 10
    reference = tiny_llama()
    last = list(names)[-4:]
    load_adapters(reference, {n: names[n] for n in last})
    ids = torch.randint(3, 96, (4, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with store.registry.routing(last):
            got = model(input_ids=ids).logits
        with bank_routing(reference, last):
            ref = reference(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-5


def test_store_banks_each_name_with_the_config_it_registered(tmp_path, sh):
    """Configs are read at registration and reused at every (re)load into the banks. The same folder registered
    under two names (vLLM's load_lora_adapter allows it) after its config changed on disk: each name keeps the
    config it was registered with, across evictions and after the other name is unloaded; an unload + load under
    the same name picks up the file's new config."""
    import json

    folder = sh.make_adapter(tmp_path / "f", seed=1, r=4, lora_alpha=8)
    sh.make_adapter(tmp_path / "other", seed=2, r=4, lora_alpha=16)
    store = AdapterStore(tiny_llama(), [tmp_path], max_loras=1)
    store.register("a", folder)
    store.register("other", tmp_path / "other")
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora_alpha": 64}))
    store.register("b", folder)

    def alpha(name):  # banked now (max_loras=1: whatever was resident is evicted first)
        assert store.ensure_resident(name)
        return store.registry.configs[name].lora_alpha

    assert [alpha("a"), alpha("b"), alpha("a")] == [8, 64, 8]
    store.unregister("b")
    assert [alpha("other"), alpha("a")] == [16, 8]
    store.unregister("a")
    store.register("a", folder)
    assert alpha("a") == 64


def test_engine_fails_a_request_the_adapter_caps_can_never_hold(ranked_adapters):
    """A weighted mix of more adapters than ``max_loras``, or an adapter larger than ``max_resident_bytes``, can never
    be resident: refused at submit (count) or failed when it reaches the queue's head with nothing left to evict
    (bytes), never left waiting there forever with every later request stuck behind it (was: the server hung)."""
    root, _ = ranked_adapters
    model = tiny_llama()
    store = AdapterStore(model, [root], max_loras=2)
    store.register_dir(root)
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4)
    with pytest.raises(RequestError, match="max_loras"):
        engine.submit([4, 5], {"a0": 0.3, "a1": 0.3, "a2": 0.4})
    assert engine.generate([[4, 5]], [{"a0": 0.5, "a1": 0.5}], SamplingParams(max_tokens=3))[0].error is None

    small = AdapterStore(tiny_llama(), [root], max_loras=2, max_resident_bytes=64)
    small.register_dir(root)
    engine = Engine(small.registry.model, store=small, kv_cache_bytes=1 << 20, block_size=4)
    too_big, base = engine.generate([[4, 5], [6, 7]], ["a1", None], SamplingParams(max_tokens=3))
    assert too_big.finish_reason == "error" and "max_resident_bytes" in too_big.error
    assert base.error is None and base.finish_reason in ("stop", "length")


def test_base_requests_pass_one_waiting_for_an_adapter_slot_and_nothing_else_does(ranked_adapters):
    """One resident slot (max_loras=1), held by a long a0 request: an a1 request waits for it. A base-model request
    behind it needs no slot, so it starts at once (was: it waited behind a1 until a0 ended, with rows free, since
    admission stopped at the first request that could not start); an a2 request behind a1 does not pass it (it would
    take the slot a1 waits for). Greedy tokens equal HF generate with the same routing."""
    root, dirs = ranked_adapters
    model = tiny_llama()
    store = AdapterStore(model, [root], max_loras=1)
    store.register_dir(root)
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4, max_batch=4)
    jobs = [("a0", 10), ("a1", 3), (None, 3), ("a2", 3), (None, 2)]
    prompt = [7, 8, 9]
    reqs = [engine.submit(prompt, spec, SamplingParams(max_tokens=m, ignore_eos=True)) for spec, m in jobs]
    started, steps = {}, 0
    while not all(r.done.is_set() for r in reqs):
        engine.step()
        steps += 1
        started.update({i: steps for i, r in enumerate(reqs) if r.output_ids and i not in started})
    assert started[0] == started[2] == started[4] == 1  # a0 and both base requests at once
    assert started[1] == 11 and started[3] > started[1]  # a1 once a0 (10 tokens) let go of the slot; a2 after it
    reference = tiny_llama()
    load_adapters(reference, dirs)
    for (spec, m), r in zip(jobs, reqs):
        assert r.output_ids == _reference(reference, prompt, spec, m)[:m], spec
    assert engine.cache.used_blocks == 0 and not store._pins


def _run_all(engine, reqs):
    while not all(r.done.is_set() for r in reqs):
        engine.step()
    return reqs


def _separately(model, sh, prompt, spec, params, blocks=64):
    """The unshared path: each choice submitted as a request of its own (each prefills the prompt)."""
    engine = Engine(model, kv_cache_bytes=sh.kv_budget(model, blocks), block_size=4, max_batch=8)
    reqs = _run_all(engine, [engine.submit(prompt, spec, p) for p in params])
    assert engine.stats["prefill_tokens"] == len(prompt) * len(params) and engine.stats["forked"] == 0
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("prompt_len", [7, 8])  # the prompt's last 4-token block partly filled (copied) / full
@pytest.mark.parametrize("spec", ["a2", None, {"a0": 0.6, "a3": 0.4}])
def test_choices_share_one_prefill_and_equal_separate_requests(ranked_adapters, sh, prompt_len, spec):
    """n choices of one prompt (OpenAI's n) prefill it once and fork its KV blocks (PagedAttention §4.4), and give the
    tokens the n requests give each prefilling it alone: greedy (all equal) and seeded sampling (choice i with its
    own seed), on an adapter, the base and a weighted mix. Prefill tokens computed: the prompt once, not n times."""
    _, dirs = ranked_adapters
    model = tiny_llama()
    load_adapters(model, dirs)
    prompt = list(range(5, 5 + prompt_len))
    for params in ([SamplingParams(max_tokens=9, ignore_eos=True)] * 4,
                   [SamplingParams(max_tokens=9, temperature=1.0, top_k=20, seed=30 + i, ignore_eos=True)
                    for i in range(4)]):
        engine = Engine(model, kv_cache_bytes=sh.kv_budget(model, 64), block_size=4, max_batch=8)
        shared = _run_all(engine, engine.submit_choices(prompt, spec, params))
        assert [r.output_ids for r in shared] == _separately(model, sh, prompt, spec, params)
        assert engine.stats["prefill_tokens"] == prompt_len and engine.stats["forked"] == 3
        assert all(r.finish_reason == "length" and len(r.output_ids) == 9 for r in shared)
        assert engine.cache.used_blocks == 0 and not engine.running and not engine.waiting
    assert len({tuple(r.output_ids) for r in shared}) > 1  # the seeded choices differ from each other


def test_choices_that_cannot_fork_at_once_fork_later_or_prefill_alone(ranked_adapters, sh):
    """A choice for which the running batch (max_batch 2) or the free blocks (4 blocks) have no room at its prompt's
    prefill waits first in the queue and, when a row frees, forks the prompt's blocks from a choice still running
    (sampling its first token from the prompt's saved last logits: no second prefill); when no choice holding the
    prompt runs any more, it prefills the prompt itself (and the choices behind it fork from it). The tight cache also
    preempts forked choices (their shared blocks stay with the others). Every choice still gives the tokens of a
    request submitted alone, and no block leaks."""
    _, dirs = ranked_adapters
    model = tiny_llama()
    load_adapters(model, dirs)
    prompt = list(range(5, 12))  # 7 tokens: 2 blocks of 4, the last partly filled
    # choice 1 ends early: choice 2 forks from choice 0 then, and choice 3 from choice 2 (one prefill in all) /
    # all end together: choices 2 and 3 find no choice running, so choice 2 prefills again and 3 forks from it
    for lengths, forked, prefills in [((8, 3, 8, 8), 3, 1), ((8, 8, 8, 8), 2, 2)]:
        params = [SamplingParams(max_tokens=m, temperature=1.0, seed=50 + i, ignore_eos=True)
                  for i, m in enumerate(lengths)]
        engine = Engine(model, kv_cache_bytes=sh.kv_budget(model, 64), block_size=4, max_batch=2)
        reqs = _run_all(engine, engine.submit_choices(prompt, "a1", params))
        assert [r.output_ids for r in reqs] == _separately(model, sh, prompt, "a1", params), lengths
        assert engine.stats["forked"] == forked and engine.stats["prefill_tokens"] == prefills * len(prompt)
        assert engine.cache.used_blocks == 0
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=50 + i, ignore_eos=True) for i in range(4)]
    engine = Engine(model, kv_cache_bytes=sh.kv_budget(model, 4), block_size=4, max_batch=8)  # the prompt's 2 + 2
    reqs = _run_all(engine, engine.submit_choices(prompt, "a1", params))
    assert [r.output_ids for r in reqs] == _separately(model, sh, prompt, "a1", params)
    assert engine.stats["forked"] > 0 and engine.stats["preemptions"] > 0 and engine.cache.used_blocks == 0


def test_aborting_a_choice_before_or_after_the_fork(ranked_adapters, sh):
    """A choice aborted while it waits for the prompt's prefill is dropped from it; the first choice aborted before
    its prefill leaves the others to run alone; aborted after the fork, the others keep the shared blocks."""
    _, dirs = ranked_adapters
    model = tiny_llama()
    load_adapters(model, dirs)
    prompt = list(range(5, 15))
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=70 + i, ignore_eos=True) for i in range(3)]
    want = _separately(model, sh, prompt, "a0", params)
    engine = Engine(model, kv_cache_bytes=sh.kv_budget(model, 64), block_size=4, max_batch=8)
    reqs = engine.submit_choices(prompt, "a0", params)
    engine.abort(reqs[1].request_id)
    engine.abort(reqs[0].request_id)
    _run_all(engine, reqs)
    assert [r.finish_reason for r in reqs] == ["abort", "abort", "length"] and reqs[2].output_ids == want[2]
    reqs = engine.submit_choices(prompt, "a0", params)
    engine.step()  # the prefill and the fork
    assert engine.stats["forked"] == 2 and all(r.status == "running" for r in reqs)
    engine.abort(reqs[0].request_id)
    _run_all(engine, reqs)
    assert [r.output_ids for r in reqs[1:]] == want[1:]
    assert engine.cache.used_blocks == 0 and engine.num_waiting == 0
    with pytest.raises(RequestError, match="one per choice"):
        engine.submit_choices(prompt, "a0", params, request_ids=["x"])
    with pytest.raises(RequestError, match="must differ between choices"):  # an abort of "x" would miss one of them
        engine.submit_choices(prompt, "a0", params, request_ids=["x", "y", "x"])
    assert engine.num_waiting == 0


def test_choices_of_prompts_admitted_together_all_fork(ranked_adapters, sh):
    """Prompts admitted in one step keep room (rows, blocks for the copies) for the choices that fork after their
    prefill: with max_batch 8, two 4-choice prompts run together and every choice forks; a third waits for room
    (was: admission counted only the first choices, so the prompts admitted later took the forks' rows and their
    choices went alone, prefilling again)."""
    _, dirs = ranked_adapters
    model = tiny_llama()
    load_adapters(model, dirs)
    engine = Engine(model, kv_cache_bytes=sh.kv_budget(model, 64), block_size=4, max_batch=8)
    prompts = [list(range(5, 12)), list(range(20, 30)), list(range(40, 45))]
    params = [SamplingParams(max_tokens=5, temperature=1.0, seed=90 + i, ignore_eos=True) for i in range(4)]
    groups = [engine.submit_choices(p, "a2", params) for p in prompts]
    engine.step()
    assert engine.num_running == 8 and engine.num_waiting == 4 and engine.stats["forked"] == 6
    _run_all(engine, [r for g in groups for r in g])
    assert engine.stats["forked"] == 9 and engine.stats["prefill_tokens"] == sum(map(len, prompts))
    for p, g in zip(prompts, groups):
        assert [r.output_ids for r in g] == _separately(model, sh, p, "a2", params)


@contextlib.contextmanager
def forward_paused(model):
    """The model's next forward (on the engine thread) stopped until the block ends, so the engine is in the middle
    of a step: calls queued now wait for the next one. Yields an Event set once the forward has got there."""
    reached, gate = threading.Event(), threading.Event()

    def pause(module, args):
        if not reached.is_set():
            reached.set()
            assert gate.wait(60), "the paused forward was never let go"
    handle = model.register_forward_pre_hook(pause)
    try:
        yield reached
    finally:
        gate.set()
        handle.remove()


def test_a_call_the_engine_has_not_started_in_time_is_cancelled_and_never_runs():
    """``Engine.call(fn, start_timeout=s)`` while the engine thread is busy in a step for longer: EngineBusyError, and
    ``fn`` never runs, also after the step ends (was: ``timeout`` raised TimeoutError and ``fn`` ran later anyway).
    A call queued while the engine shuts down is cancelled the same way (was: it waited for a thread that was gone).
    The calls after them run as usual."""
    model = tiny_llama()
    engine = Engine(model, kv_cache_bytes=1 << 20, block_size=4).start()
    ran = []
    try:
        with forward_paused(model) as reached:
            engine.submit([4, 5, 6], None, SamplingParams(max_tokens=2))
            assert reached.wait(30)
            with pytest.raises(EngineBusyError, match="did not run"):
                engine.call(lambda: ran.append("timed out"), start_timeout=0.05)
        assert engine.call(lambda: ran.append("after") or 7) == 7  # the inbox is FIFO: the cancelled one came first
        assert ran == ["after"]
        with cf.ThreadPoolExecutor(2) as pool:
            with forward_paused(model) as reached:
                engine.submit([4, 5, 6], None, SamplingParams(max_tokens=2))
                assert reached.wait(30)
                waiting = pool.submit(engine.call, lambda: ran.append("at shutdown"))
                while engine._inbox.qsize() < 1:
                    time.sleep(0.01)
                stopping = pool.submit(engine.shutdown)
                while not engine._stop.is_set():
                    time.sleep(0.01)
            stopping.result(60)
            with pytest.raises(EngineBusyError, match="shut down"):
                waiting.result(60)
        assert ran == ["after"]
    finally:
        engine.shutdown()


def test_a_shutdown_that_times_out_keeps_its_loop_and_start_refuses_a_second_one():
    """``shutdown(timeout)`` while the engine thread is held in a call past the timeout: EngineStopError, and the
    engine keeps the thread, so ``start()`` refuses with EngineStopError instead of running a second loop over the
    same requests and KV cache (was: shutdown forgot the thread silently and start ran two loops at once). Once the
    call ends the loop stops; shutdown again succeeds and start runs one loop that serves requests as before."""
    model = tiny_llama()
    engine = Engine(model, kv_cache_bytes=1 << 20, block_size=4).start()
    first = engine._thread
    gate, held = threading.Event(), threading.Event()

    def hold():
        held.set()
        return gate.wait(60)
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            holding = pool.submit(engine.call, hold)
            assert held.wait(30)
            with pytest.raises(EngineStopError, match="did not stop"):
                engine.shutdown(timeout=0.1)
            assert engine._thread is first and first.is_alive()
            with pytest.raises(EngineStopError, match="still running"):
                engine.start()
            loops = [t for t in threading.enumerate() if t.name == "lorakit-engine"]
            assert loops == [first]
            gate.set()
            assert holding.result(60) is True  # the held call itself finished, with its result
        engine.shutdown()
        assert not first.is_alive() and engine._thread is None
        engine.start()
        assert engine._thread is not first and engine._thread.is_alive()
        [req] = engine.generate([[4, 5, 6]], [None], SamplingParams(max_tokens=3))
        with torch.no_grad():  # the base alone (no adapter banked): HF generate, greedy, cut after EOS
            ref = model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=3, do_sample=False)[0, 3:].tolist()
        assert req.error is None and req.output_ids == (ref[: ref.index(EOS) + 1] if EOS in ref else ref)
    finally:
        gate.set()
        engine.shutdown()


def test_a_call_queued_after_the_loop_ended_is_cancelled_not_left_waiting():
    """``Engine.call`` sees the loop running, and the loop then ends (a shutdown) before the call reaches the inbox:
    no thread will take it. The caller gets EngineBusyError and ``fn`` does not run (was: with no ``start_timeout``
    it waited on the future forever). The race is forced by doing the shutdown inside the inbox's ``put``."""
    import queue

    class ShutdownFirst(queue.SimpleQueue):
        def put(self, item, *args, **kwargs):
            if item[0] == "call":
                engine.shutdown()  # the loop ends (and cancels what it finds queued) before this call is queued
            super().put(item, *args, **kwargs)

    engine = Engine(tiny_llama(), kv_cache_bytes=1 << 20, block_size=4)
    engine._inbox = ShutdownFirst()
    engine.start()
    ran, outcome = [], []

    def caller():
        try:
            outcome.append(engine.call(lambda: ran.append("late")))
        except EngineBusyError as e:
            outcome.append(e)

    thread = threading.Thread(target=caller, daemon=True)  # daemon: on the old code it never returns
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "Engine.call waited forever for a loop that had ended"
    assert len(outcome) == 1 and isinstance(outcome[0], EngineBusyError) and "shut down" in str(outcome[0])
    assert ran == [] and engine._thread is None


def test_engine_refuses_an_encoder_decoder_at_construction():
    """The engine's paged prefill feeds one decoder stack; an encoder-decoder (T5) is refused when the engine is made,
    naming what to use instead (was: accepted, then its first request failed with transformers' "You must specify
    exactly one of input_ids or inputs_embeds")."""
    from lk_models import tiny_t5

    from lorakit.core.errors import ConfigError
    from lorakit.serving.engine import Engine

    with pytest.raises(ConfigError, match="T5ForConditionalGeneration is an encoder-decoder"):
        Engine(tiny_t5(), None, kv_cache_bytes=1 << 20)


def test_sampling_params_refuse_an_empty_stop_string():
    """An empty stop sequence never matches; it was dropped silently (so ``stop=[""]`` ran to max_tokens)."""
    from lorakit.core.errors import ConfigError

    for stop in ("", ("\n", "")):
        with pytest.raises(ConfigError, match="stop holds an empty string") as e:
            SamplingParams(stop=stop)
        assert e.value.field == "stop"
    assert SamplingParams(stop="\n").stop == ("\n",) and SamplingParams(stop=()).stop == ()
