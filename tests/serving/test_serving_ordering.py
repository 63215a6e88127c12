"""Ordering between the engine's threads: an abort, a shutdown, a store close or an unload that comes while other work
is in flight takes effect as if it had come in order. Every race is forced at one point (a call holding the engine
thread, a hook on the inbox, a lock or a file read), so each test is deterministic: no outcome depends on how long
anything takes (a shutdown's join times out because the loop is held, not because it is slow)."""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading

import pytest
import torch

from lk_models import tiny_llama
from lorakit.serving import generate as bank_generate
from lorakit.serving import load_adapters
from lorakit.serving.engine import Engine, EngineStopError, EngineThreadError
from lorakit.serving.sampling import SamplingParams
from lorakit.serving.store import AdapterStore

EOS = 2  # LlamaConfig's default eos_token_id (tiny_llama)


def _reference(dirs, prompt, spec, max_tokens):
    """HF ``generate`` (greedy, its own KV cache) on a fresh model with ``dirs`` banked, ``spec`` routed; cut after
    EOS."""
    model = tiny_llama()
    load_adapters(model, dirs)
    out = bank_generate(model, torch.tensor([prompt]), [spec], max_new_tokens=max_tokens, do_sample=False)
    ref = out[0, len(prompt):].tolist()
    return ref[: ref.index(EOS) + 1] if EOS in ref else ref


class _Holder:
    """An ``Engine.call`` that holds the engine thread until ``release()``: the loop is busy, what is submitted
    meanwhile stays in the inbox, and a shutdown's join times out."""

    def __init__(self, engine: Engine, pool: cf.ThreadPoolExecutor):
        self.held, self.gate = threading.Event(), threading.Event()
        self.result = pool.submit(engine.call, self._hold)

    def wait_held(self):
        assert self.held.wait(30), "the engine thread never took the call"

    def _hold(self):
        self.held.set()
        return self.gate.wait(60)

    def release(self):
        self.gate.set()
        assert self.result.result(60) is True


def test_an_abort_posted_while_a_timed_out_shutdown_cancels_calls_reaches_its_request():
    """A request queued behind a busy engine thread, then a shutdown whose join times out, and the request's abort
    posted while that shutdown cancels the queued calls: the request ends "abort" without a token, on the loop that
    was busy and on a restarted one alike. Was: the shutdown took every item out of the inbox and put the requests
    and aborts back, so an abort posted in between landed before its request, found nothing to abort, and the
    request ran to its end (one token on the old loop, the rest on the restarted one). The race is forced by posting
    the abort from inside the inbox's ``put`` when the shutdown puts a request back; a shutdown that puts nothing back
    opens no such window, and the abort is posted as soon as it returns."""
    engine = Engine(tiny_llama(), kv_cache_bytes=1 << 20, block_size=4)
    put_back, req, stopping = [], None, threading.Event()

    class AbortBeforePutBack(queue.SimpleQueue):
        def put(self, item, *args, **kwargs):
            if item[0] == "submit" and stopping.is_set():  # during the shutdown only it puts a request
                put_back.append(item[1].request_id)
                if len(put_back) == 1:
                    engine.abort(req.request_id)  # another client's abort, landing in the shutdown's window
            super().put(item, *args, **kwargs)

    engine._inbox = AbortBeforePutBack()
    engine.start()
    with cf.ThreadPoolExecutor(1) as pool:
        holder = _Holder(engine, pool)
        holder.wait_held()
        req = engine.submit([4, 5, 6], None, SamplingParams(max_tokens=6, ignore_eos=True))
        try:
            stopping.set()
            with pytest.raises(EngineStopError, match="did not stop"):
                engine.shutdown(timeout=0.05)  # the loop is held: the join times out and the calls are cancelled
            stopping.clear()
            if not put_back:
                engine.abort(req.request_id)
        finally:
            holder.release()
    engine.shutdown()  # the held loop's step ends; the loop stops
    engine.start()
    try:
        assert req.done.wait(60)
    finally:
        engine.shutdown()
    assert req.finish_reason == "abort" and req.output_ids == [] and req.error is None
    assert put_back == []  # a shutdown leaves requests and aborts where they are, in their order
    assert engine.cache.used_blocks == 0 and not engine.requests and not engine.waiting


