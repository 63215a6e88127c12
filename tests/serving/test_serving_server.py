"""The OpenAI-compatible server, run for real: uvicorn on 127.0.0.1 started by the test, the real ``openai``
client (and httpx for vLLM's adapter endpoints and error bodies). Greedy outputs equal offline
``generate`` with lorakit routing; concurrency; adapters loaded and unloaded while requests run; bad input
answered with 4xx; client disconnects free their KV blocks; no block leaks at the end."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
import logging
import os
import shutil
import threading
import time

import httpx
import pytest
import torch

from lorakit.core.errors import AdapterConflictError
from lorakit.hub import load_model_and_tokenizer
from lorakit.serving import generate as bank_generate
from lorakit.serving import load_adapters
from lorakit.serving.engine import Engine
from lorakit.serving.server import ServerLimits, create_app
from lorakit.serving.store import AdapterStore

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

KEY = "sk-test"
TARGETS = ["q_proj", "v_proj", "down_proj"]


def bundled():
    return load_model_and_tokenizer()[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sh):
    root = tmp_path_factory.mktemp("served")
    dirs = {f"ad{i}": sh.make_adapter(root / f"ad{i}", seed=40 + i, factory=bundled, r=4 + 4 * i,
                                      target_modules=TARGETS) for i in range(3)}
    spare = tmp_path_factory.mktemp("spare")
    sh.make_adapter(spare / "late", seed=77, factory=bundled, r=8, target_modules=TARGETS)
    model, tok = load_model_and_tokenizer()
    store = AdapterStore(model, [root], max_loras=2, max_cpu_loras=8)
    store.register_dir(root)
    engine = Engine(model, tok, store=store, kv_cache_bytes=4 << 20, max_batch=6)
    app = create_app(engine, model_name="bundled", api_key=KEY, limits=ServerLimits(max_tokens=64,
                                                                                    max_body_bytes=20_000))
    server = sh.LiveServer(app)
    reference, _ = load_model_and_tokenizer()
    load_adapters(reference, dirs)
    yield dict(root=root, dirs=dirs, spare=spare, engine=engine, store=store, tok=tok, server=server,
               reference=reference, client=openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0))
    server.stop()
    assert engine.cache.used_blocks == 0  # no KV block leaked by anything the tests did


def offline(s, prompt_ids, spec, max_tokens):
    out = bank_generate(s["reference"], torch.tensor([prompt_ids]), [spec], max_new_tokens=max_tokens,
                        do_sample=False)
    new = out[0, len(prompt_ids):].tolist()
    eos = s["tok"].eos_token_id
    new = new[: new.index(eos)] if eos in new else new
    return s["tok"].decode(new, skip_special_tokens=True)


def _post(s, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(s["server"].url + path, headers=headers, timeout=60,
                      **({"content": raw} if raw is not None else {"json": body}))


PROMPTS = ["The quick brown fox", "Once upon a time", "1 2 3 4", "Hello world, said the"]


def test_server_greedy_completions_equal_offline_concurrently(setup):
    s, client = setup, setup["client"]
    jobs = [(p, m) for p in PROMPTS for m in ["bundled", "ad0", "ad1", "ad2"]]

    def ask(job):
        prompt, model = job
        r = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, jobs))
    for (prompt, model), (text, n) in zip(jobs, got):
        ids = s["tok"](prompt)["input_ids"]
        assert text == offline(s, ids, None if model == "bundled" else model, 10), (prompt, model)
        assert 1 <= n <= 10
    assert len(s["store"].resident) <= 2  # three adapters served through two resident slots


def test_server_chat_and_streaming(setup):
    s, client = setup, setup["client"]
    messages = [{"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="ad1", messages=messages, max_tokens=12, temperature=0)
    ids = s["tok"].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert r.choices[0].message.content == offline(s, list(ids), "ad1", 12)
    assert r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="ad1", messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="ad2", prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True))
    assert text == offline(s, s["tok"](PROMPTS[0])["input_ids"], "ad2", 10)


def test_server_self_moa_on_chat_and_streaming(setup):
    """Self-MoA (arXiv:2502.00674) on /v1/chat/completions: the answer is the greedy synthesis pass over the
    proposals, prompted as the module's aggregation_prompt around the user's last turn, and it streams."""
    from lorakit.serving.self_moa import aggregation_prompt

    s, client = setup, setup["client"]
    messages = [{"role": "user", "content": "Name a colour."}]
    body = dict(model="ad1", messages=messages, max_tokens=6, temperature=0, seed=3,
                extra_body={"self_moa": {"n": 2, "temperature": 1.0}})
    r = client.chat.completions.create(**body)
    proposals = r.model_extra["self_moa"]["proposals"]
    assert len(proposals) == 2 and r.model_extra["self_moa"]["rounds"] == 1
    ids = s["tok"].apply_chat_template([{"role": "user", "content": aggregation_prompt(messages[0]["content"], proposals)}],
                                       add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert r.choices[0].message.content == offline(s, list(ids), "ad1", 6)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **body))
    assert streamed == r.choices[0].message.content  # same seed: same proposals, same synthesis
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="ad1", prompt=PROMPTS[0], max_tokens=4, temperature=0, seed=3, stream=True,
        extra_body={"self_moa": {"n": 2, "temperature": 1.0}}))
    plain = client.completions.create(model="ad1", prompt=PROMPTS[0], max_tokens=4, temperature=0, seed=3,
                                      extra_body={"self_moa": {"n": 2, "temperature": 1.0}})
    assert text == plain.choices[0].text
    bad = _post(s, "/v1/chat/completions", {"model": "ad1", "messages": [{"role": "assistant", "content": "x"}],
                                             "self_moa": {"n": 2}})
    assert bad.status_code == 400 and "last message" in bad.text


def test_server_mixture_request_and_models(setup):
    s = setup
    r = _post(s, "/v1/completions", {"model": "bundled", "adapters": {"ad0": 0.6, "ad2": 0.4},
                                      "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == offline(s, s["tok"](PROMPTS[1])["input_ids"],
                                                     {"ad0": 0.6, "ad2": 0.4}, 8)
    r = _post(s, "/v1/completions", {"model": "ad1", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0,
                                      "self_moa": {"n": 3, "window": 2, "temperature": 1.0}})
    assert r.status_code == 200, r.text
    assert len(r.json()["self_moa"]["proposals"]) == 3 and r.json()["self_moa"]["rounds"] == 2
    assert _post(s, "/v1/completions", {"model": "ad1", "prompt": "x", "self_moa": {"n": 99}}).status_code == 400
    models = {m.id: m for m in s["client"].models.list()}
    assert {"bundled", "ad0", "ad1", "ad2"} <= set(models)


def test_server_rejects_bad_requests_with_4xx(setup):
    s = setup
    bad = [
        (dict(raw=b"{not json"), 400, "not valid JSON"),
        (dict(body={"model": "ad9", "prompt": "x"}), 404, "does not exist"),
        (dict(body={"model": "ad1", "prompt": "x", "max_tokens": 500}), 400, "limit of 64"),
        (dict(body={"model": "ad1", "prompt": "word " * 300, "max_tokens": 4}), 400, "context length"),
        (dict(body={"model": "ad1", "prompt": "x" * 30_000}), 413, "exceeds the limit"),
        (dict(body={"model": "ad1", "prompt": 5}), 400, "'prompt' must be"),
        (dict(body={"model": "ad1", "prompt": "x"}, key="wrong"), 401, "API key"),
        (dict(body={"model": "ad1", "prompt": "x", "temperature": -1}), 400, "temperature"),
    ]
    for kw, status, message in bad:
        r = _post(s, "/v1/completions", kw.get("body"), key=kw.get("key", KEY), raw=kw.get("raw"))
        assert r.status_code == status, (kw, r.text)
        assert message in r.json()["error"]["message"], r.text
    with pytest.raises(openai.NotFoundError, match="ad1"):
        s["client"].completions.create(model="ad1x", prompt="x", max_tokens=2)
    r = _post(s, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": str(s["root"] / ".." / "x")})
    assert r.status_code == 400 and "'..'" in r.json()["error"]["message"]
    r = _post(s, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": str(s["spare"] / "late")})
    assert r.status_code == 400 and "outside the allowed roots" in r.json()["error"]["message"]
    assert httpx.get(s["server"].url + "/health").json() == {"status": "ok"}


def test_server_load_unload_while_running_and_corrupt_file(setup):
    s, client = setup, setup["client"]
    root = s["root"]
    shutil.copytree(s["spare"] / "late", root / "late")
    with cf.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(client.completions.create, model="ad0", prompt=p, max_tokens=24, temperature=0,
                               extra_body={"ignore_eos": True}) for p in PROMPTS]
        time.sleep(0.2)
        r = _post(s, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(root / "late")})
        assert r.status_code == 200, r.text
        late = client.completions.create(model="late", prompt=PROMPTS[0], max_tokens=6, temperature=0)
        r = _post(s, "/v1/unload_lora_adapter", {"lora_name": "ad0"})  # its requests are still running
        assert r.status_code == 200
        for f in running:
            assert f.result().choices[0].finish_reason == "length"
    ref_model = s["reference"]
    load_adapters(ref_model, {"late": root / "late"})
    assert late.choices[0].text == offline(s, s["tok"](PROMPTS[0])["input_ids"], "late", 6)
    assert _post(s, "/v1/completions", {"model": "ad0", "prompt": "x"}).status_code == 404
    assert _post(s, "/v1/unload_lora_adapter", {"lora_name": "ad0"}).status_code == 404
    # a corrupt weights file: 400, and the server keeps serving the others
    shutil.copytree(root / "ad1", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    r = _post(s, "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": str(root / "broken")})
    assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]
    assert "broken" not in {m.id for m in client.models.list()}
    ok = client.completions.create(model="ad1", prompt=PROMPTS[2], max_tokens=5, temperature=0)
    assert ok.choices[0].text == offline(s, s["tok"](PROMPTS[2])["input_ids"], "ad1", 5)
    _post(s, "/v1/load_lora_adapter", {"lora_name": "ad0", "lora_path": str(root / "ad0")})


def test_server_disconnect_frees_slot_and_metrics(setup):
    s = setup
    engine = s["engine"]
    body = {"model": "ad2", "prompt": PROMPTS[3], "max_tokens": 64, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", s["server"].url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    deadline = time.time() + 30
    while (engine.num_running or engine.num_waiting or engine.cache.used_blocks) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.cache.used_blocks == 0 and engine.num_running == 0
    text = httpx.get(s["server"].url + "/metrics").text
    for name in ["lorakit_num_requests_running", "lorakit_num_requests_waiting", "lorakit_time_to_first_token_seconds",
                 "lorakit_inter_token_latency_seconds", "lorakit_generation_tokens_per_second",
                 "lorakit_resident_adapters", "lorakit_kv_cache_bytes", "lorakit_adapter_host_cache_bytes",
                 "lorakit_lora_requests_info"]:
        assert name in text, name
    assert 'lorakit_requests_total{adapter="ad2",finish_reason="abort"}' in text
    assert json.loads(json.dumps(engine.stats))["finished"] > 0


@pytest.mark.parametrize("extra", [[], ["--cuda-graphs"]], ids=["eager", "cuda_graphs"])
def test_cli_serve_starts_and_answers(setup, tmp_path, extra, sh):
    """``lorakit serve`` as a user runs it (``python -m lorakit.cli``, the one serving test that starts it so; the
    others fork it from a process that has imported lorakit): the bundled model, an adapters folder, a completion
    over HTTP; also with ``--cuda-graphs`` (on the CPU its static decode step runs eagerly: the same greedy text)."""
    import os

    proc, url = sh.start_cli_server(["--adapters", str(setup["root"]), "--max-loras", "2", "--kv-cache-mb", "8",
                                     *extra], tmp_path / "stderr.txt", env={**os.environ, "LORAKIT_API_KEY": KEY},
                                    forked=bool(extra))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        r = client.completions.create(model="ad1", prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert r.choices[0].text == offline(setup, setup["tok"](PROMPTS[0])["input_ids"], "ad1", 6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_http_error_pickles_with_its_status_and_type():
    """A replica's error crosses processes (Ray Serve pickles it); it was rebuilt from its message alone (TypeError)."""
    import pickle

    from lorakit.serving.server import HTTPError

    back = pickle.loads(pickle.dumps(HTTPError(404, "unknown adapter 'x'", "not_found_error")))
    assert (type(back), back.status, back.message, back.kind) == (HTTPError, 404, "unknown adapter 'x'", "not_found_error")


