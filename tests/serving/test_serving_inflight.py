"""Adapters removed or replaced while requests on them are in flight, and adapters banked into a model directly.

Removing (decided, as LoRAX and vLLM keep an adapter that running requests use): with a store, unloading waits for
the requests holding the adapter (running or preempted: they finish on it, token for token as if nothing happened),
new requests for it are refused at once, and nothing the caller can reach (``evict``, ``registry.remove``, banking it
again) takes the adapter from under them: those are refused with AdapterConflictError (a 409 over HTTP). Without a
store the caller owns the banks: an adapter removed from them fails its own rows and no other (was: every row of the
batch failed).

Banked directly (``lorakit.serving.bank_adapters`` / ``load_adapters`` on a model that has a store, before or after the
store was made): served with the registered folders, listed, checked and unloaded through the same store (was:
refused as unknown; a store made after them dropped them)."""

from __future__ import annotations

import httpx
import pytest
import torch

import lorakit as lk
from lk_models import tiny_llama, tiny_llama_words
from lorakit.core.errors import AdapterConflictError, UnknownAdapterError
from lorakit.serving import bank_adapters, load_adapters, registry_of
from lorakit.serving.engine import Engine
from lorakit.serving.sampling import SamplingParams
from lorakit.serving.server import create_app
from lorakit.serving.store import AdapterStore

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)
PROMPTS = [[4, 5, 6, 7, 8, 9, 10], [4, 5, 6, 7, 8, 9, 11], [12, 13, 14]]
ROWS = ["a0", "a1", None]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, sh):
    root = tmp_path_factory.mktemp("inflight")
    return root, {f"a{i}": sh.make_adapter(root / f"a{i}", seed=20 + i, r=2 + 2 * i) for i in range(3)}


def _store_engine(root, **kw):
    model = tiny_llama()
    store = AdapterStore(model, [root], max_loras=4)
    store.register_dir(root)
    return store, Engine(model, store=store, kv_cache_bytes=kw.pop("kv", 1 << 20), block_size=4, **kw)


def _undisturbed(root, rows=ROWS):
    """The token ids of PROMPTS on ``rows``, nothing unloaded."""
    _, engine = _store_engine(root)
    return [r.output_ids for r in engine.generate(PROMPTS, rows, PARAMS)]


def _run(engine, during, steps=2, rows=ROWS):
    """Submit PROMPTS on ``rows``, step ``steps`` times, call ``during()``, run to the end: (requests, what it
    raised)."""
    reqs = [engine.submit(p, a, PARAMS) for p, a in zip(PROMPTS, rows)]
    for _ in range(steps):
        engine.step()
    raised = None
    try:
        during()
    except Exception as e:  # noqa: BLE001  (returned for the test to judge)
        raised = e
    while not all(r.done.is_set() for r in reqs):
        engine.step()
    return reqs, raised


def test_unloading_waits_for_running_and_preempted_requests(folders, sh):
    """A cache so small that a0's request (admitted last: the one preempted) is preempted after the unload: it still
    finishes on a0 (was: it went back to the queue unpinned, a0 was evicted, and it failed as an unknown adapter)."""
    root, _ = folders
    rows = ["a1", None, "a0"]
    expected = _undisturbed(root, rows)
    for kv in (1 << 20, sh.kv_budget(tiny_llama(), 8)):
        store, engine = _store_engine(root, kv=kv)
        reqs, raised = _run(engine, lambda: store.unregister("a0"), rows=rows)
        assert raised is None
        assert [(r.finish_reason, r.output_ids) for r in reqs] == [("length", e) for e in expected], kv
        assert "a0" not in store.resident and "a0" not in store.names() and not store._pins
        with pytest.raises(UnknownAdapterError):
            engine.submit([4, 5], "a0")
    assert engine.stats["preemptions"] > 0  # the small cache did preempt