def test_closing_the_store_after_a_timed_out_shutdown_leaves_the_running_loop_serving(ranked_adapters):
    """``store.close()`` after a shutdown whose join timed out (``lorakit serve``'s lifespan does exactly that: it
    logs the EngineStopError and closes the store) while the loop is still in a step: the rest of that step runs on a
    closed store. Its requests go on: the one running is not failed, and after a restart both finish with the tokens
    HF ``generate`` gives. Was: the step's prefetch for the queued request submitted to the closed prefetch pool,
    RuntimeError ("cannot schedule new futures after shutdown") escaped the step, and the loop failed every running
    request with it. After ``close`` adapters are read from disk when first needed, as without prefetching."""
    root, dirs = ranked_adapters
    model = tiny_llama()
    store = AdapterStore(model, [root], max_loras=2)
    store.register_dir(root)
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4, max_batch=1)
    calls = threading.Event()

    class Inbox(queue.SimpleQueue):
        def put(self, item, *args, **kwargs):
            super().put(item, *args, **kwargs)
            if item[0] == "call":
                calls.set()

    engine._inbox = Inbox()
    engine.start()
    first_token, go_on = threading.Event(), threading.Event()

    def on_first(event):  # the engine thread, at the first request's first token
        if not first_token.is_set():
            first_token.set()
            assert go_on.wait(60)
    first = engine.submit([4, 5, 6], "a0", SamplingParams(max_tokens=8, ignore_eos=True), on_event=on_first)
    with cf.ThreadPoolExecutor(1) as pool:
        try:
            assert first_token.wait(60)  # running, with 7 tokens to go: it holds the one row for the next steps
            # queued for the next step: a request for another adapter (no row for it: it waits, and the step
            # prefetches its adapter), then a call that holds the engine thread before that prefetch
            second = engine.submit([7, 8], "a1", SamplingParams(max_tokens=5, ignore_eos=True))
            holder = _Holder(engine, pool)
            assert calls.wait(30)
        finally:
            go_on.set()
        holder.wait_held()
        try:
            with pytest.raises(EngineStopError, match="did not stop"):
                engine.shutdown(timeout=0.05)
            store.close()
        finally:
            holder.release()
    engine.shutdown()  # the held step has run to its end on the closed store
    assert first.status == "running" and first.error is None, first.error
    store.prefetch(["a2", "a3"])  # a closed store reads nothing in the background
    assert not store._pending and not {"a2", "a3"} & set(store._host)
    engine.start()
    try:
        assert first.done.wait(60) and second.done.wait(60)
    finally:
        engine.shutdown()
    assert first.finish_reason == "length" and first.output_ids == _reference(dirs, [4, 5, 6], "a0", 8)
    assert second.finish_reason == "length" and second.output_ids == _reference(dirs, [7, 8], "a1", 5)
    assert engine.cache.used_blocks == 0 and not store._pins


def _hold_the_first_background_read(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """(read, go): the store's first read of a weights file on its prefetch thread sets ``read`` once the file is read
    and then waits for ``go`` before handing the tensors back to be cached (the real read, held at that point)."""
    import lorakit.serving.store as store_module

    read, go = threading.Event(), threading.Event()
    load_tensors = store_module.load_tensors

    def held_after_reading(path):
        tensors = load_tensors(path)
        if threading.current_thread().name.startswith("lorakit-prefetch") and not read.is_set():
            read.set()
            assert go.wait(60)
        return tensors
    monkeypatch.setattr(store_module, "load_tensors", held_after_reading)
    return read, go


def test_a_prefetch_that_ends_after_its_adapter_is_unloaded_and_loaded_again_caches_nothing(ranked_adapters,
                                                                                          monkeypatch):
    """A background read of adapter ``x``'s weights (a prefetch for a queued request) still in progress while ``x`` is
    unloaded and loaded again from another folder: the read, ending last, must not land in the host cache under the
    new ``x``; requests for ``x`` get the new folder's weights (the tokens HF ``generate`` gives with them). Was: the
    read stored the old folder's tensors as ``x``'s and the next load into the banks took them from there: with equal
    ranks the old adapter answered, here (ranks 5 and 8) the load failed on the shapes and the good new folder was
    unregistered and recorded as broken. The race is forced by holding the prefetch thread between its file read and
    its store into the cache."""
    root, dirs = ranked_adapters
    read, go = _hold_the_first_background_read(monkeypatch)
    model = tiny_llama()
    store = AdapterStore(model, [root], max_loras=2)
    store.register("x", dirs["a1"])
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4)  # not started: forwards run here
    store.prefetch(["x"])
    reading = store._pending["x"]
    try:
        assert read.wait(30)  # a1's tensors are read, not yet cached
        store.unregister("x")  # (on the thread that runs forwards, as the store asks)
        store.register("x", dirs["a2"])
    finally:
        go.set()
    reading.result(30)
    prompt, params = [4, 5, 6], SamplingParams(max_tokens=6, ignore_eos=True)
    expected = _reference({"x": dirs["a2"]}, prompt, "x", 6)
    assert expected != _reference({"x": dirs["a1"]}, prompt, "x", 6)  # the two folders answer differently
    [req] = engine.generate([prompt], ["x"], params)
    assert req.error is None and req.output_ids == expected
    store.close()


