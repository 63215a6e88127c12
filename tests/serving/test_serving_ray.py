"""Ray Serve scale-out (lorakit.serving.ray_serve): a real local Ray Serve with two replicas; requests for an
adapter go to the replica that holds it (Ray Serve model multiplexing) and give the same greedy tokens as the
single-process banks."""

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
        eos = tok.eos_token_id
        out = out[: out.index(eos)] if eos in out else out
        assert first[name]["token_ids"] == out and first[name]["adapter"] == name, name


@slow
def test_http_errors_are_4xx_and_the_replicas_keep_serving(ray_app):
    handle, dirs = ray_app
    url = "http://127.0.0.1:8000/"
    r = httpx.post(url, headers={"serve_multiplexed_model_id": "nope"}, json={"prompt": "x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"].startswith("unknown adapter 'nope'.")
    r = httpx.post(url, headers={"serve_multiplexed_model_id": "bad_json"}, json={"prompt": "x"}, timeout=60)
    assert r.status_code == 400 and "'bad_json' failed to register: " in r.json()["error"]
    assert "adapter_config.json is not valid JSON" in r.json()["error"]
    # weights that fail on first load: the replica that met the failure and later requests say the same
    said = [httpx.post(url, headers={"serve_multiplexed_model_id": "bad_rank"}, json={"prompt": "x"}, timeout=60)
            for _ in range(4)]
    assert {r.status_code for r in said} == {400}
    messages = {r.json()["error"] for r in said}
    assert all(m.startswith("adapter 'bad_rank' failed to load: ") and "expect (8, " in m for m in messages), messages
    assert len(messages) == 1, messages
    r = httpx.post(url, content=b"{not json", timeout=60)
    assert r.status_code == 400
    r = httpx.post(url, json={"prompt": "x", "max_tokenz": 3}, timeout=60)
    assert r.status_code == 400 and "max_tokenz" in r.json()["error"]
    name = sorted(dirs)[0]
    r = httpx.post(url, headers={"serve_multiplexed_model_id": name}, json={"prompt": "x", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200 and r.json()["adapter"] == name and len(r.json()["token_ids"]) <= 2
    assert torch.tensor(r.json()["token_ids"]).dtype == torch.long


def test_a_bad_root_fails_the_deployment_before_any_replica_starts(tmp_path):
    from lorakit.core.errors import AdapterError
    from lorakit.serving.ray_serve import deployment

    with pytest.raises(AdapterError, match=f"adapters '{tmp_path / 'nope'}' does not exist"):
        deployment(None, [str(tmp_path / "nope")])