def test_evicting_or_rebanking_an_adapter_in_use_is_refused(folders):
    """Was: ``store.evict`` of an adapter running requests held dropped it from the banks and the next forward failed
    every row of the batch (a0's, a1's and the base's)."""
    root, dirs = folders
    expected = _undisturbed(root)
    store, engine = _store_engine(root)
    attempts = {"evict": lambda: store.evict("a0"), "remove": lambda: registry_of(engine.model).remove("a0"),
                "rebank": lambda: load_adapters(engine.model, {"a0": dirs["a2"]}, overwrite=True)}
    for what, during in attempts.items():
        reqs, raised = _run(engine, during)
        assert isinstance(raised, AdapterConflictError), (what, raised)
        assert [(r.finish_reason, r.output_ids) for r in reqs] == [("length", e) for e in expected], what
    assert "a0" in store.resident  # registered and resident: only refused while in use
    store.evict("a0")  # idle: evicted, loaded again by its next request
    assert "a0" not in store.resident
    assert engine.generate([PROMPTS[0]], ["a0"], PARAMS)[0].output_ids == expected[0]


def test_without_a_store_a_removed_adapter_fails_its_rows_only(folders):
    root, dirs = folders
    expected = _undisturbed(root)
    model = tiny_llama()
    load_adapters(model, dirs)
    engine = Engine(model, kv_cache_bytes=1 << 20, block_size=4)
    reqs, raised = _run(engine, lambda: registry_of(model).remove("a0"))
    assert raised is None
    assert reqs[0].finish_reason == "error" and type(reqs[0].exception) is UnknownAdapterError
    assert "'a0' was removed from the model's banks while this request ran" in reqs[0].error
    assert [(r.finish_reason, r.output_ids) for r in reqs[1:]] == [("length", e) for e in expected[1:]]


