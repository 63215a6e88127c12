"""The n choices of one prompt (``Engine.submit_choices``: one prefill, the others fork its refcounted KV blocks) under
pressure: a cache so small that forked choices are preempted and recomputed, aborts of one choice or of all at any
step, choices finishing at different steps, prompts of one token or exactly k blocks, n up to and beyond
``max_batch``, the static (CUDA-graph) decode step, weighted mixes, attached mixtures (MixLoRA, X-LoRA). Reference
values come from the unshared path: each choice submitted as a request of its own, which prefills the prompt
itself. After every step each block's reference count equals the number of running rows whose table holds it, and
when all requests are done no block is held."""

from __future__ import annotations

import random
import time

import pytest
import torch

import lorakit as lk
from lk_models import save_random_adapter, tiny_llama, tiny_llama_words
from lorakit.methods.mixlora import MixLoraConfig
from lorakit.methods.xlora import XLoraConfig
from lorakit.serving import load_adapters
from lorakit.serving.engine import Engine
from lorakit.serving.sampling import SamplingParams
from lorakit.serving.store import AdapterStore

SPECS = ["a0", "a2", None, {"a1": 0.6, "a3": 0.4}]


@pytest.fixture(scope="module")
def banked(ranked_adapters):
    _, dirs = ranked_adapters
    model = tiny_llama()
    load_adapters(model, dirs)
    return model


def _check_refcounts(engine):
    """Each block's count is the number of running rows holding it; the free list is exactly the unheld blocks."""
    holders = [0] * engine.cache.num_blocks
    for r in engine.running:
        for b in r.blocks:
            holders[b] += 1
    assert [engine.cache.ref_count(b) for b in range(engine.cache.num_blocks)] == holders
    assert engine.cache.used_blocks == sum(h > 0 for h in holders)


def _drive(engine, reqs, on_step=None, limit=3000):
    steps = 0
    while not all(r.done.is_set() for r in reqs):
        if on_step is not None:
            on_step(steps)
        engine.step()
        _check_refcounts(engine)
        steps += 1
        assert steps < limit, "the engine stopped making progress"
    return reqs


def _alone(model, prompt, spec, params, store=None, tokenizer=None):
    """The unshared path: each choice a request of its own in a roomy engine (each prefills the prompt)."""
    engine = Engine(model, tokenizer, store=store, kv_cache_bytes=8 << 20, block_size=4, max_batch=8)
    reqs = _drive(engine, [engine.submit(prompt, spec, p) for p in params])
    assert engine.stats["forked"] == 0
    return reqs


def _idle(engine):
    assert engine.cache.used_blocks == 0 and not engine.running and not engine.waiting and not engine.requests


@pytest.mark.parametrize("trial", range(4))
def test_choices_under_preemption_aborts_and_cache_pressure(banked, sh, trial):
    """Several n-choice prompts at once in a cache of 6..10 blocks and a batch of 2..6 rows (forks preempted and
    recomputed, choices that cannot fork prefilling alone), random aborts of single choices while they wait, run or
    are forked, choices with different max_tokens and EOS on or off; even trials on the static decode step. Every
    choice not aborted gives the tokens of its request alone; refcounts match holders after every step; no block
    is left held."""
    rng = random.Random(trial)
    blocks, max_batch = rng.choice([6, 8, 10]), rng.choice([2, 4, 6])
    engine = Engine(banked, kv_cache_bytes=sh.kv_budget(banked, blocks), block_size=4, max_batch=max_batch,
                    cuda_graphs=trial % 2 == 0)
    groups = []
    for g in range(4):
        prompt = [rng.randint(3, 95) for _ in range(rng.choice([1, 3, 4, 5, 8]))]
        top = min(8, blocks * 4 - len(prompt))
        params = [SamplingParams(max_tokens=max(1, top - rng.randint(0, 3)), temperature=1.0, top_k=30,
                                 seed=1000 * trial + 10 * g + i, ignore_eos=rng.random() < 0.7)
                  for i in range(rng.randint(1, max_batch + 1))]
        spec = SPECS[g]
        groups.append((prompt, spec, params, engine.submit_choices(prompt, spec, params)))
    reqs = [r for *_, rs in groups for r in rs]
    aborted: set[str] = set()

    def maybe_abort(step):
        if rng.random() < 0.15:
            r = rng.choice(reqs)
            if not r.done.is_set():
                aborted.add(r.request_id)
            engine.abort(r.request_id)

    _drive(engine, reqs, maybe_abort)
    _idle(engine)
    assert engine.stats["forked"] > 0
    for prompt, spec, params, got in groups:
        for r, alone in zip(got, _alone(banked, prompt, spec, params)):
            if r.request_id in aborted and r.finish_reason == "abort":
                continue
            assert (r.output_ids, r.finish_reason) == (alone.output_ids, alone.finish_reason), (trial, r.request_id)