def _loops() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lorakit-engine" and t.is_alive()]


def _serves(engine: Engine) -> None:
    """One base-model request through ``engine``'s loop, with HF ``generate``'s greedy tokens."""
    [req] = engine.generate([[4, 5, 6]], [None], SamplingParams(max_tokens=3, ignore_eos=True))
    assert req.error is None and req.output_ids == _reference({}, [4, 5, 6], None, 3)


def test_a_loop_started_as_a_shutdown_ends_is_kept_and_stopped_by_the_next_shutdown():
    """A ``start()`` that lands after a shutdown's join has returned, before the shutdown's bookkeeping: the new loop
    is the engine's (``start`` again is a no-op, the next ``shutdown`` stops it). Was: the shutdown then forgot the
    thread it found there, so the new loop ran unknown to the engine, ``start`` ran a second loop beside it over the
    same requests and KV cache, and no shutdown could stop the first. Forced by starting inside the old loop's
    ``join``."""
    engine = Engine(tiny_llama(), kv_cache_bytes=1 << 20, block_size=4).start()
    old = engine._thread
    join, started = old.join, []

    def join_then_start(timeout=None):
        join(timeout)
        if not started:
            started.append(engine.start()._thread)  # another thread's start, landing as the join returns
    old.join = join_then_start
    try:
        engine.shutdown()
        [new] = started
        assert new is not old and engine._thread is new and _loops() == [new]
        assert engine.start()._thread is new and _loops() == [new]
        _serves(engine)
    finally:
        engine.shutdown()
    assert _loops() == [] and engine._thread is None


def test_a_start_that_lands_inside_a_shutdown_runs_on_with_the_calls_posted_to_it():
    """``shutdown()`` on an engine with no loop and a ``start()`` landing while it runs (after it has looked for a
    loop to stop), with a call the new loop is running and one posted behind it: the shutdown returns, both calls run
    on the new loop and it serves. Was: the start cleared the stop flag the shutdown had just set, the shutdown then
    found the new loop and waited its whole timeout for a loop nobody had told to stop, raised EngineStopError, and
    cancelled the call waiting for that loop (EngineBusyError: "the engine shut down"). Forced by starting inside the
    shutdown's wake-up of the loop."""
    engine = Engine(tiny_llama(), kv_cache_bytes=1 << 20, block_size=4)
    started, posted, ran = [], threading.Semaphore(0), []

    class Inbox(queue.SimpleQueue):
        def put(self, item, *args, **kwargs):
            super().put(item, *args, **kwargs)
            if item[0] == "call":
                posted.release()

    class StartOnWake(threading.Event):
        def set(self):
            if not started and threading.current_thread() is threading.main_thread():
                # another thread's start, landing inside the shutdown, and calls other threads post to its loop
                started.append(engine.start()._thread)
                holder = _Holder(engine, pool)
                assert posted.acquire(timeout=30)
                holder.wait_held()
                started.append(holder)
                started.append(pool.submit(engine.call, lambda: ran.append("behind") or 7))
                assert posted.acquire(timeout=30)  # queued behind the held call
            super().set()

    engine._inbox, engine._wake = Inbox(), StartOnWake()
    with cf.ThreadPoolExecutor(2) as pool:
        try:
            engine.shutdown(timeout=5)  # (on the old code: EngineStopError after these 5 s)
            new, holder, behind = started
            holder.release()
            assert behind.result(60) == 7 and ran == ["behind"]
            assert engine._thread is new and _loops() == [new]
            _serves(engine)
        finally:
            if len(started) > 1:
                started[1].gate.set()
            engine.shutdown()
    assert _loops() == [] and engine._thread is None


