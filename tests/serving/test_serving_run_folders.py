"""``lorakit serve --adapters ROOT`` where ROOT holds training run folders (``lorakit train --output ROOT/name``:
``adapter/``, checkpoints, ``base.json``): each run serves its ``adapter/`` under the run's name, as every command
taking an adapter folder reads a run folder (was: refused with "is a training run folder ...; did you mean
ROOT/name/adapter?"). Loading a run folder through /v1/load_lora_adapter serves it too, and its base.json is checked
as for ``adapter/`` (a QLoRA run is refused on the full-precision base). The runs are real ``lorakit train`` runs."""

from __future__ import annotations

import logging

import httpx
import pytest
import torch

from lorakit.cli import _base_settings, build_parser, main
from lorakit.core.errors import AdapterLoadError
from lorakit.hub import load_model_and_tokenizer
from lorakit.io.files import atomic_write_json
from lorakit.io.peft_format import BASE_FILE
from lorakit.serving import generate as bank_generate
from lorakit.serving import load_adapters
from lorakit.serving.engine import Engine
from lorakit.serving.server import create_app
from lorakit.serving.store import AdapterStore

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

PROMPT = "reverse: a b c =>"
RUNS = ("first", "second")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ROOT with two runs of ``lorakit train --output ROOT/name`` (different seeds and lr, so different adapters)."""
    root = tmp_path_factory.mktemp("runs")
    for i, name in enumerate(RUNS):
        assert main(["train", "--data", "reverse", "--steps", "2", "--batch-size", "2", "--train-examples", "4",
                     "--eval-examples", "2", "--r", "4", "--save-every", "1", "--seed", str(i), "--lr", "0.05",
                     "--output", str(root / name), "--quiet"]) == 0
        assert (root / name / "adapter").is_dir() and (root / name / "checkpoint-1").is_dir()
    return root


def _offline(tok, folder) -> str:
    """Greedy text of the bundled model with ``folder`` banked (no server)."""
    model, _ = load_model_and_tokenizer()
    load_adapters(model, {"x": folder})
    ids = tok(PROMPT)["input_ids"]
    out = bank_generate(model, torch.tensor([ids]), ["x"], max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    eos = tok.eos_token_id
    return tok.decode(out[: out.index(eos)] if eos in out else out, skip_special_tokens=True)


def test_a_root_of_run_folders_serves_each_run_under_its_name(runs, sh, caplog):
    model, tok = load_model_and_tokenizer()
    store = AdapterStore(model, [runs], max_loras=4)
    with caplog.at_level(logging.WARNING, logger="lorakit.serving"):
        assert store.register_roots([runs]) == list(RUNS)
        assert store.register_roots([runs]) == []  # scanning again: the same folders, no "already served" warning
    assert not caplog.messages and not store.failed, (caplog.messages, store.failed)
    assert {n: store.paths[n] for n in RUNS} == {n: (runs / n / "adapter").resolve() for n in RUNS}
    engine = Engine(model, tok, store=store, kv_cache_bytes=4 << 20, max_batch=4)
    server = sh.LiveServer(create_app(engine, model_name="bundled"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list()] == ["bundled", *RUNS]
        for name in RUNS:
            got = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
            assert got == _offline(tok, runs / name / "adapter"), name
        # loaded by its run folder (a path relative to the root): its adapter/, under the name given
        r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": "second"},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert store.paths["again"] == store.paths["second"]
        got = client.completions.create(model="again", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
        assert got == _offline(tok, runs / "second" / "adapter")
    finally:
        server.stop()


def test_a_run_trained_on_another_base_is_refused_with_its_base_json(runs, tmp_path):
    """base.json of the run folder is read for the adapter/ it serves: a QLoRA run (``--quantize nf4``) is refused on
    the full-precision base, named by its run, the others are served."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(runs / "first", root / "plain")
    shutil.copytree(runs / "first", root / "qlora")
    args = build_parser().parse_args(["train", "--quantize", "nf4", "--output", str(root / "qlora")])
    atomic_write_json(root / "qlora" / BASE_FILE, _base_settings(args))
    store = AdapterStore(load_model_and_tokenizer()[0], [root])
    assert store.register_roots([root]) == ["plain"]
    with pytest.raises(AdapterLoadError) as e:
        store.check("qlora")
    assert "'qlora' failed to register: " in str(e.value) and "--quantize: trained 'nf4', this server None" \
        in str(e.value) and str(root / "qlora" / BASE_FILE) in str(e.value)
    with pytest.raises(AdapterLoadError, match="--quantize: trained 'nf4'"):  # by path, through the load endpoint
        store.register("q2", root / "qlora")


def test_cli_serve_on_a_root_of_runs(runs, tmp_path, sh):
    proc, url = sh.start_cli_server(["--adapters", str(runs), "--kv-cache-mb", "8"], tmp_path / "stderr.txt")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list()] == ["bundled", *RUNS]
        _, tok = load_model_and_tokenizer()
        for name in RUNS:
            got = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
            assert got == _offline(tok, runs / name / "adapter"), name
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "skipped adapter folder" not in (tmp_path / "stderr.txt").read_text()