@pytest.mark.parametrize("prompt_len", [1, 4, 8])  # one token; exactly one and two blocks of 4 (nothing to copy)
@pytest.mark.parametrize("static", [False, True])
def test_choices_of_one_token_or_whole_block_prompts(banked, sh, prompt_len, static):
    """A prompt of 1 token, or one that fills exactly k blocks (the fork copies nothing; every choice takes a fresh
    block for its first decoded token), with n = max_batch: one prefill of the prompt (counted as prefill tokens,
    also for the 1-token prompt: was counted as a decode token), n - 1 forks, the tokens of n requests alone."""
    prompt = list(range(7, 7 + prompt_len))
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=40 + i, ignore_eos=True) for i in range(4)]
    engine = Engine(banked, kv_cache_bytes=sh.kv_budget(banked, 16), block_size=4, max_batch=4, cuda_graphs=static)
    got = engine.submit_choices(prompt, "a1", params)
    engine.step()
    full = prompt_len // 4
    assert engine.stats["forked"] == 3 and engine.stats["prefill_tokens"] == prompt_len
    if prompt_len % 4 == 0:  # the prompt's blocks are shared by all four, no copy taken
        assert all(engine.cache.ref_count(b) == 4 for b in got[0].blocks[:full])
    _drive(engine, got)
    _idle(engine)
    assert [r.output_ids for r in got] == [r.output_ids for r in _alone(banked, prompt, "a1", params)]


def test_more_choices_than_rows(banked, sh):
    """n = max_batch + 2 (the server allows it too, up to ServerLimits.max_n): the choices the batch has no room
    for wait first in the queue; here the first three end together, so no choice holding the prompt runs when rows
    free: the fourth prefills it again and the fifth forks from it. All give the tokens of requests alone."""
    prompt = list(range(11, 17))
    params = [SamplingParams(max_tokens=5, temperature=1.0, seed=60 + i, ignore_eos=True) for i in range(5)]
    engine = Engine(banked, kv_cache_bytes=sh.kv_budget(banked, 32), block_size=4, max_batch=3)
    got = _drive(engine, engine.submit_choices(prompt, None, params))
    _idle(engine)
    assert engine.stats["forked"] == 3 and engine.stats["prefill_tokens"] == 2 * len(prompt)
    assert [r.output_ids for r in got] == [r.output_ids for r in _alone(banked, prompt, None, params)]


def test_aborting_every_choice_at_each_step(banked, sh):
    """All n choices aborted together before admission, after admission (prefill pending), right after the fork and
    mid-decode under preemption: no block stays held and the engine takes the next request."""
    prompt = list(range(20, 27))
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=i, ignore_eos=True) for i in range(4)]
    engine = Engine(banked, kv_cache_bytes=sh.kv_budget(banked, 6), block_size=4, max_batch=4)
    for steps in range(6):
        got = engine.submit_choices(prompt, "a3", params)
        for _ in range(steps):
            engine.step()
            _check_refcounts(engine)
        for r in got:
            engine.abort(r.request_id)
        _drive(engine, got)
        _idle(engine)
    assert engine.stats["preemptions"] > 0
    again = _drive(engine, engine.submit_choices(prompt, "a3", params))
    assert [r.output_ids for r in again] == [r.output_ids for r in _alone(banked, prompt, "a3", params)]