def test_threads_that_step_an_engine_without_a_loop_take_turns():
    """``Engine.generate`` on an engine whose loop is not running steps it on the caller's thread; two callers at once
    (e.g. Self-MoA request threads still waiting when a server's loop has been shut down) take turns, one step at a
    time, and each gets HF ``generate``'s tokens. Was: both stepped the same running batch and KV cache at once, so
    the second ran a forward over rows the first was in the middle of. Forced by holding the first caller inside its
    first forward until the second has got either to a forward of its own or to waiting for its turn (seen on the
    engine's step lock)."""
    model = tiny_llama()
    engine = Engine(model, kv_cache_bytes=1 << 20, block_size=4)
    paused, go, second_there = threading.Event(), threading.Event(), threading.Event()
    first_thread, overlaps = [], []

    def hook(module, args):
        me = threading.current_thread()
        if not first_thread:
            first_thread.append(me)
            paused.set()
            assert go.wait(60)
        elif me is not first_thread[0] and not go.is_set():
            overlaps.append(me.name)  # a forward while the first caller's step is still in its own
            second_there.set()

    class ObservedLock:  # the engine's step lock, telling when a thread has to wait for it
        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            if not self.lock.acquire(blocking=False):
                second_there.set()
                self.lock.acquire()
            return self

        def __exit__(self, *exc):
            self.lock.release()

    engine._stepping = ObservedLock(engine._stepping)
    handle = model.register_forward_pre_hook(hook)
    prompts, out = [[4, 5, 6], [7, 8, 9, 10]], {}
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    def generate(i):
        out[i] = engine.generate([prompts[i]], [None], params)[0]
    threads = [threading.Thread(target=generate, args=(i,), daemon=True) for i in range(2)]
    try:
        threads[0].start()
        assert paused.wait(30)
        threads[1].start()
        assert second_there.wait(30)
    finally:
        go.set()
        handle.remove()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert overlaps == []
    for i, p in enumerate(prompts):
        assert out[i].error is None and out[i].output_ids == _reference({}, p, None, 4)
    assert engine.stats["finished"] == 2 and engine.cache.used_blocks == 0 and not engine.running


def test_over_http_an_adapter_loaded_again_while_a_prefetch_of_its_old_folder_ends_answers_from_its_new_one(
        tmp_path, sh, monkeypatch):
    """The same race through ``lorakit serve``'s app and the ``openai`` client: a background read of adapter ``x``
    (the read the engine starts for a queued request; started here by the test) is still in progress while
    ``/v1/unload_lora_adapter`` and ``/v1/load_lora_adapter`` serve ``x`` from another folder. Once ``x`` has been
    evicted (``max_loras=1``: a request for another adapter) and is loaded into the banks again, a completion on
    ``x`` answers with the new folder's weights, as offline ``generate`` with them does. Was: the read cached the old
    folder's tensors under ``x``, that load took them, failed on the ranks (4 saved, 8 configured), and ``x`` was
    unregistered as broken: a 400 telling the user to fix a folder that is fine."""
    openai = pytest.importorskip("openai")
    import httpx

    from lorakit.hub import load_model_and_tokenizer
    from lorakit.serving.server import create_app

    def bundled():
        return load_model_and_tokenizer()[0]
    targets = ["q_proj", "v_proj", "down_proj"]
    root = tmp_path / "adapters"
    old = sh.make_adapter(root / "x", seed=51, factory=bundled, r=4, target_modules=targets)
    new = sh.make_adapter(root / "x-new", seed=52, factory=bundled, r=8, target_modules=targets)
    sh.make_adapter(root / "other", seed=53, factory=bundled, r=4, target_modules=targets)
    read, go = _hold_the_first_background_read(monkeypatch)
    model, tok = load_model_and_tokenizer()
    store = AdapterStore(model, [root], max_loras=1)
    store.register_dir(root)
    engine = Engine(model, tok, store=store, kv_cache_bytes=4 << 20, max_batch=4)
    server = sh.LiveServer(create_app(engine, model_name="bundled"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    try:
        store.prefetch(["x"])
        reading = store._pending["x"]
        try:
            assert read.wait(30)  # the old folder's tensors are read, not yet cached
            for path, body in [("/v1/unload_lora_adapter", {"lora_name": "x"}),
                               ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(new)})]:
                r = httpx.post(server.url + path, json=body, timeout=60)
                assert r.status_code == 200, r.text
        finally:
            go.set()
        reading.result(30)
        complete = lambda name: client.completions.create(model=name, prompt="The quick brown fox", max_tokens=6,
                                                          temperature=0)
        complete("other")  # evicts x (one resident slot)
        answer = complete("x")
    finally:
        server.stop()
    reference = bundled()
    load_adapters(reference, {"x": new})
    prompt = tok("The quick brown fox")["input_ids"]
    out = bank_generate(reference, torch.tensor([prompt]), ["x"], max_new_tokens=6, do_sample=False)[0, len(prompt):]
    ids = out.tolist()
    ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
    assert answer.choices[0].text == tok.decode(ids, skip_special_tokens=True)
    assert store.paths["x"] == new.resolve() and "x" not in store.failed and old.is_dir()