def _attached(seed: int):
    """tiny_llama with adapters 'b0' and 'b1' attached (random, non-zero), for bank_adapters."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(seed)
    for n in ("b0", "b1"):
        lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), n)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lk.set_adapter(model, [])
    return model


def _reference(names, seed):
    """Token ids of PROMPTS[0] on each name, from an engine over a model with only those adapters banked."""
    model = _attached(seed)
    bank_adapters(model, names)
    engine = Engine(model, kv_cache_bytes=1 << 20, block_size=4)
    return {n: engine.generate([PROMPTS[0]], [n], PARAMS)[0].output_ids for n in names}


@pytest.mark.parametrize("when", ["before", "after"])
def test_adapters_banked_directly_are_served_with_the_registered_ones(folders, sh, when):
    """``bank_adapters`` before the store was made (was: the store replaced the model's banks and forgot them) or
    after (was: the store did not know them: a 404). Served over HTTP with the folders, listed in /v1/models, unloaded
    through the endpoint; a direct bank under a name the store serves from a folder is refused."""
    root, _ = folders
    reference = _reference(["b0", "b1"], seed=3)
    folder_ids = _undisturbed(root)[0]
    model = _attached(seed=3)
    if when == "before":
        bank_adapters(model, ["b0", "b1"])
    store = AdapterStore(model, [root], max_loras=5)
    store.register_dir(root)
    if when == "after":
        assert bank_adapters(model).names == ["b0", "b1"]  # the attached ones: the store's registry
    with pytest.raises(AdapterConflictError, match="'a0' is served by the store"):
        load_adapters(model, {"a0": folders[1]["a1"]})
    assert store.names() == ["a0", "a1", "a2", "b0", "b1"] and set(store.resident) == {"b0", "b1"}
    with pytest.raises(AdapterConflictError, match="already loaded"):
        store.register("b0", folders[1]["a1"])
    # a direct bank, a server's load (store.loading) and unload (store.unloading) check and mark the name in one step
    # under the store's lock, each refusing the others while marked; a refusal marks nothing
    with pytest.raises(AdapterConflictError, match="'b0' is already loaded"):
        with store.loading("b0"):
            pass
    with store.loading("c0"):
        with pytest.raises(AdapterConflictError, match="'c0' is served by the store from a load in flight"):
            load_adapters(model, {"c0": folders[1]["a1"]})
    with store.unloading("b0"):
        with pytest.raises(AdapterConflictError, match="'b0' is being unloaded"):
            bank_adapters(model, ["b0"])
        with pytest.raises(AdapterConflictError, match="'b0' is already being unloaded"):
            with store.unloading("b0"):
                pass
    tok = tiny_llama_words()  # the served texts spell their token ids (was: no tokenizer, only counts checked)
    engine = Engine(model, tok, store=store, kv_cache_bytes=1 << 20, block_size=4)
    server = sh.LiveServer(create_app(engine, model_name="tiny"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny", "a0", "a1", "a2", "b0", "b1"]
        assert len({tuple(reference["b0"]), tuple(reference["b1"]), tuple(folder_ids)}) == 3
        for name, want in [("b0", reference["b0"]), ("b1", reference["b1"]), ("a0", folder_ids)]:
            r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == len(want)
            assert r.choices[0].text and r.choices[0].text == tok.decode(want, skip_special_tokens=True), name
            assert engine.generate([PROMPTS[0]], [name], PARAMS)[0].output_ids == want, name
        assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "b1"}, timeout=60).status_code \
            == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="b1", prompt=PROMPTS[0], max_tokens=2)
        assert [m.id for m in client.models.list()] == ["tiny", "a0", "a1", "a2", "b0"]
        assert "b1" not in registry_of(model)
    finally:
        server.stop()


def _banked_b0_running(root, seed: int):
    """A store over a model with 'b0' banked directly and one request on it running: (b0's reference tokens for
    PROMPTS[0], model, store, engine, request)."""
    reference = _reference(["b0"], seed=seed)
    model = _attached(seed=seed)
    store = AdapterStore(model, [root], max_loras=4)
    bank_adapters(model, ["b0"])
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4)
    req = engine.submit(PROMPTS[0], "b0", PARAMS)
    engine.step()
    return reference, model, store, engine, req


def test_unloading_a_directly_banked_adapter_in_use_waits(folders):
    reference, model, store, engine, req = _banked_b0_running(folders[0], seed=4)
    with pytest.raises(AdapterConflictError, match="in use by running requests"):
        bank_adapters(model, ["b0"])  # re-banking its weights under a running request
    store.unregister("b0")
    with pytest.raises(UnknownAdapterError):
        engine.submit(PROMPTS[0], "b0")
    while not req.done.is_set():
        engine.step()
    assert req.output_ids == reference["b0"] and "b0" not in registry_of(model) and not store._pins


def test_removing_a_directly_banked_adapter_in_use_is_refused(folders):
    """``registry.remove`` of an adapter banked directly is refused while running requests hold it, as for a folder
    adapter (its docstring, and evict). Was: it went through unregister, which returned and removed it later."""
    reference, model, store, engine, req = _banked_b0_running(folders[0], seed=5)
    with pytest.raises(AdapterConflictError, match="in use by 1 running request"):
        registry_of(model).remove("b0")
    assert "b0" in store.names()  # still served: refused means nothing changed
    while not req.done.is_set():
        engine.step()
    assert req.output_ids == reference["b0"]
    registry_of(model).remove("b0")  # idle: removed, and forgotten by the store (nothing to load it again from)
    assert "b0" not in registry_of(model) and "b0" not in store.names() and "b0" not in store.resident


def test_evicting_a_directly_banked_adapter_forgets_it(folders):
    """Was: ``store.evict`` dropped it from the banks but the store still listed it (names, resident, check): a
    request for it was accepted and then failed in the forward as an unknown adapter."""
    root, _ = folders
    model = _attached(seed=6)
    store = AdapterStore(model, [root], max_loras=4)
    bank_adapters(model, ["b0", "b1"])
    store.evict("b0")
    assert "b0" not in registry_of(model) and store.names() == ["b1"] and store.resident == ["b1"]
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4)
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'b0'"):
        engine.submit(PROMPTS[0], "b0")


def test_a_request_with_no_slot_beside_the_directly_banked_adapters_is_refused(folders):
    """Adapters banked directly are never evicted and hold their slots: with max_loras=2 and b0, b1 banked, a folder
    adapter can never be resident. Was: its request was accepted and waited forever (every step found no room)."""
    from lorakit.serving.engine import RequestError

    root, _ = folders
    model = _attached(seed=7)
    store = AdapterStore(model, [root], max_loras=2)
    store.register_dir(root)
    bank_adapters(model, ["b0", "b1"])
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4)
    with pytest.raises(RequestError, match=r"beside the 2 banked directly \(b0, b1: never evicted\).*max_loras=2"):
        engine.submit(PROMPTS[0], "a0", PARAMS)
    with pytest.raises(RequestError, match="beside the 1 banked directly"):
        engine.submit(PROMPTS[0], {"a0": 0.5, "b0": 0.5}, PARAMS)
    # the banked ones themselves are served; once one is unloaded, a folder adapter fits
    assert engine.generate([PROMPTS[0]], ["b1"], PARAMS)[0].finish_reason == "length"
    store.unregister("b1")
    assert engine.generate([PROMPTS[0]], [{"a0": 0.5, "b0": 0.5}], PARAMS)[0].finish_reason == "length"


def test_unloading_waits_for_the_queued_choices_of_a_running_request(folders):
    """n=4 choices on a0 in a batch of 2: two run, two wait in the queue for rows. Unloading a0 waits for all four
    (one request: the docs' "unloading waits for the requests holding the adapter"). Was: the queued choices held
    no pin, so a0 was evicted when the running two ended and the others failed as an unknown adapter."""
    root, _ = folders
    # equal lengths: the running two end together, so the queued two find no choice to fork from and load a0 again
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=30 + i, ignore_eos=True) for i in range(4)]

    def choices(unload: bool):
        store, engine = _store_engine(root, max_batch=2)
        reqs = engine.submit_choices(PROMPTS[0], "a0", params)
        for _ in range(2):
            engine.step()
        if unload:
            store.unregister("a0")
        while not all(r.done.is_set() for r in reqs):
            engine.step()
        return store, [(r.finish_reason, r.output_ids) for r in reqs]

    _, expected = choices(unload=False)
    store, got = choices(unload=True)
    assert got == expected and all(reason == "length" for reason, _ in got)
    assert "a0" not in store.resident and "a0" not in store.names() and not store._pins


def test_adapters_banked_directly_from_an_iterator_are_all_banked(folders):
    """``load_adapters(model, root.iterdir())`` (or ``bank_adapters`` with an iterator of names) on a model with a
    store: every adapter is banked and served. Was: the store's registry read the names from the iterator first,
    which left nothing for the load: nothing was banked and nothing said so."""
    root, dirs = folders
    model = tiny_llama()
    store = AdapterStore(model, [root], max_loras=4)
    registry = load_adapters(model, (dirs[n] for n in ("a0", "a1")))
    assert registry.names == ["a0", "a1"] and store.names() == ["a0", "a1"] == store.resident
    attached = _attached(seed=8)
    store = AdapterStore(attached, [root], max_loras=4)
    assert bank_adapters(attached, iter(["b0", "b1"])).names == ["b0", "b1"] == store.names()


def test_requests_that_need_no_new_slot_pass_one_waiting_for_a_slot(folders):
    """max_loras=3 with b0, b1 banked directly (never evicted: they hold two slots) leaves one slot for folder
    adapters, held by a long a0 request, so an a1 request waits for it. A b0 request behind a1 needs no slot and
    cannot delay it (b0 is never evicted, so no slot a1 could take is held longer): it starts at once. Was: it
    waited behind a1 with a batch row idle, as requests for other folder adapters must. Tokens equal each request
    run alone."""
    root, _ = folders
    model = _attached(seed=7)
    store = AdapterStore(model, [root], max_loras=3)
    store.register_dir(root)
    bank_adapters(model, ["b0", "b1"])
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4, max_batch=4)
    jobs = [("a0", 10), ("a1", 3), ("b0", 3), ("a2", 3), ({"b1": 0.5, "b0": 0.5}, 2)]
    reqs = [engine.submit(PROMPTS[0], spec, SamplingParams(max_tokens=m, ignore_eos=True)) for spec, m in jobs]
    started, steps = {}, 0
    while not all(r.done.is_set() for r in reqs):
        engine.step()
        steps += 1
        started.update({i: steps for i, r in enumerate(reqs) if r.output_ids and i not in started})
    assert started[0] == started[2] == started[4] == 1  # a0 and both banked-adapter requests at once
    assert started[1] == 11 and started[3] > started[1]  # a1 once a0 let go of the slot; a2 (a folder) after it
    alone = [engine.generate([PROMPTS[0]], [spec], SamplingParams(max_tokens=m, ignore_eos=True))[0].output_ids
             for spec, m in jobs]
    assert [r.output_ids for r in reqs] == alone
    assert engine.cache.used_blocks == 0 and not store._pins