def test_choices_whose_logits_are_not_finite_fail_alone(banked, sh):
    """A weighted mix with weights that overflow the logits: the first choice fails at its prefill, so the others go
    on alone and fail the same way; a request beside them is unaffected; no block is left held."""
    engine = Engine(banked, kv_cache_bytes=sh.kv_budget(banked, 32), block_size=4, max_batch=8)
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=i) for i in range(3)]
    bad = engine.submit_choices([5, 6, 7], {"a0": 3e38, "a1": 3e38}, params)
    good = engine.submit([5, 6, 7], "a0", SamplingParams(max_tokens=4, ignore_eos=True))
    _drive(engine, [*bad, good])
    assert [r.finish_reason for r in bad] == ["error"] * 3 and all("not finite" in r.error for r in bad)
    assert good.finish_reason == "length" and good.output_ids == _alone(banked, [5, 6, 7], "a0", [good.params])[0] \
        .output_ids
    _idle(engine)


@pytest.mark.parametrize("method", ["mixlora", "xlora"])
def test_choices_on_an_attached_mixture(tmp_path, sh, method):
    """n choices on an adapter served attached (its own forward): MixLoRA forks the prompt's blocks; X-LoRA, whose
    scaling pass recomputes the whole sequence every step, cannot share a prefill, so each choice prefills alone.
    Either way the tokens equal requests alone, with a small cache that preempts, and no block stays held."""
    config = MixLoraConfig(r=4, num_experts=4, top_k=2) if method == "mixlora" else \
        XLoraConfig(num_experts=3, expert_r=[4, 4, 4])
    save_random_adapter(tmp_path / method, config, seed=5)
    model = tiny_llama()
    store = AdapterStore(model, [tmp_path], max_loras=2)
    store.register_dir(tmp_path)
    prompt = list(range(30, 37))
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=80 + i, ignore_eos=True) for i in range(3)]
    alone = [r.output_ids for r in _alone(model, prompt, method, params, store=store)]
    for blocks in (32, 6):
        engine = Engine(model, store=store, kv_cache_bytes=sh.kv_budget(model, blocks), block_size=4, max_batch=4)
        got = _drive(engine, engine.submit_choices(prompt, method, params))
        assert [r.output_ids for r in got] == alone, blocks
        assert engine.stats["forked"] == (0 if method == "xlora" else 2) or blocks == 6
        _idle(engine)
    assert not store._pins  # every pin taken by a choice (forked or alone) was given back


def test_choices_with_stop_strings_finish_at_their_own_step():
    """Seeded choices on the bundled model (its tokenizer) with a stop string: each choice stops (or runs to
    max_tokens) where the same request alone does, with the same text, while the others go on decoding."""
    from lorakit.hub import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer()
    params = [SamplingParams(max_tokens=14, temperature=1.0, seed=5 + i, ignore_eos=True) for i in range(5)]
    free = _alone(model, "The cat", None, params, tokenizer=tok)
    stop = next(c for c in " eatoin" if sum(c in r.text for r in free) in (2, 3, 4))
    params = [SamplingParams(max_tokens=14, temperature=1.0, seed=5 + i, ignore_eos=True, stop=(stop,))
              for i in range(5)]
    alone = _alone(model, "The cat", None, params, tokenizer=tok)
    engine = Engine(model, tok, kv_cache_bytes=8 << 20, block_size=4, max_batch=8)
    got = _drive(engine, engine.submit_choices("The cat", None, params))
    assert [(r.text, r.finish_reason, len(r.output_ids)) for r in got] == \
        [(r.text, r.finish_reason, len(r.output_ids)) for r in alone]
    assert {r.finish_reason for r in got} == {"stop", "length"} and engine.stats["forked"] == 4
    _idle(engine)