def test_server_refuses_malformed_fields_with_openai_errors(setup):
    """Every malformed field is a 4xx in OpenAI's error shape before anything runs (was: a non-integer or huge seed a
    plain-text 500; a string or boolean temperature / top_p read as a number or refused without the field's name;
    stream_options "x" a stream cut off mid-way; "stream": "yes" streamed; a mix weight beyond
    float32 a 500; NaN/Infinity, which are not JSON (RFC 8259), accepted). Fields OpenAI defines that change the
    answer and this server lacks (echo, logprobs, best_of, penalties, tools, response_format) are refused, not
    silently ignored; their defaults and nulls are accepted (OpenAI: null = the default)."""
    s = setup
    ok = {"model": "ad1", "prompt": "x", "max_tokens": 2}
    bad = [
        ({**ok, "seed": "abc", "temperature": 1}, 400, "seed"),
        ({**ok, "seed": 2 ** 80, "temperature": 1}, 400, "seed"),
        ({**ok, "seed": 1.5, "temperature": 1}, 400, "seed"), ({**ok, "top_k": 2.7}, 400, "top_k"),
        ({**ok, "stream": "yes"}, 400, "'stream'"), ({**ok, "ignore_eos": "no"}, 400, "'ignore_eos'"),
        ({**ok, "stream": True, "stream_options": "x"}, 400, "stream_options"), ({**ok, "n": 0}, 400, "n must be"),
        ({**ok, "n": True}, 400, "n must be"), ({**ok, "n": 129}, 400, "exceeds this server's limit of 128 choices"),
        ({**ok, "n": 2, "seed": 2 ** 64 - 1, "temperature": 1}, 400, "seed + i"),
        ({**ok, "echo": True}, 400, "'echo' is not supported"), ({**ok, "logprobs": 3}, 400, "'logprobs'"),
        ({**ok, "best_of": 2}, 400, "'best_of'"), ({**ok, "presence_penalty": 0.5}, 400, "'presence_penalty'"),
        ({**ok, "model": "bundled", "adapters": {"ad0": 1e308}}, 400, "float32"),
        # named, and no string or boolean read as a number (was: "could not convert string to float: 'hot'", and
        # "temperature": true sampled at temperature 1)
        ({**ok, "temperature": "hot"}, 400, "temperature must be a number"),
        ({**ok, "temperature": "0.5"}, 400, "temperature must be a number"),
        ({**ok, "temperature": True}, 400, "temperature must be a number"),
        ({**ok, "top_p": "a"}, 400, "top_p must be a number"), ({**ok, "top_p": False}, 400, "top_p must be a number"),
        # an empty stop sequence never matches (was: accepted, and the output ran on to max_tokens)
        ({**ok, "stop": [""]}, 400, "'stop' holds an empty string"),
        ({**ok, "stop": ["\n", ""]}, 400, "'stop' holds an empty string"),
        ({**ok, "stop": ""}, 400, "'stop' holds an empty string"),
    ]
    for body, status, message in bad:
        r = _post(s, "/v1/completions", body)
        assert r.status_code == status and message in r.json()["error"]["message"], (body, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    chat = {"model": "ad1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra, name in [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                        ({"response_format": {"type": "json_object"}}, "response_format"),
                        ({"logprobs": True}, "logprobs")]:
        r = _post(s, "/v1/chat/completions", {**chat, **extra})
        assert r.status_code == 400 and f"'{name}' is not supported" in r.json()["error"]["message"], r.text
    for body in [{**ok, "n": None, "temperature": None, "seed": None, "echo": False, "logprobs": None, "best_of": 1,
                  "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "stream": False,
                  "stream_options": None, "some_future_field": 1},
                 {**ok, "stop": None}, {**ok, "stop": []}]:
        assert _post(s, "/v1/completions", body).status_code == 200
    for raw in [b'{"model": "ad1", "prompt": "x", "temperature": NaN}',
                b'{"model": "bundled", "prompt": "x", "adapters": {"ad0": Infinity}}',
                b'{"model": "ad1", "prompt": "\xff"}']:
        r = _post(s, "/v1/completions", None, raw=raw)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text
    # a chunked body (no content-length) is refused once it passes the limit, not read to its end
    r = httpx.post(s["server"].url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   content=iter([b" " * 8192] * 8), timeout=60)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
    r = httpx.get(s["server"].url + "/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="seed"):
        s["client"].completions.create(model="ad1", prompt="x", max_tokens=2, temperature=1.0,
                                       extra_body={"seed": "abc"})


def test_server_stream_usage_is_its_own_final_chunk(setup):
    """OpenAI's stream_options.include_usage: "an additional chunk will be streamed before the data: [DONE] message
    ... the choices field will always be an empty array. All other chunks will also include a usage field, but
    with a null value" (was: the usage on the last text chunk)."""
    client = setup["client"]
    for chunks in [list(client.completions.create(model="ad0", prompt=PROMPTS[1], max_tokens=5, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})),
                   list(client.chat.completions.create(model="ad0", messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=5, temperature=0, stream=True,
                                                       stream_options={"include_usage": True},
                                                       extra_body={"ignore_eos": True}))]:
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
        assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 5
        assert all(c.usage is None and len(c.choices) == 1 for c in chunks[:-1])
        assert chunks[-2].choices[0].finish_reason == "length"


def test_server_chat_content_parts_read_as_text(setup):
    """OpenAI's message content may be a list of parts; text parts are the text (joined with newlines, as vLLM
    does); other part types are a 400 naming them."""
    client = setup["client"]
    as_string = client.chat.completions.create(model="ad2", messages=[{"role": "user", "content": "Name a colour."}],
                                               max_tokens=6, temperature=0)
    as_parts = client.chat.completions.create(
        model="ad2", messages=[{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}],
        max_tokens=6, temperature=0)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="ad2", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


def _aborts(s) -> float:
    text = httpx.get(s["server"].url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("lorakit_requests_total{") and 'finish_reason="abort"' in line)


def test_server_client_gone_before_first_event_is_aborted(setup):
    """A client that hangs up before its response starts (streamed: the response waits for the first event; or not
    streamed) has its request aborted, not run to the end (README: a client that disconnects has its request
    aborted, which frees its KV blocks). The engine is held between steps, so neither request can produce an event
    before its client is gone (was: Starlette's BaseHTTPMiddleware hid the disconnect; both ran to the end)."""

    s, engine = setup, setup["engine"]
    before = _aborts(s)
    gate, held = threading.Event(), threading.Event()
    blocker = threading.Thread(target=engine.call, args=(lambda: (held.set(), gate.wait(60)),), daemon=True)
    blocker.start()
    try:
        assert held.wait(30)
        for stream in (True, False):
            with pytest.raises(httpx.TimeoutException):
                httpx.post(s["server"].url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": "ad1", "prompt": PROMPTS[0], "max_tokens": 32, "stream": stream,
                                 "ignore_eos": True}, timeout=0.5)
        deadline = time.time() + 15
        while _aborts(s) < before + 2 and time.time() < deadline:
            time.sleep(0.1)
        assert _aborts(s) == before + 2
    finally:
        gate.set()
        blocker.join(30)
    deadline = time.time() + 30
    while (engine.num_running or engine.num_waiting or engine.cache.used_blocks) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.num_running == engine.num_waiting == engine.cache.used_blocks == 0


