"""A server over an engine built without an AdapterStore (``Engine(model)``: the model's banks as loaded, no tiers):
adapters banked through the engine (``engine.call(load_adapters ...)``) are served over HTTP and listed in
/v1/models, as with a store; unknown names are a 404 either way, and a model with no banks at all is no 500. The
real server (uvicorn) and the real ``openai`` client; greedy texts equal offline banked generation
(``lorakit.serving.generate``, no engine)."""

from __future__ import annotations

import httpx
import pytest
import torch

from lorakit.hub import load_model_and_tokenizer
from lorakit.serving import generate as bank_generate
from lorakit.serving import load_adapters
from lorakit.serving.engine import Engine

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

PROMPT = "The quick brown fox"
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _offline(model, tok, spec, max_tokens=6) -> str:
    ids = tok(PROMPT)["input_ids"]
    out = bank_generate(model, torch.tensor([ids]), [spec], max_new_tokens=max_tokens, do_sample=False)
    new = out[0, len(ids):].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    return tok.decode(new, skip_special_tokens=True)


def test_adapters_banked_through_the_engine_are_served_and_listed(tmp_path, sh):
    from lorakit.serving.server import create_app

    dirs = {f"b{i}": sh.make_adapter(tmp_path / f"b{i}", seed=60 + i, factory=lambda: load_model_and_tokenizer()[0],
                                     r=4, target_modules=TARGETS) for i in range(2)}
    model, tok = load_model_and_tokenizer()
    engine = Engine(model, tok, kv_cache_bytes=2 << 20, max_batch=4)  # no store: the model's banks as loaded
    server = sh.LiveServer(create_app(engine, model_name="bundled"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    try:
        # before any adapter is banked: only the base; a name is a 404 (the model has no banks yet: not a 500)
        assert [m.id for m in client.models.list()] == ["bundled"]
        assert "lorakit_resident_adapters 0.0" in httpx.get(server.url + "/metrics").text
        with pytest.raises(openai.NotFoundError, match="unknown adapter 'b0'"):
            client.completions.create(model="b0", prompt=PROMPT, max_tokens=2)
        engine.call(lambda: load_adapters(model, dirs))  # banked through the engine, on its thread
        listed = {m.id: m.model_extra for m in client.models.list()}
        assert set(listed) == {"bundled", "b0", "b1"}
        assert listed["b0"]["parent"] == "bundled" and listed["bundled"]["parent"] is None
        metrics = httpx.get(server.url + "/metrics").text  # what the banks hold is resident, as with a store
        assert "lorakit_resident_adapters 2.0" in metrics and "lorakit_adapter_resident_bytes 0.0" not in metrics
        reference, _ = load_model_and_tokenizer()
        load_adapters(reference, dirs)
        for spec in ("b0", "b1", None):
            r = client.completions.create(model=spec or "bundled", prompt=PROMPT, max_tokens=6, temperature=0)
            assert r.choices[0].text == _offline(reference, tok, spec), spec
        mix = {"b0": 0.7, "b1": 0.3}
        r = httpx.post(server.url + "/v1/completions", json={"model": "bundled", "adapters": mix, "prompt": PROMPT,
                                                             "max_tokens": 6, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == _offline(reference, tok, mix), r.text
        # an unknown name, alone or inside a mix, is a 404 naming it with near matches, as with a store
        with pytest.raises(openai.NotFoundError, match="unknown adapter 'b7'.*b0"):
            client.completions.create(model="b7", prompt=PROMPT, max_tokens=2)
        r = httpx.post(server.url + "/v1/completions", json={"model": "bundled", "prompt": PROMPT,
                                                             "adapters": {"b0": 0.5, "zz": 0.5}}, timeout=60)
        assert r.status_code == 404 and "unknown adapter 'zz'" in r.json()["error"]["message"], r.text
        # loads at runtime need adapter roots: still a 400 that says so
        r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"}, timeout=60)
        assert r.status_code == 400 and "without adapter roots" in r.json()["error"]["message"]
    finally:
        server.stop()
    assert engine.cache.used_blocks == 0