def test_server_n_choices_with_clients_hanging_up_under_cache_pressure(ranked_adapters, sh):
    """A real server over a 12-block cache (preempting) takes 12 concurrent n=3 seeded requests (the real openai
    client; token-id prompts) of which a third hang up mid-stream and a third time out before their answer: every
    block comes back, nothing stays queued, and each request that was answered gives, choice by choice, the text of an
    n=1 request with seed + i (the unshared path) sent afterwards. The engine has :func:`tiny_llama_words`' tokenizer,
    so the compared texts spell the generated token ids (was: no tokenizer, every text '' and the check vacuous)."""
    import concurrent.futures as cf

    import httpx
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from lorakit.serving.server import create_app

    root, _ = ranked_adapters
    model = tiny_llama()
    store = AdapterStore(model, [root], max_loras=2)
    store.register_dir(root)
    engine = Engine(model, tiny_llama_words(), store=store, kv_cache_bytes=sh.kv_budget(model, 12), block_size=4,
                    max_batch=6)
    server = sh.LiveServer(create_app(engine, model_name="tiny"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    rng = random.Random(0)
    jobs = [dict(prompt=[rng.randint(3, 95) for _ in range(rng.choice([1, 4, 6]))], seed=100 + 10 * j,
                 model=SPECS[j % 2] or "tiny", way=("hang_up", "time_out", "answer")[j % 3]) for j in range(12)]

    def ask(job):
        kw = dict(model=job["model"], prompt=job["prompt"], max_tokens=10, temperature=1.0, seed=job["seed"],
                  extra_body={"ignore_eos": True})
        if job["way"] == "hang_up":
            with httpx.stream("POST", server.url + "/v1/completions", json={**kw.pop("extra_body"), **kw, "n": 3,
                                                                             "stream": True}, timeout=30) as r:
                next(r.iter_lines())
            return None
        if job["way"] == "time_out":
            with pytest.raises(openai.APITimeoutError):
                client.with_options(timeout=0.05).completions.create(n=3, **kw)
            return None
        return [c.text for c in sorted(client.completions.create(n=3, **kw).choices, key=lambda c: c.index)]

    try:
        with cf.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, jobs))
        deadline = time.time() + 30
        while engine.num_running or engine.num_waiting or engine.cache.used_blocks:
            assert time.time() < deadline, (engine.num_running, engine.num_waiting, engine.cache.used_blocks)
            time.sleep(0.05)
        assert engine.stats["forked"] > 0
        assert sum(got is not None for got in answers) == 4
        for job, got in zip(jobs, answers):
            if got is None:
                continue
            assert all(got) and len(set(got)) == 3, got  # 10 sampled words each; distinct seeds, distinct texts
            alone = [client.completions.create(model=job["model"], prompt=job["prompt"], max_tokens=10,
                                               temperature=1.0, seed=job["seed"] + i,
                                               extra_body={"ignore_eos": True}).choices[0].text for i in range(3)]
            assert got == alone, job
    finally:
        server.stop()
    _idle(engine)


def _prompt_tokens_metric(url) -> float:
    import httpx

    line = next(x for x in httpx.get(url + "/metrics").text.splitlines() if x.startswith("lorakit_prompt_tokens_total"))
    return float(line.split()[-1])


