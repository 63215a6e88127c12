"""Ray Serve scale-out (lorakit.serving.ray_serve): a real local Ray Serve with two replicas; requests for an
adapter go to the replica that holds it (Ray Serve model multiplexing) and give the same greedy text as the
single-process banks; replies, errors and streams are those of ``lorakit serve``'s app (OpenAI's shapes, the real
``openai`` client against a replica)."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest
import torch

pytest.importorskip("ray.serve")

slow = pytest.mark.slow  # starting Ray and two replicas takes 1-2 minutes on a small machine


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory):
    import ray
    from ray import serve

    from lorakit.bench.serving import write_random_adapters
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.serving.ray_serve import deployment

    root = tmp_path_factory.mktemp("adapters")
    dirs = write_random_adapters(load_model_and_tokenizer()[0], root, 3, r=4, alpha=8)
    bad = root / "bad_json"  # skipped by every replica at start; the others are served
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA",')
    late = root / "bad_rank"  # registers (r=8 in its config), its rank-4 weights fail on first load
    late.mkdir()
    first = next(iter(dirs.values()))
    config = json.loads((first / "adapter_config.json").read_text())
    (late / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    shutil.copy(first / "adapter_model.safetensors", late / "adapter_model.safetensors")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = serve.run(deployment(None, [str(root)], num_replicas=2, max_loras_per_replica=2), route_prefix="/")
        yield handle, {d.name: d for d in dirs.values()}
    finally:
        serve.shutdown()
        ray.shutdown()


def _ask(handle, adapter, prompt="def add(a, b):", n=5):
    return handle.options(multiplexed_model_id=adapter).remote(
        {"prompt": prompt, "max_tokens": n, "temperature": 0}).result()


def _text(tok, ids):
    eos = tok.eos_token_id
    return tok.decode(ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=True)


@slow
def test_requests_route_to_the_replica_holding_the_adapter(ray_app):
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.serving import generate, load_adapters

    handle, dirs = ray_app
    names = sorted(dirs)
    first = {name: _ask(handle, name) for name in names}
    time.sleep(3)  # replicas report their multiplexed adapters to the router asynchronously
    for name in names:
        replicas = {_ask(handle, name)["replica"] for _ in range(4)}
        assert replicas == {first[name]["replica"]}, (name, replicas)  # every later request: the holder
    # greedy tokens equal the single-process banks (reference: lorakit.serving.generate, no Ray)
    model, tok = load_model_and_tokenizer()
    load_adapters(model, dirs)
    ids = tok("def add(a, b):", return_tensors="pt")["input_ids"]
    first[None] = _ask(handle, "")  # an empty multiplexed id: the base model
    for name in names + [None]:
        out = generate(model, ids, [name], max_new_tokens=5, do_sample=False)[0, ids.shape[1]:].tolist()
        reply = first[name]  # lorakit serve's completion object (plus the replica)
        assert reply["object"] == "text_completion" and reply["id"].startswith("cmpl-"), reply
        assert reply["choices"][0]["text"] == _text(tok, out) and reply["model"] == (name or "bundled"), name
        assert reply["usage"]["prompt_tokens"] == ids.shape[1]


@slow
def test_replicas_answer_as_lorakit_serve_and_errors_are_its_4xx(ray_app):
    """The replicas' HTTP replies are lorakit serve's (one code path: its app): the real openai client gets
    completions, streams and n choices; errors have OpenAI's shape and statuses (unknown: 404, a folder that failed
    to register or weights that failed to load: 400 with the recorded reason); handle calls raise the same error."""
    import openai

    from lorakit.serving.server import HTTPError

    handle, dirs = ray_app
    url = "http://127.0.0.1:8000"
    name = sorted(dirs)[0]
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                           default_headers={"serve_multiplexed_model_id": name})
    r = client.completions.create(model=name, prompt="def add(a, b):", max_tokens=5, temperature=0)
    assert r.choices[0].text and r.choices[0].text == _ask(handle, name)["choices"][0]["text"]  # real text, equal
    assert r.usage.completion_tokens <= 5
    streamed = client.completions.create(model=name, prompt="def add(a, b):", max_tokens=5, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    two = client.completions.create(model=name, prompt="x", max_tokens=3, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text and two.choices[0].text == two.choices[1].text
    raw = httpx.post(url + "/v1/completions", headers={"serve_multiplexed_model_id": name},
                     json={"model": name, "prompt": "x", "max_tokens": 2}, timeout=60)
    assert raw.status_code == 200 and raw.headers["x-lorakit-replica"]
    assert {"bundled", *dirs} <= {m.id for m in client.models.list()}  # (+ bad_rank until a replica loads it)
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "n", "lora_path": "n"}, timeout=60)
    assert r.status_code == 400 and "deploy again" in r.json()["error"]["message"]  # one replica would, not all

    def post(model, **body):
        return httpx.post(url + "/v1/completions", headers={"serve_multiplexed_model_id": model},
                          json={"model": model, "prompt": "x", **body}, timeout=60)
    r = post("nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert "unknown adapter 'nope'." in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="unknown adapter 'nope'"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    r = post("bad_json")
    assert r.status_code == 400 and "'bad_json' failed to register: " in r.json()["error"]["message"]
    assert "adapter_config.json is not valid JSON" in r.json()["error"]["message"]
    # how to serve it again here: deploy again (the load endpoint is a 400 on replicas, as checked above)
    assert r.json()["error"]["message"].endswith("then deploy again (serve.run): replicas register their adapter "
                                                 "folders when they start")
    # weights that fail on first load: the replica that met the failure and later requests say the same
    said = [post("bad_rank") for _ in range(4)]
    assert {r.status_code for r in said} == {400}
    messages = {r.json()["error"]["message"] for r in said}
    assert all(m.startswith("adapter 'bad_rank' failed to load: ") and "expect (8, " in m for m in messages), messages
    assert len(messages) == 1, messages
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(name, max_tokens=0)
    assert r.status_code == 400 and r.json()["error"]["code"] == 400 and "max_tokens" in r.json()["error"]["message"]
    with pytest.raises(HTTPError) as e:
        handle.options(multiplexed_model_id="nope").remote({"prompt": "x"}).result()
    assert e.value.status == 404 and e.value.kind == "not_found_error" and "unknown adapter 'nope'" in e.value.message
    assert client.completions.create(model=name, prompt="x", max_tokens=2).choices[0].text is not None


def _comparable(reply: dict) -> dict:
    """A completion object without what differs between any two replies (its id, its creation time)."""
    return {k: v for k, v in reply.items() if k not in ("id", "created")}


@slow
def test_ray_replies_equal_the_plain_servers_for_the_same_request(ray_app, sh):
    """The same requests to ``lorakit serve``'s app in this process (over the same adapter root) and to the Ray
    deployment, over HTTP and through the handle: the same completion objects (OpenAI's keys and nothing else, e.g.
    no ``token_ids`` on one side only; ids and times aside), the handle's with ``replica`` added; the same
    content-type; streams with the same events."""
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.serving.engine import Engine
    from lorakit.serving.server import create_app
    from lorakit.serving.store import AdapterStore

    handle, dirs = ray_app
    name = sorted(dirs)[0]
    root = dirs[name].parent
    model, tok = load_model_and_tokenizer()
    store = AdapterStore(model, [root], max_loras=2)
    store.register_roots([root])
    plain = sh.LiveServer(create_app(Engine(model, tok, store=store, kv_cache_bytes=4 << 20), model_name="bundled"))
    ray_url = "http://127.0.0.1:8000"
    try:
        for path, body in [("/v1/completions", {"model": name, "prompt": "def add(a, b):", "max_tokens": 5,
                                                "temperature": 0, "n": 2}),
                           ("/v1/chat/completions", {"model": name, "max_tokens": 4, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"model": "bundled", "prompt": "x", "max_tokens": 3, "seed": 4})]:
            ours = httpx.post(plain.url + path, json=body, timeout=60)
            theirs = httpx.post(ray_url + path, json=body, timeout=60,
                                headers={"serve_multiplexed_model_id": "" if body["model"] == "bundled" else name})
            assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
            assert _comparable(theirs.json()) == _comparable(ours.json()), path
            assert theirs.headers["content-type"] == ours.headers["content-type"] and theirs.headers[
                "x-lorakit-replica"]
            if path == "/v1/completions":
                via_handle = handle.options(multiplexed_model_id="" if body["model"] == "bundled" else name).remote(
                    body).result()
                assert set(via_handle) == set(ours.json()) | {"replica"}
                assert _comparable({k: v for k, v in via_handle.items() if k != "replica"}) == \
                    _comparable(ours.json())
        body = {"model": name, "prompt": "def add(a, b):", "max_tokens": 5, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        for url, headers in ((plain.url, {}), (ray_url, {"serve_multiplexed_model_id": name})):
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            events.append([line if line == "data: [DONE]" else _comparable(json.loads(line[6:])) for line in lines])
        assert events[0] == events[1] and events[0][-1] == "data: [DONE]"
    finally:
        plain.stop()


def test_a_replica_relays_repeated_headers_as_sent(sh):
    """A replica re-sends its app's reply through ``ray_serve.relay``: headers the app repeats (two ``set-cookie``)
    stay two headers (were merged into a dict, which kept the last), its body streams unchanged, and the replica's
    id is added. A real uvicorn server whose route relays a real Starlette app, as a replica's ``__call__`` does."""
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    from lorakit.serving.ray_serve import REPLICA_HEADER, _asgi, relay

    async def cookies(request):
        response = Response(b'{"ok": true}', media_type="application/json")
        response.raw_headers += [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]
        return response

    async def stream(request):
        async def parts():
            for i in range(3):
                yield f"data: {i}\n\n"
        return StreamingResponse(parts(), media_type="text/event-stream")

    inner = Starlette(routes=[Route("/cookies", cookies), Route("/stream", stream)])

    async def outer_route(request):
        return relay(*await _asgi(inner, request.scope, request.receive), replica="replica-7")

    outer = sh.LiveServer(Starlette(routes=[Route("/cookies", outer_route), Route("/stream", outer_route)]))
    try:
        r = httpx.get(outer.url + "/cookies", timeout=30)
        assert r.status_code == 200 and r.json() == {"ok": True}
        assert r.headers.get_list("set-cookie") == ["a=1", "b=2"] and r.headers[REPLICA_HEADER] == "replica-7"
        assert r.headers.get_list("content-type") == ["application/json"]
        r = httpx.get(outer.url + "/stream", timeout=30)
        assert r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n" and r.headers["content-type"].startswith(
            "text/event-stream")
    finally:
        outer.stop()


