"""The store compares an adapter's ``base_model_name_or_path`` with the served model's ``name_or_path`` and, when
their last path components differ, serves it anyway with a warning (logged once, kept in ``store.warnings``), as the
reference libraries do: PEFT warns in ``get_peft_model`` (peft/mapping_func.py, lines 139-157 of peft 0.21.2) and
does not compare in ``PeftModel.from_pretrained``; vLLM never reads the field. The same model under another path
(another machine's copy, a Hub id) is no mismatch."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import pytest
import torch

from lorakit.hub import load_model_and_tokenizer
from lorakit.serving.engine import Engine
from lorakit.serving.server import create_app
from lorakit.serving.store import AdapterStore

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
peft = pytest.importorskip("peft")


def _bundled():
    return load_model_and_tokenizer()[0]


def _with_base(src, dst, base):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))


def test_peft_warns_on_a_renamed_base_and_loads_without_comparing(tmp_path, sh):
    """The reference behaviour this store follows, from the installed peft."""
    folder = sh.make_adapter(tmp_path / "src", seed=1, factory=_bundled, r=4, target_modules=["q_proj"])
    _with_base(folder, tmp_path / "other", "Qwen/Qwen2-0.5B")
    with pytest.warns(UserWarning, match="`base_model_name_or_path` was renamed from 'Qwen/Qwen2-0.5B'"):
        peft.get_peft_model(_bundled(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                        base_model_name_or_path="Qwen/Qwen2-0.5B"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(_bundled(), tmp_path / "other")
    assert not [w for w in seen if "base_model_name_or_path" in str(w.message)]


def test_an_adapter_for_another_base_name_is_served_with_a_warning(tmp_path, sh, caplog):
    root = tmp_path / "root"
    good = sh.make_adapter(root / "same", seed=1, factory=_bundled, r=4, target_modules=["q_proj", "v_proj"])
    assert json.loads((good / "adapter_config.json").read_text())["base_model_name_or_path"].endswith("base_model")
    _with_base(good, root / "moved", "/another/machine/models/base_model/")  # the same model elsewhere
    _with_base(good, root / "other", "Qwen/Qwen2-0.5B")
    model, tok = load_model_and_tokenizer()
    store = AdapterStore(model, [root])
    with caplog.at_level(logging.WARNING, logger="lorakit.serving"):
        assert store.register_roots([root]) == ["moved", "other", "same"]
    assert list(store.warnings) == ["other"]
    assert "names base_model_name_or_path 'Qwen/Qwen2-0.5B', this server's base is " in store.warnings["other"]
    assert [m for m in caplog.messages if "may be for another base model" in m] == [
        f"adapter 'other' ({(root / 'other').resolve()}) may be for another base model: {store.warnings['other']}"]
    engine = Engine(model, tok, store=store, kv_cache_bytes=4 << 20, max_batch=4)
    server = sh.LiveServer(create_app(engine, model_name="bundled"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        texts = {n: client.completions.create(model=n, prompt="The quick brown fox", max_tokens=6,
                                              temperature=0).choices[0].text for n in ("same", "other")}
        assert texts["other"] == texts["same"]  # served as is: the weights are the same
    finally:
        server.stop()
    store.unregister("other")
    assert store.warnings == {}