def test_server_prompt_tokens_metric_counts_what_usage_reports(ranked_adapters, tmp_path, sh):
    """``lorakit_prompt_tokens`` grows by each answered request's ``usage.prompt_tokens`` (OpenAI's: the prompt
    once, whatever n), the same whether its n choices share the prompt's prefill or some prefill it again on their
    own (a 3-block cache: one choice forks, one goes alone), streamed (``include_usage``) or not; a request refused
    before its prompt was processed (weights that fail on first load: a 400 with no usage) adds nothing (was: counted
    at submission). The real server and ``openai`` client; token-id prompts (tiny_llama has no tokenizer)."""
    import json
    import shutil

    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from lorakit.serving.server import create_app

    _, dirs = ranked_adapters
    root = tmp_path / "adapters"
    shutil.copytree(dirs["a1"], root / "a1")
    (root / "bad_rank").mkdir()  # registers (r=9 in its config); its rank-5 weights fail on first load
    config = json.loads((dirs["a1"] / "adapter_config.json").read_text())
    (root / "bad_rank" / "adapter_config.json").write_text(json.dumps({**config, "r": 9}))
    shutil.copy(dirs["a1"] / "adapter_model.safetensors", root / "bad_rank" / "adapter_model.safetensors")
    model = tiny_llama()
    store = AdapterStore(model, [root], max_loras=2)
    store.register_dir(root)
    engines = {blocks: Engine(model, store=store, kv_cache_bytes=sh.kv_budget(model, blocks), block_size=4,
                              max_batch=4) for blocks in (32, 3)}
    prompt = list(range(5, 12))  # 7 tokens: 2 blocks of 4, the last partly filled (each fork copies it)
    for blocks, engine in engines.items():
        server = sh.LiveServer(create_app(engine, model_name="tiny"))
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        try:
            for stream in (False, True):
                before, forked = _prompt_tokens_metric(server.url), engine.stats["forked"]
                kw = dict(model="a1", prompt=prompt, max_tokens=5, temperature=1.0, seed=3, n=3,
                          extra_body={"ignore_eos": True})
                if stream:
                    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                                            **kw))
                    usage = chunks[-1].usage
                else:
                    usage = client.completions.create(**kw).usage
                assert usage.prompt_tokens == len(prompt) and usage.completion_tokens == 15
                assert _prompt_tokens_metric(server.url) - before == usage.prompt_tokens, (blocks, stream)
                # the roomy cache shares the prefill with both other choices; the 3-block one with one of them
                assert engine.stats["forked"] - forked == (2 if blocks == 32 else 1), (blocks, stream)
            before = _prompt_tokens_metric(server.url)
            with pytest.raises(openai.BadRequestError, match="'bad_rank' failed to load"):
                client.completions.create(model="bad_rank", prompt=prompt, max_tokens=2, n=2)
            assert _prompt_tokens_metric(server.url) == before
        finally:
            server.stop()
        _idle(engine)


def test_choices_are_admitted_first_come_first_served_and_no_row_idles(banked, sh):
    """The admission policy for n choices (vLLM's, v1: n > 1 fans out into one request per choice, each scheduled
    first come, first served; vllm/v1/engine/parallel_sampling.py): a request with n choices does not wait for n free
    rows (was: it waited for the running batch to drain until n rows were free at once, keeping rows idle and every
    later request behind it), and later requests do not pass its choices (which would starve it under steady
    traffic). Three running requests in a batch of 4, then n=4 choices, then a new short request every step: each
    step runs min(4, requests not finished) rows; requests start in arrival order (choices in index order); the
    prompt is prefilled once (the choices that start later fork its blocks from a running choice); every choice gives
    the tokens of a request alone."""
    engine = Engine(banked, kv_cache_bytes=sh.kv_budget(banked, 64), block_size=4, max_batch=4)
    order = [engine.submit([5, 6, 7], "a0", SamplingParams(max_tokens=t, ignore_eos=True)) for t in (3, 6, 9)]
    prompt = [8, 9, 10, 11, 12]
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=70 + i, ignore_eos=True) for i in range(4)]
    choices = engine.submit_choices(prompt, "a2", params)
    order += choices
    started: dict[int, int] = {}
    for step in range(1, 200):
        if step <= 12:
            order.append(engine.submit([13, 14], None, SamplingParams(max_tokens=2, ignore_eos=True)))
        live = sum(not r.done.is_set() for r in order)
        before = [len(r.output_ids) for r in order]
        engine.step()
        _check_refcounts(engine)
        ran = sum(len(r.output_ids) > b for r, b in zip(order, before))
        assert ran == min(engine.max_batch, live), (step, ran, live)  # no row idle while a request waits
        for i, r in enumerate(order):
            if r.output_ids and i not in started:
                started[i] = step
        if all(r.done.is_set() for r in order):
            break
    starts = [started[i] for i in range(len(order))]
    assert starts == sorted(starts), starts  # first come, first served: nothing started before an earlier request
    assert started[3] == 1 and starts[4:7] != [1, 1, 1]  # choice 0 at once, the others as rows freed
    assert engine.stats["forked"] == 3  # the prompt prefilled once
    assert engine.stats["prefill_tokens"] == 3 * 3 + len(prompt) + 12 * 2
    assert [r.output_ids for r in choices] == [r.output_ids for r in _alone(banked, prompt, "a2", params)]
    _idle(engine)