def test_a_bad_root_fails_the_deployment_before_any_replica_starts(tmp_path):
    from lorakit.core.errors import AdapterError
    from lorakit.serving.ray_serve import deployment

    with pytest.raises(AdapterError, match=f"adapters '{tmp_path / 'nope'}' does not exist"):
        deployment(None, [str(tmp_path / "nope")])


def test_a_replica_shut_down_by_ray_serve_stops_its_engine_and_closes_its_store(tmp_path):
    """Ray Serve calls a deployment's ``__del__`` when it shuts a replica down (ray/serve/_private/replica.py,
    ``call_destructor``); the replica's engine loop then stops and its store's prefetch pool closes. Was: no
    ``__del__``, so the engine thread stepped on until the process was killed. The replica's state is built here as
    its constructor builds it (a real engine and store on the bundled model; the constructor itself needs a running
    Ray Serve replica context); a second call, and one on a replica whose constructor failed early, do nothing."""
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.serving.engine import Engine
    from lorakit.serving.ray_serve import LorakitReplica
    from lorakit.serving.sampling import SamplingParams
    from lorakit.serving.store import AdapterStore

    model, tok = load_model_and_tokenizer()
    store = AdapterStore(model, [tmp_path])
    replica = object.__new__(LorakitReplica)
    replica.engine = Engine(model, tok, store=store, kv_cache_bytes=1 << 20).start()
    [req] = replica.engine.generate(["def add(a, b):"], params=SamplingParams(max_tokens=2, temperature=0))
    assert req.finish_reason == "length" and replica.engine._looping()
    replica.__del__()
    assert not replica.engine._looping() and store._closed
    replica.__del__()
    object.__new__(LorakitReplica).__del__()