def test_server_overflowing_mix_fails_alone(setup):
    """A weighted mix whose weights overflow the logits (finite in float32, inf in the forward) fails that request
    with a 400, and the requests batched with it finish (was: every running request got a 500)."""
    s = setup

    def ask(body):
        return _post(s, "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 12, "ignore_eos": True,
                                            "temperature": 1.0, "seed": 1, **body})

    with cf.ThreadPoolExecutor(4) as pool:
        fine = [pool.submit(ask, {"model": m}) for m in ("ad0", "bundled", "ad1")]
        broken = pool.submit(ask, {"model": "bundled", "adapters": {"ad0": 3e38, "ad1": 3e38}})
        assert [f.result().json()["usage"]["completion_tokens"] for f in fine] == [12, 12, 12]
        r = broken.result()
    assert r.status_code == 400 and "not finite" in r.json()["error"]["message"], r.text


@contextlib.contextmanager
def slowed(engine, pause_s: float = 0.05):
    """Every engine step held ``pause_s`` (a call between steps), so a request's tokens arrive that far apart."""
    stop = threading.Event()

    def slow_steps():
        while not stop.is_set():
            engine.call(lambda: time.sleep(pause_s))

    slower = threading.Thread(target=slow_steps, daemon=True)
    slower.start()
    try:
        yield
    finally:
        stop.set()
        slower.join(30)