def test_server_n_beyond_max_batch_runs_in_waves(sh):
    """n = 2 * max_batch + 1 on a real server with the real ``openai`` client: n choices (indices 0..n-1), streamed
    (chunks of the choices interleaved, each carrying its index) and not, each choice the text of the same request
    sent with n = 1 and seed + i (vLLM's per-choice seed; the unshared path); usage counts the prompt once and the
    completion tokens of every choice. n above ``ServerLimits.max_n`` is a 400 naming the limit (was: any n above
    max_batch was a 400, though the engine admits choices in waves as rows free up)."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.serving.server import ServerLimits, create_app

    model, tok = load_model_and_tokenizer()  # a tokenizer, so that the choices' texts differ
    engine = Engine(model, tok, kv_cache_bytes=8 << 20, block_size=4, max_batch=3)
    n = 2 * engine.max_batch + 1
    server = sh.LiveServer(create_app(engine, model_name="bundled", limits=ServerLimits(max_n=n)))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    prompt, max_tokens = "The cat", 6
    kw = dict(model="bundled", prompt=prompt, max_tokens=max_tokens, temperature=1.0, extra_body={"ignore_eos": True})
    try:
        alone = [client.completions.create(seed=40 + i, **kw).choices[0].text for i in range(n)]
        assert len(set(alone)) > 1  # the seeds differ, so do the choices: the check below tells them apart
        prompt_tokens = len(tok(prompt)["input_ids"])
        forked = engine.stats["forked"]
        answer = client.completions.create(seed=40, n=n, **kw)
        assert sorted(c.index for c in answer.choices) == list(range(n))
        assert [c.text for c in sorted(answer.choices, key=lambda c: c.index)] == alone
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, n * max_tokens)
        assert engine.stats["forked"] > forked  # later waves took the prompt from a running sibling
        chunks = list(client.completions.create(seed=40, n=n, stream=True, stream_options={"include_usage": True},
                                                **kw))
        texts, order = [""] * n, []
        for chunk in chunks[:-1]:
            assert len(chunk.choices) == 1
            texts[chunk.choices[0].index] += chunk.choices[0].text
            order.append(chunk.choices[0].index)
        assert texts == alone
        assert order != sorted(order)  # interleaved: the first wave's choices stream side by side
        assert chunks[-1].choices == []
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, n * max_tokens)
        chat = dict(model="bundled", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=1.0, extra_body={"ignore_eos": True})
        alone = [client.chat.completions.create(seed=7 + i, **chat).choices[0].message.content for i in range(n)]
        answer = client.chat.completions.create(seed=7, n=n, **chat)
        assert [c.message.content for c in sorted(answer.choices, key=lambda c: c.index)] == alone
        assert answer.usage.completion_tokens == n * max_tokens
        with pytest.raises(openai.BadRequestError, match=f"n={n + 1} exceeds this server's limit of {n} choices"):
            client.completions.create(seed=40, n=n + 1, **kw)
    finally:
        server.stop()
    _idle(engine)