def test_a_replica_collected_on_its_engine_thread_stops_the_engine_without_raising(tmp_path):
    """A destructor that raises only prints "Exception ignored in ..." with a traceback. The last reference to a
    replica can drop on its engine's own thread (inside a function the engine runs for it), where
    ``Engine.shutdown`` refuses to wait for the loop it is running in (EngineThreadError): the replica's ``__del__``
    then still stops the loop (right after that step) and closes the store, and raises nothing."""
    import threading

    from lorakit.hub import load_model_and_tokenizer
    from lorakit.serving.engine import Engine
    from lorakit.serving.ray_serve import LorakitReplica
    from lorakit.serving.store import AdapterStore

    model, tok = load_model_and_tokenizer()
    store = AdapterStore(model, [tmp_path])
    replica = object.__new__(LorakitReplica)
    replica.engine = engine = Engine(model, tok, store=store, kv_cache_bytes=1 << 20).start()
    raised = []
    hook, threading.excepthook = threading.excepthook, lambda args: raised.append(args.exc_value)
    try:
        engine.call(replica.__del__)  # the engine thread runs the destructor; call() re-raises what it raises
        for _ in range(500):
            if not engine._looping():
                break
            time.sleep(0.01)
    finally:
        threading.excepthook = hook
    assert not engine._looping() and store._closed and not raised