def test_server_client_gone_while_tokens_flow_is_aborted(setup):
    """A non-streamed request whose client hangs up while its tokens are being generated is aborted then, not when
    it finishes (was: the disconnect was looked at only after 0.5 s without any token). Every engine step is held
    50 ms here, so the 64 tokens take over 3 s while tokens still arrive more often than that."""
    s, engine = setup, setup["engine"]
    before = _aborts(s)
    with slowed(engine):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s["server"].url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "ad0", "prompt": PROMPTS[1], "max_tokens": 64, "ignore_eos": True},
                       timeout=1.0)
        deadline = time.time() + 1.5
        while _aborts(s) < before + 1 and time.time() < deadline:
            time.sleep(0.05)
        assert _aborts(s) == before + 1


def test_server_client_gone_during_self_moa_proposals_aborts_them(setup):
    """Self-MoA's proposals run before the response starts; a client that hangs up then has them aborted, freeing
    their slots and KV blocks (was: all n proposals ran to the end for nobody). Engine steps are held 50 ms, so the
    proposals' 64 tokens would take over 3 s."""
    s, engine = setup, setup["engine"]
    with slowed(engine):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s["server"].url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "ad2", "prompt": PROMPTS[0], "max_tokens": 64, "ignore_eos": True,
                             "self_moa": {"n": 3}}, timeout=1.0)
        deadline = time.time() + 1.5
        while (engine.num_running or engine.num_waiting) and time.time() < deadline:
            time.sleep(0.05)
        assert engine.num_running == engine.num_waiting == engine.cache.used_blocks == 0


def test_server_n_greedy_choices_equal_the_n1_answer(setup):
    """OpenAI's ``n``: n choices indexed 0..n-1; greedy decoding makes every choice the n=1 answer (OpenAI's and
    vLLM's behaviour); ``usage`` counts the prompt once and sums the choices' completion tokens (OpenAI's usage
    object: prompt_tokens "in the prompt", completion_tokens "in the generated completion"). Ids: ``cmpl-`` on
    completions, ``chatcmpl-`` on chat (OpenAI's)."""
    s, client = setup, setup["client"]
    one = client.completions.create(model="ad0", prompt=PROMPTS[3], max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    r = client.completions.create(model="ad0", prompt=PROMPTS[3], max_tokens=5, temperature=0, n=3,
                                  extra_body={"ignore_eos": True})
    assert one.id.startswith("cmpl-") and r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [one.choices[0].text] * 3
    assert one.choices[0].text == offline(s, s["tok"](PROMPTS[3])["input_ids"], "ad0", 5)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    assert r.usage.completion_tokens == 3 * 5 and r.usage.total_tokens == r.usage.prompt_tokens + 15
    messages = [{"role": "user", "content": "Name a colour."}]
    chat1 = client.chat.completions.create(model="ad1", messages=messages, max_tokens=4, temperature=0)
    chat = client.chat.completions.create(model="ad1", messages=messages, max_tokens=4, temperature=0, n=2)
    assert chat1.id.startswith("chatcmpl-") and chat.id.startswith("chatcmpl-")
    assert [(c.index, c.message.content) for c in chat.choices] == [(i, chat1.choices[0].message.content)
                                                                    for i in range(2)]
    assert chat.usage.prompt_tokens == chat1.usage.prompt_tokens
    assert chat.usage.completion_tokens == 2 * chat1.usage.completion_tokens


def test_server_n_seeded_choice_i_is_seed_plus_i(setup):
    """With ``seed``, choice i samples as an n=1 request with seed + i (vLLM's parallel sampling,
    vllm/v1/engine/parallel_sampling.py ParentRequest._get_child_sampling_params: ``seed + index``), on the same
    adapter or weighted mix; streamed choices carry their ``index`` and equal the non-streamed ones, and the
    include_usage chunk sums over the choices."""
    client = setup["client"]
    for model, extra in [("ad2", {}), ("bundled", {"adapters": {"ad0": 0.5, "ad1": 0.5}})]:
        kw = dict(model=model, prompt=PROMPTS[1], max_tokens=6, temperature=1.0)
        r = client.completions.create(n=3, seed=11, extra_body={"ignore_eos": True, **extra}, **kw)
        singles = [client.completions.create(seed=11 + i, extra_body={"ignore_eos": True, **extra}, **kw)
                   for i in range(3)]
        assert [c.text for c in r.choices] == [one.choices[0].text for one in singles], model
        assert r.usage.completion_tokens == 18
        chunks = list(client.completions.create(n=3, seed=11, stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True, **extra}, **kw))
        texts = ["", "", ""]
        for c in chunks[:-1]:
            assert len(c.choices) == 1 and c.id == chunks[0].id
            texts[c.choices[0].index] += c.choices[0].text
        assert texts == [c.text for c in r.choices]
        assert sorted(c.choices[0].index for c in chunks[:-1] if c.choices[0].finish_reason) == [0, 1, 2]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 18
    messages = [{"role": "user", "content": "Hi"}]
    kw = dict(model="ad0", messages=messages, max_tokens=4, temperature=1.0, seed=4, n=2)
    r = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    texts, roles = ["", ""], []
    for c in chunks:
        assert c.id.startswith("chatcmpl-") and len(c.choices) == 1
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
        if c.choices[0].delta.role:
            roles.append(c.choices[0].index)
    assert roles == [0, 1] and texts == [c.message.content for c in r.choices]