def test_a_call_from_inside_a_step_runs_there_when_a_loop_starts_meanwhile():
    """A thread stepping an engine without a loop, whose step runs a listener (``on_event``) that calls
    ``Engine.call``, while a ``start()`` has landed: the call runs at once on that thread (it already has the step's
    turn, as the loop's own calls do). Was: the call saw the new loop running, posted itself to it and waited, while
    the loop waited for the step lock that thread held: neither ever went on. Forced by starting the loop inside the
    listener, before its call."""
    engine = Engine(tiny_llama(), kv_cache_bytes=1 << 20, block_size=4)
    answers, failures = [], []

    def on_event(event):
        if not answers:
            engine.start()  # another thread's start, landing inside this thread's step
            answers.append(engine.call(lambda: 42))

    def step_until_done():
        try:
            req = engine.submit([4, 5, 6], None, SamplingParams(max_tokens=3, ignore_eos=True), on_event=on_event)
            while not req.done.is_set() and not engine._looping():
                engine.step()
            assert req.done.wait(60)
            answers.append(req.output_ids)
        except BaseException as e:  # noqa: BLE001  (reported on the test's thread)
            failures.append(e)

    stepper = threading.Thread(target=step_until_done, daemon=True)
    stepper.start()
    stepper.join(60)
    try:
        assert not stepper.is_alive(), "the call inside the step waited for a loop that waited for that step"
        assert failures == [] and answers == [42, _reference({}, [4, 5, 6], None, 3)]
        _serves(engine)
    finally:
        try:
            engine.shutdown(timeout=5)
        except EngineStopError:
            pass  # (the old code: the loop still waits for the step lock the stuck thread holds)


@pytest.mark.parametrize("looping", [True, False], ids=["loop", "stepping_thread"])
@pytest.mark.parametrize("what", ["generate", "generate_choices", "shutdown"])
def test_blocking_engine_methods_called_from_inside_a_step_raise_at_once(looping, what):
    """``generate`` / ``generate_choices`` / ``shutdown`` from an ``on_event`` listener, i.e. from inside one of the
    engine's steps (the loop thread, or a thread stepping without a loop): EngineThreadError at once, nothing queued
    or stopped, and the engine serves on. Was: with the loop, ``generate`` waited forever for steps that only the
    waiting thread could run, and ``shutdown`` failed joining its own thread ("cannot join current thread") after
    telling the loop to stop; without one, ``generate`` ran a step inside the step. The outer request's end is the
    gate: it ends only once the listener has returned."""
    engine = Engine(tiny_llama(), kv_cache_bytes=1 << 20, block_size=4)
    seen: list[BaseException | None] = []
    inner = {"generate": lambda: engine.generate([[7, 8]], params=SamplingParams(max_tokens=2)),
             "generate_choices": lambda: engine.generate_choices([7, 8], None, [SamplingParams(max_tokens=2)] * 2),
             "shutdown": lambda: engine.shutdown(timeout=5)}[what]

    def on_event(event):
        if not seen:
            try:
                inner()
                seen.append(None)
            except BaseException as e:  # noqa: BLE001  (asserted on the test's thread)
                seen.append(e)

    if looping:
        engine.start()
    try:
        req = engine.submit([4, 5, 6], None, SamplingParams(max_tokens=3, ignore_eos=True), on_event=on_event)
        if not looping:  # a thread of its own steps it (generate's wait without a loop)
            threading.Thread(target=engine._wait, args=([req], None), daemon=True).start()
        assert req.done.wait(60), f"{what}() inside a step never returned"
        assert len(seen) == 1 and isinstance(seen[0], EngineThreadError), seen
        assert what in str(seen[0]) and "inside an engine step" in str(seen[0])
        assert req.finish_reason == "length" and req.output_ids == _reference({}, [4, 5, 6], None, 3)
        assert not engine.waiting and not engine.running and engine.cache.used_blocks == 0  # nothing queued
        assert engine._looping() == looping  # shutdown refused: the loop runs on
        _serves(engine)
    finally:
        engine.shutdown(timeout=5)