def test_server_n_refused_with_self_moa(setup):
    """Self-MoA answers with one synthesis of its own self_moa.n proposals: n > 1 with it is a 400 saying so."""
    for path, body in [("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]:
        r = _post(setup, path, {"model": "ad1", "max_tokens": 2, "n": 2, "self_moa": {"n": 2}, **body})
        assert r.status_code == 400 and "self_moa" in r.json()["error"]["message"], r.text


def test_server_client_gone_aborts_all_n_choices(setup):
    """A client that hangs up while its n=3 choices are generated has all three aborted (their slots and KV blocks
    freed), not run to the end. Engine steps are held 50 ms, so 64 tokens would take over 3 s."""
    s, engine = setup, setup["engine"]
    before = _aborts(s)
    body = {"model": "ad0", "prompt": PROMPTS[1], "max_tokens": 64, "ignore_eos": True, "n": 3}
    with slowed(engine):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s["server"].url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json=body,
                       timeout=1.0)
        with httpx.stream("POST", s["server"].url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={**body, "stream": True}, timeout=10) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")  # streaming started; leaving the block hangs up
    deadline = time.time() + 10
    while (_aborts(s) < before + 6 or engine.num_running or engine.num_waiting) and time.time() < deadline:
        time.sleep(0.05)
    assert _aborts(s) == before + 6
    assert engine.num_running == engine.num_waiting == engine.cache.used_blocks == 0


def test_refusal_maps_errors_by_type_not_message():
    """An unknown adapter is a 404 because of its type (UnknownAdapterError, raised by the store, the banks and the
    core alike), whatever its message says; an AdapterError whose text merely reads like one stays a 400 (was: the
    404 was chosen by ``str(error).startswith("unknown adapter")``). A state conflict is a 409."""
    from lorakit.core.errors import AdapterConflictError, AdapterError, UnknownAdapterError
    from lorakit.serving.server import refusal

    e = refusal(UnknownAdapterError("no such thing as 'zz'"), "zz")
    assert (e.status, e.kind) == (404, "not_found_error")
    assert e.message == "The model `zz` does not exist: no such thing as 'zz'; see /v1/models"
    assert refusal(AdapterError("unknown adapter 'zz' (a message, not a type)")).status == 400
    assert (refusal(AdapterConflictError("busy")).status, refusal(AdapterConflictError("busy")).kind) == \
        (409, "conflict_error")


def test_every_unknown_adapter_raise_is_typed(tmp_path, sh):
    """The places that refuse an unknown name (store, banks, core set/delete) raise UnknownAdapterError: a request for
    it maps to a 404 through any of them."""
    import lorakit as lk
    from lorakit.core.errors import UnknownAdapterError
    from lorakit.serving.multi import REGISTRY_ATTR

    model = bundled()
    store = AdapterStore(model, [tmp_path])
    for call in (lambda: store.check("nope"), lambda: store.unregister("nope"),
                 lambda: getattr(model, REGISTRY_ATTR).route(["nope"]), lambda: lk.set_adapter(model, "nope"),
                 lambda: lk.delete_adapter(model, "nope")):
        with pytest.raises(UnknownAdapterError, match="nope"):
            call()


HOLD_S = 60.0  # how long a test holds the engine thread at most (a guard: the test lets it go long before)


@contextlib.contextmanager
def engine_held(engine):
    """The engine thread held in a call until the block ends: loads and unloads queued behind it are in flight.
    Fails when the hold ran out instead of being let go by the block's end: an answer inside the block then waited
    for the engine thread (was: a conflicting unload did, until this hold ran out)."""
    gate, held, let_go = threading.Event(), threading.Event(), []

    def hold():
        held.set()
        let_go.append(gate.wait(HOLD_S))
    holder = threading.Thread(target=engine.call, args=(hold,), daemon=True)
    holder.start()
    assert held.wait(30)
    try:
        yield
    finally:
        gate.set()
        holder.join(30)
    assert let_go == [True], "the engine hold ran out: something in the block waited for the engine thread"


@contextlib.contextmanager
def load_paused(store, name):
    """A load of ``name`` paused while it runs on the engine thread: registered, stopped as it starts reading its
    weights (``AdapterStore._read_host``, the first step of ensure_resident) until the block ends, then going on as
    it would have. Yields an Event set once the load has got there. Fails when the pause ran out instead of being
    let go by the block's end (an answer inside the block waited for the engine thread)."""
    reached, gate, resumed, let_go = threading.Event(), threading.Event(), threading.Event(), []
    read = store._read_host

    def paused_read(n):
        if n == name and threading.current_thread().name == "lorakit-engine" and not reached.is_set():
            reached.set()
            let_go.append(gate.wait(HOLD_S))
            resumed.set()
        return read(n)
    store._read_host = paused_read  # the instance's, in front of the class's method (removed below)
    try:
        yield reached
    finally:
        gate.set()
        del store._read_host
    assert not reached.is_set() or resumed.wait(30)
    assert let_go == [True], "the paused load ran out: something in the block waited for the engine thread"


def _in_flight(store, name, deadline_s=30.0):
    deadline = time.time() + deadline_s
    while name not in store._loading:
        assert time.time() < deadline, f"the load of {name!r} never started"
        time.sleep(0.01)


def _conflict(r, *words):
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["type"] == "conflict_error" and error["code"] == 409 and all(w in error["message"] for w in words)


def test_server_load_unload_races_are_409_conflicts(setup):
    """Load and unload of one name racing each other answer 409 (OpenAI's error shape, type conflict_error), not a
    400 (the request is fine; the adapter's state is not) and not whichever order the engine thread happens to run
    them in: a second load while one is in flight, an unload while a load is in flight, a load of a loaded name, and
    (below) a load or a second unload while the name is being unloaded. The load in flight then succeeds."""
    s, store = setup, setup["store"]
    root = s["root"]
    shutil.copytree(s["spare"] / "late", root / "racer")
    body = {"lora_name": "racer", "lora_path": str(root / "racer")}
    with cf.ThreadPoolExecutor(2) as pool:
        with engine_held(s["engine"]):
            first = pool.submit(_post, s, "/v1/load_lora_adapter", body)
            _in_flight(store, "racer")
            _conflict(_post(s, "/v1/load_lora_adapter", body), "racer", "being loaded")
            _conflict(_post(s, "/v1/unload_lora_adapter", {"lora_name": "racer"}), "racer", "being loaded")
        assert first.result().status_code == 200, first.result().text
    _conflict(_post(s, "/v1/load_lora_adapter", body), "already loaded")
    assert "racer" in {m.id for m in s["client"].models.list()}
    assert _post(s, "/v1/unload_lora_adapter", {"lora_name": "racer"}).status_code == 200
    shutil.rmtree(root / "racer")


def test_server_conflicts_are_answered_while_a_load_runs(setup):
    """While a load runs on the engine thread (registered, reading its weights: paused there by the test), a second
    load of the name, an unload of it and a completion naming it (the real openai client) get their 409
    conflict_error from the request handler, without waiting for the engine thread, and the name is not listed yet.
    Then the load, and a request on another adapter running before it, finish as if nothing had raced them: the load
    answers 200 and the name is listed, its greedy answer equal to the offline reference with the same folder; the
    running request's answer equals the same request sent again afterwards."""
    s, client, store, engine = setup, setup["client"], setup["store"], setup["engine"]
    root = s["root"]
    shutil.copytree(s["spare"] / "late", root / "paused")
    body = {"lora_name": "paused", "lora_path": str(root / "paused")}
    kw = dict(prompt=PROMPTS[1], max_tokens=64, temperature=0, extra_body={"ignore_eos": True})
    ids = s["tok"](PROMPTS[1])["input_ids"]
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            running = pool.submit(client.completions.create, model="ad1", **kw)
            deadline = time.time() + 30
            while engine.num_running < 1 and not running.done():
                assert time.time() < deadline, "the request on ad1 never started"
                time.sleep(0.01)
            with load_paused(store, "paused") as reached:
                first = pool.submit(_post, s, "/v1/load_lora_adapter", body)
                assert reached.wait(30), "the load never reached its weights"
                _conflict(_post(s, "/v1/load_lora_adapter", body), "'paused'", "being loaded")
                _conflict(_post(s, "/v1/unload_lora_adapter", {"lora_name": "paused"}), "'paused'", "being loaded")
                with pytest.raises(openai.ConflictError, match="'paused' is being loaded") as e:
                    client.completions.create(model="paused", **kw)
                assert e.value.body["type"] == "conflict_error"
                assert "paused" not in {m.id for m in client.models.list()}
                assert not first.done()  # (the load cannot end while paused: every answer above came before it)
            assert first.result().status_code == 200, first.result().text
            ran = running.result().choices[0]
        again = client.completions.create(model="ad1", **kw).choices[0]
        assert (ran.text, ran.finish_reason) == (again.text, "length")
        assert "paused" in {m.id for m in client.models.list()}
        load_adapters(s["reference"], {"paused": root / "paused"})
        got = client.completions.create(model="paused", prompt=PROMPTS[1], max_tokens=12, temperature=0)
        assert got.choices[0].text == offline(s, ids, "paused", 12)
    finally:
        _post(s, "/v1/unload_lora_adapter", {"lora_name": "paused"})
        shutil.rmtree(root / "paused")


def test_server_load_while_unloading_is_409_then_loads(setup):
    """Unloading an adapter that running requests (real openai clients) still use leaves it being unloaded until they
    finish: a load of that name meanwhile, and a second unload, are 409s (were: a 400 and a second 200); requests
    already running finish with their adapter; once they have, the name loads again."""
    s, client, engine = setup, setup["client"], setup["engine"]
    body = {"lora_name": "ad0", "lora_path": str(s["root"] / "ad0")}
    with cf.ThreadPoolExecutor(2) as pool, slowed(engine):
        running = [pool.submit(client.completions.create, model="ad0", prompt=p, max_tokens=20, temperature=0,
                               extra_body={"ignore_eos": True}) for p in PROMPTS[:2]]
        deadline = time.time() + 30
        while engine.num_running < 2:
            assert time.time() < deadline
            time.sleep(0.01)
        assert _post(s, "/v1/unload_lora_adapter", {"lora_name": "ad0"}).status_code == 200
        _conflict(_post(s, "/v1/load_lora_adapter", body), "'ad0'", "being unloaded")
        _conflict(_post(s, "/v1/unload_lora_adapter", {"lora_name": "ad0"}), "'ad0'", "being unloaded")
        with pytest.raises(openai.NotFoundError):  # a new request for it: the name is gone
            client.completions.create(model="ad0", prompt="x", max_tokens=2)
        done = [f.result().choices[0] for f in running]
    r = _post(s, "/v1/load_lora_adapter", body)
    assert r.status_code == 200, r.text
    again = [client.completions.create(model="ad0", prompt=p, max_tokens=20, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0] for p in PROMPTS[:2]]
    assert [(c.text, c.finish_reason) for c in done] == [(c.text, "length") for c in again]


def test_server_n_choices_prefill_the_prompt_once(setup):
    """An n=4 request (the real openai client) computes its prompt's prefill once, the other choices forking its KV
    blocks (Engine.submit_choices), and its seeded choices equal 4 separate n=1 requests with seed + i, each of which
    prefilled the prompt itself."""
    s, client, engine = setup, setup["client"], setup["engine"]
    kw = dict(model="ad1", prompt=PROMPTS[2], max_tokens=6, temperature=0.8, extra_body={"ignore_eos": True})
    prompt_len = len(s["tok"](PROMPTS[2])["input_ids"])
    before = dict(engine.stats)
    r = client.completions.create(n=4, seed=21, **kw)
    assert engine.stats["prefill_tokens"] - before["prefill_tokens"] == prompt_len
    assert engine.stats["forked"] - before["forked"] == 3
    before = dict(engine.stats)
    singles = [client.completions.create(seed=21 + i, **kw).choices[0].text for i in range(4)]
    assert engine.stats["prefill_tokens"] - before["prefill_tokens"] == 4 * prompt_len
    assert [c.text for c in r.choices] == singles and r.usage.prompt_tokens == prompt_len
    assert engine.cache.used_blocks == 0


def test_a_request_for_an_adapter_whose_load_is_in_flight_is_a_409_to_retry(setup):
    """Between POST /v1/load_lora_adapter and its success, a completion naming the adapter (n=1 or n=2, streamed or
    not) is a 409 conflict_error saying its load is in flight, which the real openai client raises as ConflictError
    (and, with its default max_retries, retries by itself), not a 404 "does not exist" (was: the name was simply not
    registered yet). Once the load succeeds, the same n=2 seeded request is served, its choices equal to n=1
    requests with seed + i."""
    s, client, store = setup, setup["client"], setup["store"]
    root = s["root"]
    shutil.copytree(s["spare"] / "late", root / "inflight")
    kw = dict(model="inflight", prompt=PROMPTS[3], max_tokens=5, temperature=0.9, extra_body={"ignore_eos": True})
    try:
        retrying = openai.OpenAI(base_url=s["server"].url + "/v1", api_key=KEY, max_retries=6)
        with cf.ThreadPoolExecutor(2) as pool:
            with engine_held(s["engine"]):
                load = pool.submit(_post, s, "/v1/load_lora_adapter",
                                   {"lora_name": "inflight", "lora_path": str(root / "inflight")})
                _in_flight(store, "inflight")
                for n, stream in [(1, False), (2, False), (2, True)]:
                    with pytest.raises(openai.ConflictError, match="'inflight' is being loaded") as e:
                        client.completions.create(n=n, seed=3, stream=stream, **kw)
                    assert e.value.status_code == 409 and e.value.body["type"] == "conflict_error"
                with pytest.raises(openai.NotFoundError):  # another name is still unknown
                    client.completions.create(**{**kw, "model": "inflght"})
                # a client with retries (the openai default) gets its 409, backs off and retries after the load
                retried = pool.submit(retrying.completions.create, n=2, seed=3, **kw)
                time.sleep(0.2)
            assert load.result().status_code == 200, load.result().text
        both = retried.result(timeout=60)
        assert [c.text for c in both.choices] == [client.completions.create(seed=3 + i, **kw).choices[0].text
                                                  for i in range(2)]
    finally:
        _post(s, "/v1/unload_lora_adapter", {"lora_name": "inflight"})
        shutil.rmtree(root / "inflight")


QUEUE_S = 0.5  # the busy server's adapter_queue_timeout_s: short, so that a held engine runs it out


@pytest.fixture(scope="module")
def busy(setup, sh, tmp_path_factory):
    """A second server (its own bundled model, store and engine) whose loads and unloads wait at most QUEUE_S for
    the engine thread to start them (``ServerLimits.adapter_queue_timeout_s``): "kept" (setup's ad0) is served,
    "queued" (setup's spare adapter) is a folder under its root to load."""
    root = tmp_path_factory.mktemp("busy")
    shutil.copytree(setup["dirs"]["ad0"], root / "kept")
    shutil.copytree(setup["spare"] / "late", root / "queued")
    model, tok = load_model_and_tokenizer()
    store = AdapterStore(model, [root], max_loras=2, max_cpu_loras=8)
    store.register("kept", root / "kept")
    engine = Engine(model, tok, store=store, kv_cache_bytes=4 << 20, max_batch=6)
    server = sh.LiveServer(create_app(engine, model_name="bundled", api_key=KEY,
                                      limits=ServerLimits(adapter_queue_timeout_s=QUEUE_S)))
    load_adapters(setup["reference"], {"queued": root / "queued"})  # offline reference for its answers
    yield dict(root=root, engine=engine, store=store, server=server,
               client=openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0))
    server.stop()
    assert engine.cache.used_blocks == 0


def _greedy(client, model: str, n: int = 8) -> str:
    return client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=n, temperature=0).choices[0].text


def test_a_load_or_unload_the_busy_engine_never_started_is_a_503_and_never_happens(setup, busy):
    """A load and an unload queued behind an engine thread busy for longer than the server's
    ``adapter_queue_timeout_s`` are cancelled before they start and answered 503 (OpenAI's error shape, type
    server_error, ``Retry-After: 1``; the real openai client raises it as InternalServerError with the header); and
    what the client was told holds once the engine is free: the adapter was not loaded (not listed, nothing recorded
    against it), the other was not unloaded (listed, answering as its offline reference), so the retries succeed
    (were: a 500 after 120 s while both still ran later, so the load's retry got a 409 "already loaded", the
    unload's a 404, and the adapter the client was told is still served was gone)."""
    s, store, client = busy, busy["store"], busy["client"]
    ids = setup["tok"](PROMPTS[0])["input_ids"]
    load = {"lora_name": "queued", "lora_path": str(s["root"] / "queued")}
    with engine_held(s["engine"]):
        for path, body, said in [("/v1/load_lora_adapter", load, "adapter 'queued' was not loaded"),
                                 ("/v1/unload_lora_adapter", {"lora_name": "kept"}, "adapter 'kept' was not unloaded")]:
            r = _post(s, path, body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("server_error", 503), error
            assert error["message"].startswith(said) and "did not run" in error["message"], error
        with pytest.raises(openai.InternalServerError, match="'queued' was not loaded") as e:
            client.post("/load_lora_adapter", body=load, cast_to=str)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
    s["engine"].call(lambda: None)  # the inbox is FIFO: every call queued in the block has run or been skipped
    assert {m.id for m in client.models.list()} == {"bundled", "kept"}
    assert "queued" not in store.failed and store.names() == ["kept"]
    assert _greedy(client, "kept") == offline(setup, ids, "ad0", 8)
    r = _post(s, "/v1/load_lora_adapter", load)
    assert r.status_code == 200, r.text
    assert _greedy(client, "queued") == offline(setup, ids, "queued", 8)
    r = _post(s, "/v1/unload_lora_adapter", {"lora_name": "kept"})
    assert r.status_code == 200, r.text
    assert {m.id for m in client.models.list()} == {"bundled", "queued"}
    for name, op in (("queued", "unload"), ("kept", "load")):  # back as the fixture made it
        r = _post(s, f"/v1/{op}_lora_adapter", {"lora_name": name, "lora_path": str(s["root"] / name)})
        assert r.status_code == 200, r.text


def test_a_load_the_engine_has_started_is_answered_with_its_outcome_however_long_it_runs(setup, busy):
    """A load the engine thread has started (registered, reading its weights: paused there by the test) is not
    given up when the server's ``adapter_queue_timeout_s`` runs out meanwhile: the handler waits and answers with
    its outcome, a 200, and the adapter is served, answering as its offline reference (was: a 500 at the timeout
    while the load went on and succeeded, so a client that retried got a 409 "already loaded")."""
    s, store, client = busy, busy["store"], busy["client"]
    load = {"lora_name": "queued", "lora_path": str(s["root"] / "queued")}
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            with load_paused(store, "queued") as reached:
                first = pool.submit(_post, s, "/v1/load_lora_adapter", load)
                assert reached.wait(30), "the load never started"
                time.sleep(4 * QUEUE_S)  # (no check: lets the queue timeout run out while the load runs)
                assert not first.done()  # (it cannot end while paused)
            r = first.result()
        assert r.status_code == 200, r.text
        assert {m.id for m in client.models.list()} == {"bundled", "kept", "queued"}
        assert _greedy(client, "queued") == offline(setup, setup["tok"](PROMPTS[0])["input_ids"], "queued", 8)
    finally:
        _post(s, "/v1/unload_lora_adapter", {"lora_name": "queued"})


def test_streamed_n_choices_with_stop_strings_end_where_separate_requests_do(setup):
    """A streamed n=4 chat request with a stop string (the real openai client): each choice's streamed text and
    finish reason equal a non-streamed n=1 request with seed + i, though the choices stop at different steps; the
    usage chunk sums their completion tokens; no block is left held."""
    s, client, engine = setup, setup["client"], setup["engine"]
    messages = [{"role": "user", "content": "Count to five."}]
    kw = dict(model="ad2", messages=messages, max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    singles = [client.chat.completions.create(seed=8 + i, **kw) for i in range(4)]
    texts = [c.choices[0].message.content for c in singles]
    stop = next(ch for ch in " etaoinsr" if 0 < sum(ch in t for t in texts) < 4)
    singles = [client.chat.completions.create(seed=8 + i, stop=stop, **kw) for i in range(4)]
    got, reasons, usage = [""] * 4, [None] * 4, None
    for chunk in client.chat.completions.create(n=4, seed=8, stop=stop, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            got[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
        usage = chunk.usage or usage
    assert got == [c.choices[0].message.content for c in singles]
    assert reasons == [c.choices[0].finish_reason for c in singles] and set(reasons) == {"stop", "length"}
    assert usage.completion_tokens == sum(c.usage.completion_tokens for c in singles)
    assert engine.cache.used_blocks == 0


def test_a_load_refused_for_the_servers_byte_cap_leaves_nothing_registered(setup, sh, tmp_path):
    """A load whose adapter can never be resident on this server (its weights exceed ``max_resident_bytes``) is
    refused with a 400 naming the cap, and what the client was told holds: the name is not served (not listed,
    a completion naming it is a 404) and nothing is recorded against the folder, which is fine (a retry is the
    same 400, not a 409 "already loaded"). (Was: the name stayed registered after the 400.)"""
    shutil.copytree(setup["spare"] / "late", tmp_path / "big")
    model, tok = load_model_and_tokenizer()
    store = AdapterStore(model, [tmp_path], max_loras=2, max_resident_bytes=64)
    engine = Engine(model, tok, store=store, kv_cache_bytes=4 << 20, max_batch=2)
    server = sh.LiveServer(create_app(engine, model_name="bundled", api_key=KEY))
    s = dict(server=server)
    try:
        body = {"lora_name": "big", "lora_path": str(tmp_path / "big")}
        for _ in range(2):
            r = _post(s, "/v1/load_lora_adapter", body)
            assert r.status_code == 400 and "max_resident_bytes" in r.json()["error"]["message"], r.text
            assert store.names() == [] and "big" not in store.failed
            assert _post(s, "/v1/completions", {"model": "big", "prompt": "x", "max_tokens": 1}).status_code == 404
    finally:
        server.stop()


def test_register_dir_leaves_a_name_whose_http_load_is_in_flight_to_that_load(setup, caplog):
    """While POST /v1/load_lora_adapter of a name waits for the engine thread (its in-flight mark set), a
    ``register_dir`` scanning a folder of that name does not take it: with on_error="skip" the folder is skipped with
    a warning and nothing is recorded (neither served nor failed); with "raise", AdapterConflictError. The load the
    client asked for first then answers 200 and serves its own folder (was: register_dir took the name, and the load
    got a 409 "already loaded" for a name nobody had loaded before it)."""
    s, store = setup, setup["store"]
    root = s["root"]
    shutil.copytree(s["spare"] / "late", root / "claimed")
    shutil.copytree(s["spare"] / "late", root / "scan" / "claimed")
    body = {"lora_name": "claimed", "lora_path": str(root / "claimed")}
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            with engine_held(s["engine"]):
                first = pool.submit(_post, s, "/v1/load_lora_adapter", body)
                _in_flight(store, "claimed")
                with caplog.at_level(logging.WARNING, logger="lorakit.serving"):
                    assert store.register_dir(root / "scan", on_error="skip") == []
                assert any("claimed" in r.getMessage() and "being loaded" in r.getMessage() for r in caplog.records)
                assert "claimed" not in store.paths and "claimed" not in store.failed
                with pytest.raises(AdapterConflictError, match="'claimed' is being loaded"):
                    store.register_dir(root / "scan", on_error="raise")
                with pytest.raises(AdapterConflictError, match="'claimed' is being loaded"):
                    store.register("claimed", root / "scan" / "claimed")
                assert "claimed" not in store.paths and "claimed" not in store.failed
            assert first.result().status_code == 200, first.result().text
        assert store.paths["claimed"].resolve() == (root / "claimed").resolve() and "claimed" not in store.failed
        assert "claimed" in {m.id for m in s["client"].models.list()}
    finally:
        _post(s, "/v1/unload_lora_adapter", {"lora_name": "claimed"})
        shutil.rmtree(root / "claimed")
        shutil.rmtree(root / "scan")


HELD_SERVE = """
import os, sys, time
from lorakit.serving.engine import Engine
step = Engine._step

def held(self):  # once CHOICES choices have tokens, hold the engine thread between steps while the file exists
    busy = step(self)
    while os.path.exists(HOLD) and sum(1 for r in self.running if r.output_ids) >= CHOICES:
        time.sleep(0.01)
    return busy
Engine._step = held
from lorakit.cli import main
sys.exit(main(ARGV))
"""


def test_cli_serve_second_ctrl_c_with_requests_in_flight_exits_cleanly(setup, tmp_path):
    """``lorakit serve`` stopped with Ctrl-C twice (uvicorn's forced exit) while streams run: the server exits with
    no traceback, the engine loop stopped and the store closed by the app's shutdown; each running stream ends with
    OpenAI's error event saying the server is shutting down (a request not started would get a 503). Was: uvicorn
    skipped the app's shutdown on a forced exit and cancelled the requests, which logged a CancelledError traceback
    per request and cut the streams off; the engine thread, still stepping, took the interpreter down at exit
    ("terminate called without an active exception", status 134). The CLI runs in a forked child whose engine
    thread holds between steps while a file exists, once all four choices have tokens (the gate: the streams stay
    in flight); the
    first Ctrl-C comes once both streams have their first chunk, the second once the server says it waits for
    connections, and the file is removed after it (the held step ends, as a long step would)."""
    import signal
    import socket

    from lk_forked import Child, _run_code

    hold = tmp_path / "hold"
    hold.write_text("")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["serve", "--adapters", str(setup["root"]), "--max-loras", "2", "--kv-cache-mb", "8", "--port", str(port)]
    err = tmp_path / "stderr.txt"
    code = f"HOLD = {str(hold)!r}\nARGV = {argv!r}\nCHOICES = 4\n" + HELD_SERVE  # 2 streams x n=2
    proc = Child(_run_code, (code, dict(os.environ), os.devnull, str(err), str(tmp_path)))
    url = f"http://127.0.0.1:{port}"
    streamed, first = [], threading.Semaphore(0)

    def stream():
        body = {"model": "ad1", "prompt": "Hi", "max_tokens": 50, "n": 2, "stream": True, "ignore_eos": True}
        lines, seen = [], False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and not seen:
                    seen = True
                    first.release()
                if line:
                    lines.append(line)
        streamed.append((r.status_code, lines[-1]))

    clients = [threading.Thread(target=stream, daemon=True) for _ in range(2)]
    try:
        while True:
            assert proc.poll() is None, err.read_text()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        for c in clients:
            c.start()
        for _ in clients:
            assert first.acquire(timeout=300)
        os.kill(proc.process.pid, signal.SIGINT)
        while "Waiting for connections to close" not in err.read_text():
            assert proc.poll() is None, err.read_text()[-2000:]
            time.sleep(0.05)
        os.kill(proc.process.pid, signal.SIGINT)
        for c in clients:
            c.join(120)
        hold.unlink()
        status = proc.wait(timeout=120)
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.process.kill()
            proc.wait(timeout=30)
    text = err.read_text()
    assert status in (0, 130), text[-3000:]  # 130: SIGINT re-raised where the terminal's handler is in place
    assert "Traceback" not in text and "terminate called" not in text and "Application shutdown complete" in text, \
        text[-3000:]
    assert len(streamed) == 2
    for code, last in streamed:
        assert code == 200 and last.startswith("data: {"), last
        error = json.loads(last[len("data: "):])["error"]
        assert error["code"] == 503 and error["type"] == "server_error" and "shutting down" in error["message"]


def test_a_cancelled_stream_whose_client_stopped_reading_does_not_hold_up_the_exit(monkeypatch):
    """The answer to a request cancelled by a forced exit goes to its client; one that stopped reading holds that send
    in flow control (uvicorn's ``flow.drain()``) for ever. The answer waits at most CANCELLED_ANSWER_SECONDS (was: the
    forced exit waited on it without end, so a second Ctrl-C could hang the server). A non-stream response that had
    started is ended without an SSE event in its body. ASGI callables on a real event loop, no server."""
    from lorakit.serving import server as server_module

    monkeypatch.setattr(server_module, "CANCELLED_ANSWER_SECONDS", 0.2)

    def app_with(content_type: bytes):
        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
            await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
            await asyncio.Event().wait()  # a stream still running when the forced exit cancels it
        return app

    async def run(content_type: bytes, client_reads: bool):
        sent, reading = [], asyncio.Event()

        async def send(message):
            if len(sent) >= 2 and not client_reads:
                await reading.wait()  # flow control: the client's buffer is full
            sent.append(message)

        async def receive():
            await asyncio.Event().wait()

        task = asyncio.ensure_future(server_module._answer_when_cancelled(app_with(content_type), {"type": "http"},
                                                                          receive, send))
        while len(sent) < 2:
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait_for(task, 30)  # (old code: never done while the client does not read)
        return sent[2:]

    assert asyncio.run(run(b"text/event-stream", client_reads=False)) == []
    tail = asyncio.run(run(b"text/event-stream", client_reads=True))
    assert json.loads(tail[0]["body"].decode().removeprefix("data: "))["error"]["code"] == 503
    assert tail[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert asyncio.run(run(b"application/json", client_reads=True)) == [
        {"type": "http.response.body", "body": b"", "more_body": False}]
