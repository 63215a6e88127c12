"""Bad adapter folders never stop the others (issue 13: "a corrupt adapter file on load: 4xx, the engine keeps
serving the others"; "a server never crashes on a request"). Was: one folder with an invalid adapter_config.json
under --adapters and `lorakit serve` refused to start.

A real server (uvicorn on 127.0.0.1, started here) over a root holding three good adapters, a training run folder
(served as its adapter/, under the run's name) and five bad folders: malformed JSON, an unknown method type, a config
without its weights file, a training run whose adapter/ has malformed JSON, and a config whose r disagrees with its
weights (registering reads configs only, so that one fails when first loaded). The good
adapters answer with the offline result; every bad one gets a 400 with an OpenAI error body saying it failed and
why (never "does not exist"); /v1/models lists only servable adapters, as vLLM lists its loaded ones; loading a
fixed folder under the same name through /v1/load_lora_adapter serves it. The CLI test runs `lorakit serve` on a
root where every folder is bad: it starts, warns, and serves the base model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import httpx
import pytest
import torch

from lk_models import tiny_llama
from lorakit.core.errors import AdapterConflictError, AdapterError, AdapterLoadError, UnknownAdapterError
from lorakit.hub import load_model_and_tokenizer
from lorakit.serving import generate as bank_generate
from lorakit.serving import load_adapters
from lorakit.serving.engine import Engine
from lorakit.serving.sampling import SamplingParams
from lorakit.serving.server import create_app
from lorakit.serving.store import AdapterStore

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

TARGETS = ["q_proj", "v_proj"]
GOOD = ["g0", "g1", "g2"]
PROMPT = "The quick brown fox"
# folder -> what the 400 (and the startup warning) must say about it
REGISTER_FAILS = {"bad_json": "adapter_config.json is not valid JSON",
                  "bad_method": "peft_type 'NOT_A_METHOD' is not supported by lorakit",
                  "no_weights": "has no adapter_model.safetensors",
                  "bad_run": "adapter/adapter_config.json is not valid JSON"}
SHAPE = "has shape (4, 256) but this model and config (r / rank_pattern, module size) expect (8, 256)"
# folders whose config says r=8 over rank-4 weights (they register; their weights fail on first load), one per way of
# meeting that first load: each endpoint, streamed or not, a weighted mix, Self-MoA, an attached (DoRA) adapter
FIRST_LOAD = {"late_cmpl": ("completions", False), "late_cmpl_stream": ("completions", True),
              "late_chat": ("chat", False), "late_chat_stream": ("chat", True), "late_mix": ("mix", False),
              "late_moa": ("self_moa", False), "late_moa_chat_stream": ("self_moa_chat", True),
              "late_dora": ("completions", False), "late_dora_stream": ("chat", True)}
# what every request naming one gets once its load failed: the reason recorded then (store.failed), with the way to
# serve it again (the contract of the module docstring and of test_a_skipped_adapter_is_a_400_with_its_reason...)
HINT = "; fix its folder, then load it again with POST /v1/load_lora_adapter"


def bundled():
    return load_model_and_tokenizer()[0]


def _copy(src, dst, config=None, weights=True):
    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text(config if config is not None else (src / "adapter_config.json").read_text())
    if weights:
        shutil.copy(src / "adapter_model.safetensors", dst / "adapter_model.safetensors")
    return dst


def _with_r(folder, r):
    config = json.loads((folder / "adapter_config.json").read_text())
    return json.dumps({**config, "r": r})


def bad_folders(root, good):
    """The bad folders of the module docstring, built from the good adapter folders ``good`` (name -> folder)."""
    _copy(good["g0"], root / "bad_json", config='{"peft_type": "LORA", "r": 4,')
    _copy(good["g0"], root / "bad_method", config=json.dumps({"peft_type": "NOT_A_METHOD", "r": 4, "lora_alpha": 8,
                                                              "target_modules": TARGETS}))
    _copy(good["g0"], root / "no_weights", weights=False)
    _copy(good["g0"], root / "run" / "adapter")  # `lorakit train --output run` holds its adapter in run/adapter
    _copy(good["g0"], root / "bad_run" / "adapter", config="{")
    _copy(good["g1"], root / "bad_rank", config=_with_r(good["g1"], 8))  # weights of rank 4, config says 8
    for name in FIRST_LOAD:
        src = good["dora"] if "dora" in name else good["g1"]
        _copy(src, root / name, config=_with_r(src, 8))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def served(tmp_path_factory, sh):
    root = tmp_path_factory.mktemp("mixed")
    good = {n: sh.make_adapter(root / n, seed=60 + i, factory=bundled, r=4, target_modules=TARGETS)
            for i, n in enumerate(GOOD)}
    dora = sh.make_adapter(tmp_path_factory.mktemp("dora") / "dora", seed=7, factory=bundled, r=4,
                           target_modules=TARGETS, use_dora=True)  # served attached, in its own forward
    bad_folders(root, {**good, "dora": dora})
    records = _Records()
    logger = logging.getLogger("lorakit.serving")
    logger.addHandler(records)
    try:
        model, tok = load_model_and_tokenizer()
        store = AdapterStore(model, [root], max_loras=3, max_cpu_loras=8)
        registered = store.register_roots([root])  # as `lorakit serve` and the Ray Serve replicas start
        engine = Engine(model, tok, store=store, kv_cache_bytes=4 << 20, max_batch=4)
        server = sh.LiveServer(create_app(engine, model_name="bundled"))
        reference, _ = load_model_and_tokenizer()
        load_adapters(reference, good)
        yield dict(root=root, good=good, store=store, engine=engine, server=server, tok=tok, reference=reference,
                   registered=registered, warnings=records.messages,
                   client=openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0))
        server.stop()
        assert engine.cache.used_blocks == 0
    finally:
        logger.removeHandler(records)


def offline(s, spec, max_tokens=6):
    """Greedy text of the reference model (per-layer banks, no server) for PROMPT on ``spec``."""
    ids = s["tok"](PROMPT)["input_ids"]
    out = bank_generate(s["reference"], torch.tensor([ids]), [spec], max_new_tokens=max_tokens, do_sample=False)
    new = out[0, len(ids):].tolist()
    eos = s["tok"].eos_token_id
    return s["tok"].decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)


def ask(s, model, **extra):
    return s["client"].completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, **extra)


def test_server_starts_and_good_adapters_answer_as_offline(served):
    s = served
    assert sorted(s["registered"]) == sorted(GOOD + ["run", "bad_rank", *FIRST_LOAD])  # configs only are read now
    for name in GOOD + ["bundled"]:
        assert ask(s, name).choices[0].text == offline(s, None if name == "bundled" else name), name
    assert ask(s, "run").choices[0].text == offline(s, "g0")  # run/adapter holds a copy of g0


def test_each_skipped_folder_is_a_warning_naming_it_and_why(served):
    s = served
    for name, why in REGISTER_FAILS.items():
        hits = [m for m in s["warnings"] if m.startswith(f"skipped adapter folder {s['root'] / name}: ")]
        assert len(hits) == 1 and why in hits[0], (name, s["warnings"])
    skipped = [m for m in s["warnings"] if m.startswith("skipped adapter folder ")]
    assert len(skipped) == len(REGISTER_FAILS)  # nothing is said of the servable ones (bad_rank's weights unread yet)


def test_a_skipped_adapter_is_a_400_with_its_reason_not_unknown(served):
    s = served
    for name, why in REGISTER_FAILS.items():
        with pytest.raises(openai.BadRequestError) as err:
            ask(s, name)
        message = err.value.body["message"]
        assert message.startswith(f"adapter {name!r} failed to register: ") and why in message, message
        assert "POST /v1/load_lora_adapter" in message and "does not exist" not in message
        raw = httpx.post(s["server"].url + "/v1/chat/completions", timeout=60,
                         json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
        assert raw.status_code == 400
        assert raw.json()["error"]["type"] == "invalid_request_error" and raw.json()["error"]["code"] == 400
        assert why in raw.json()["error"]["message"]
        mix = httpx.post(s["server"].url + "/v1/completions", timeout=60,  # a weighted mix naming it, too
                         json={"model": "bundled", "prompt": PROMPT, "adapters": {"g0": 0.5, name: 0.5}})
        assert mix.status_code == 400 and why in mix.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):  # a name no folder has stays a 404
        ask(s, "g9")


def test_models_lists_only_servable_adapters(served):
    s = served
    listed = [m.id for m in s["client"].models.list()]
    assert set(GOOD) <= set(listed) and "bundled" in listed
    assert not set(REGISTER_FAILS) & set(listed)


def test_weights_that_fail_on_first_load_are_a_400_and_unlisted_the_others_keep_serving(served):
    """A config whose r disagrees with its weights registers (weights are read on first use, S-LoRA's disk tier);
    its first request fails with the shape error, later ones with the same reason (was: "does not exist", the
    failed load having silently unregistered it), and /v1/models stops listing it."""
    s = served
    assert "bad_rank" in [m.id for m in s["client"].models.list()]
    with pytest.raises(openai.BadRequestError, match=r"lora_A\.weight' " + SHAPE.replace("(", r"\(").replace(")", r"\)")):
        ask(s, "bad_rank")
    for _ in range(2):
        with pytest.raises(openai.BadRequestError) as err:
            ask(s, "bad_rank")
        message = err.value.body["message"]
        assert message.startswith("adapter 'bad_rank' failed to load: ") and SHAPE in message, message
        assert "adapter_config.json gives" in message and "r=8 (r / rank_pattern), but the tensors were saved with r=4" \
            in message, message  # the config field, as load_adapter names it
    assert "bad_rank" not in [m.id for m in s["client"].models.list()]
    assert any(m.startswith("adapter 'bad_rank' (") and SHAPE in m for m in s["warnings"])
    assert ask(s, "g2").choices[0].text == offline(s, "g2")


def _request(s, name, way, stream):
    """One request naming adapter ``name`` the ``way`` FIRST_LOAD says, through the openai client (a stream is read
    to its end); returns the 400's error body."""
    client = s["client"]
    chat = [{"role": "user", "content": "hi"}]
    kw = dict(max_tokens=4, temperature=0, stream=stream)
    with pytest.raises(openai.BadRequestError) as err:
        if way == "completions":
            out = client.completions.create(model=name, prompt=PROMPT, **kw)
        elif way == "chat":
            out = client.chat.completions.create(model=name, messages=chat, **kw)
        elif way == "mix":
            out = client.completions.create(model="bundled", prompt=PROMPT,
                                            extra_body={"adapters": {"g0": 0.5, name: 0.5}}, **kw)
        elif way == "self_moa":
            out = client.completions.create(model=name, prompt=PROMPT, extra_body={"self_moa": {"n": 2}}, **kw)
        else:
            out = client.chat.completions.create(model=name, messages=chat, extra_body={"self_moa": {"n": 2}}, **kw)
        if stream:
            list(out)
    assert err.value.status_code == 400
    return err.value.body


@pytest.mark.parametrize("name", list(FIRST_LOAD))
def test_the_first_request_to_weights_that_fail_reads_as_every_later_one(served, name):
    """Was: the request whose load met the failure got the raw reason (streamed: a 200 whose stream carried a
    "server_error" 500 event), later ones "adapter 'x' failed to load: ..." with the hint. Expected from the contract:
    every request, the first included, gets the same 400 whose message is the recorded reason plus the hint."""
    s = served
    way, stream = FIRST_LOAD[name]
    bodies = [_request(s, name, way, stream) for _ in range(3)]
    assert bodies[0] == bodies[1] == bodies[2], bodies
    message = bodies[0]["message"]
    assert message == s["store"].failed[name] + HINT, message
    assert message.startswith(f"adapter {name!r} failed to load: ") and message.endswith(HINT), message
    assert SHAPE in message and bodies[0]["type"] == "invalid_request_error" and bodies[0]["code"] == 400
    assert name not in [m.id for m in s["client"].models.list()]
    assert ask(s, "g0").choices[0].text == offline(s, "g0")  # the others keep serving


def test_loading_a_fixed_folder_under_its_name_serves_it(served):
    s = served
    root, url = s["root"], s["server"].url

    def load(name):
        return httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(root / name)},
                          timeout=60)

    # still broken: refused with the new reason, and requests say that reason from now on
    (root / "bad_method" / "adapter_config.json").write_text("[]")
    r = load("bad_method")
    assert r.status_code == 400 and "must hold a JSON object" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="must hold a JSON object") as err:
        ask(s, "bad_method")
    assert err.value.body == r.json()["error"]  # the load's answer is what requests for the name get from now on
    assert r.json()["error"]["message"] == s["store"].failed["bad_method"] + HINT
    # a new name whose weights fail when the load reads them: the same message for the load and the requests after
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "late_again", "lora_path": "late_cmpl"},
                   timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("adapter 'late_again' failed to load: ") and SHAPE in r.text
    with pytest.raises(openai.BadRequestError) as err:
        ask(s, "late_again")
    assert err.value.body == r.json()["error"]
    with pytest.raises(openai.BadRequestError, match="failed to load"):  # (its first load, when this test runs alone)
        ask(s, "bad_rank")
    # fixed: the same weights under a valid config serve as the adapter they were copied from
    (root / "bad_json" / "adapter_config.json").write_text((s["good"]["g0"] / "adapter_config.json").read_text())
    (root / "bad_rank" / "adapter_config.json").write_text(_with_r(root / "bad_rank", 4))
    for name, same_as in (("bad_json", "g0"), ("bad_rank", "g1")):
        r = load(name)
        assert r.status_code == 200, r.text
        assert ask(s, name).choices[0].text == offline(s, same_as), name
        assert name in [m.id for m in s["client"].models.list()]
        assert name not in s["store"].failed
    # unloading a skipped name forgets it: it is then unknown (404), as any name without a folder
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "no_weights"}, timeout=60).status_code == 200
    with pytest.raises(openai.NotFoundError):
        ask(s, "no_weights")


def test_a_mix_with_a_bad_adapter_fails_alone_and_its_good_adapter_stays(tmp_path, sh):
    """Loading into the banks is all or nothing; a request mixing a good adapter with one whose weights disagree with
    its config used to unregister both."""
    good = sh.make_adapter(tmp_path / "good", seed=3, r=4)
    _copy(good, tmp_path / "bad", config=_with_r(good, 8))
    model = tiny_llama()
    store = AdapterStore(model, [tmp_path], max_loras=4)
    assert store.register_dir(tmp_path) == ["bad", "good"]
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4)
    prompt = [5, 9, 11, 4]
    mix, = engine.generate([prompt], [{"good": 0.5, "bad": 0.5}], SamplingParams(max_tokens=3))
    assert mix.finish_reason == "error" and "expect (8, " in mix.error
    assert store.names() == ["good"] and store.failed["bad"].startswith("adapter 'bad' failed to load: ")
    alone, = engine.generate([prompt], ["good"], SamplingParams(max_tokens=3))
    reference = tiny_llama()
    load_adapters(reference, {"good": good})
    expected = bank_generate(reference, torch.tensor([prompt]), ["good"], max_new_tokens=3, do_sample=False)
    expected, eos = expected[0, len(prompt):].tolist(), reference.config.eos_token_id
    assert alone.error is None and alone.output_ids == (expected[: expected.index(eos) + 1] if eos in expected
                                                        else expected)
    with pytest.raises(AdapterLoadError, match="failed to load"):
        engine.submit(prompt, "bad")


@pytest.mark.parametrize("dora", [False, True], ids=["banked", "attached"])
def test_ensure_resident_raises_the_recorded_reason_first_and_later(tmp_path, sh, dora):
    """What a Ray Serve replica's ``_load_adapter`` (and an engine admitting a request) calls: the load that meets the
    failure raises the reason it records, ``adapter 'bad' failed to load: <why>``, as every later call does (was: the
    raw reason first, the recorded one after)."""
    good = sh.make_adapter(tmp_path / "src" / "good", seed=3, r=4, use_dora=dora)
    _copy(good, tmp_path / "root" / "bad", config=_with_r(good, 8))
    store = AdapterStore(tiny_llama(), [tmp_path / "root"], max_loras=2)
    store.register_roots([tmp_path / "root"])
    raised = []
    for _ in range(3):
        with pytest.raises(AdapterLoadError) as err:
            store.ensure_resident("bad")
        raised.append(str(err.value))
    assert raised[0] == raised[1] == raised[2] == store.failed["bad"], raised
    assert raised[0].startswith("adapter 'bad' failed to load: ") and "expect (8, " in raised[0]


def test_register_dir_raises_unless_asked_to_skip(tmp_path, sh, caplog):
    """``register_dir`` keeps raising by default (``lorakit bench serve`` wrote its folders itself: a failure there is
    a bug, not a folder to skip); ``register_roots`` warns when nothing at all can be served."""
    good = sh.make_adapter(tmp_path / "root" / "good", seed=1, r=4)
    _copy(good, tmp_path / "root" / "bad", config="{")
    store = AdapterStore(tiny_llama(), [tmp_path / "root"])
    with pytest.raises(AdapterLoadError, match="is not valid JSON"):
        store.register_dir(tmp_path / "root")
    with pytest.raises(AdapterError, match="on_error must be 'raise' or 'skip'"):
        store.register_dir(tmp_path / "root", on_error="ignore")
    assert store.register_dir(tmp_path / "root", on_error="skip") == ["good"]
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="lorakit.serving"):
        assert AdapterStore(tiny_llama(), [tmp_path / "empty"]).register_roots([tmp_path / "empty"]) == []
    assert f"no adapter folders (with adapter_config.json) were found under {tmp_path / 'empty'}; serving the base " \
           "model only" in caplog.text
    for root, says in ((tmp_path / "nope", "does not exist"), (good, "is an adapter folder itself")):
        with pytest.raises(AdapterError, match=says):  # a bad root is the caller's mistake: raised, never skipped
            store.register_roots([root])


def test_register_dir_skips_a_name_being_unloaded_and_records_nothing(tmp_path, sh, caplog):
    """A folder whose name is being unloaded (unregistered while a running request holds it) is no fault of the
    folder: ``register_dir(on_error="skip")`` leaves it out with a warning and records nothing (was: recorded in
    ``store.failed`` as "failed to register", so a new request for the name was refused with AdapterLoadError, a 400
    telling the user to fix a folder that is fine); with the default ``on_error="raise"`` the AdapterConflictError is
    raised. A new request for the name meanwhile is an unknown adapter, as after any unload. Once the running request
    has finished on it, registering the root again serves the folder, greedy tokens equal to the running request's."""
    root = tmp_path / "root"
    sh.make_adapter(root / "busy", seed=5, r=4)
    model = tiny_llama()
    store = AdapterStore(model, [root])
    assert store.register_dir(root) == ["busy"]
    engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    running = engine.submit([4, 5, 6], "busy", params)
    engine.step()  # admitted: it holds "busy" until it finishes
    store.unregister("busy")
    with caplog.at_level(logging.WARNING, logger="lorakit.serving"):
        assert store.register_dir(root, on_error="skip") == []
    assert "busy" not in store.failed and "busy" not in store.failed_folders
    assert f"skipped adapter folder {root / 'busy'} for now: adapter 'busy' is being unloaded" in caplog.text
    with pytest.raises(AdapterConflictError, match="'busy' is being unloaded"):
        store.register_dir(root)
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'busy'"):
        engine.submit([4, 5, 6], "busy")
    while not running.done.is_set():
        engine.step()
    assert running.finish_reason == "length" and "busy" not in store.resident
    assert store.register_dir(root, on_error="skip") == ["busy"]
    again, = engine.generate([[4, 5, 6]], ["busy"], params)
    assert again.error is None and again.output_ids == running.output_ids and len(again.output_ids) == 6


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any folder")
def test_an_unreadable_root_is_named(tmp_path):
    from lorakit.serving.store import check_adapter_roots

    root = tmp_path / "locked"
    root.mkdir()
    root.chmod(0)
    try:
        with pytest.raises(AdapterError, match=f"adapters '{root}' cannot be read"):
            check_adapter_roots([root])
    finally:
        root.chmod(0o755)


def test_cli_serve_with_only_bad_adapters_warns_and_serves_the_base(tmp_path, sh):
    """``lorakit serve`` as a user runs it, on a root where every folder is bad: it starts, says on stderr which
    folders it skipped and why and that only the base is served, answers for the base, and a 400 for a bad one."""
    good = {"g0": sh.make_adapter(tmp_path / "src" / "g0", seed=5, factory=bundled, r=4, target_modules=TARGETS)}
    root = tmp_path / "adapters"
    root.mkdir()
    _copy(good["g0"], root / "bad_json", config="{oops")
    _copy(good["g0"], root / "bad_method", config=json.dumps({"peft_type": "NOT_A_METHOD", "r": 4}))
    log = tmp_path / "stderr.txt"
    proc, url = sh.start_cli_server(["--adapters", str(root), "--kv-cache-mb", "8"], log)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert client.completions.create(model="bundled", prompt=PROMPT, max_tokens=3, temperature=0).choices[0].text
        with pytest.raises(openai.BadRequestError, match="'bad_json' failed to register: .*is not valid JSON"):
            client.completions.create(model="bad_json", prompt=PROMPT, max_tokens=3)
        assert [m.id for m in client.models.list()] == ["bundled"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert f"WARNING: skipped adapter folder {root / 'bad_json'}: {root / 'bad_json' / 'adapter_config.json'} is not " \
           f"valid JSON" in text, text
    assert f"skipped adapter folder {root / 'bad_method'}: " in text and "NOT_A_METHOD" in text
    assert f"all 2 adapter folder(s) failed to register under {root}; serving the base model only" in text


def test_a_folder_named_like_the_base_model_or_taken_by_an_earlier_root_is_skipped_with_a_reason(tmp_path, sh, caplog):
    """Was: a folder named like the base model registered but every request for it went to the base (and /v1/models
    listed the name twice); a folder whose name an earlier root already served was dropped without a word."""
    sh.make_adapter(tmp_path / "r1" / "bundled", seed=1, r=4)
    first = sh.make_adapter(tmp_path / "r1" / "same", seed=2, r=4)
    sh.make_adapter(tmp_path / "r2" / "same", seed=3, r=4)
    store = AdapterStore(tiny_llama(), [tmp_path / "r1", tmp_path / "r2"], base_name="bundled")
    with caplog.at_level(logging.WARNING, logger="lorakit.serving"):
        assert store.register_roots([tmp_path / "r1", tmp_path / "r2"]) == ["same"]
    assert store.paths["same"].resolve() == first.resolve()
    assert "is the base model's name" in store.failed["bundled"]
    assert f"skipped adapter folder {tmp_path / 'r2' / 'same'}: an adapter named 'same' is already served from" \
           in caplog.text
    with pytest.raises(AdapterLoadError, match="is the base model's name"):
        store.check("bundled")


def test_a_broken_folder_under_an_earlier_root_keeps_its_name(tmp_path, sh, caplog):
    """Several roots: a name belongs to the first root that has it (the rule for a served name already). Was: when
    that folder failed to register, a later root's folder of the same name was served in its place without a word.
    Now the later folder is skipped with a warning naming both folders, and requests get the owner's reason."""
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    good = sh.make_adapter(r2 / "x", seed=2, r=4)
    _copy(good, r1 / "x", config="{")  # the owner: broken
    sh.make_adapter(r2 / "y", seed=3, r=4)  # only under the later root: served from there
    store = AdapterStore(tiny_llama(), [r1, r2])
    with caplog.at_level(logging.WARNING, logger="lorakit.serving"):
        assert store.register_roots([r1, r2]) == ["y"]
    assert "x" not in store.paths and store.failed_folders["x"] == r1 / "x"
    owner_reason = f"adapter 'x' failed to register: {r1 / 'x' / 'adapter_config.json'} is not valid JSON"
    assert store.failed["x"].startswith(owner_reason), store.failed["x"]
    skipped = [m for m in caplog.messages if m.startswith(f"skipped adapter folder {r2 / 'x'}: ")]
    assert len(skipped) == 1 and f"belongs to {r1 / 'x'}" in skipped[0], caplog.messages
    with pytest.raises(AdapterLoadError) as err:
        store.check("x")
    assert str(err.value) == store.failed["x"]
    # scanning the roots again changes nothing (y stays registered, x refused); the owner's own folder, fixed, is
    # registered on the next scan
    assert store.register_roots([r1, r2]) == [] and store.names() == ["y"] and "x" in store.failed
    (r1 / "x" / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    assert store.register_dir(r1) == ["x"] and store.paths["x"] == (r1 / "x").resolve()
    assert "x" not in store.failed and "x" not in store.failed_folders


def test_a_relative_load_path_is_taken_from_the_first_root_that_has_it(tmp_path, sh):
    """/v1/load_lora_adapter's relative ``lora_path``: under the first root holding it, as names are owned (was:
    always under the first root, so a folder only under the second root 'does not exist')."""
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    sh.make_adapter(r1 / "both", seed=1, r=4)
    sh.make_adapter(r2 / "both", seed=2, r=4)
    sh.make_adapter(r2 / "later", seed=3, r=4)
    r1.joinpath("other").mkdir()
    store = AdapterStore(tiny_llama(), [r1, r2])
    assert store.register("a", "both") == (r1 / "both").resolve()
    assert store.register("b", "later") == (r2 / "later").resolve()
    with pytest.raises(AdapterError, match="adapter path 'nowhere' does not exist"):
        store.register("c", "nowhere")


def test_cli_serve_with_two_roots_refuses_a_broken_owner_and_warns_naming_both(tmp_path, sh):
    """``lorakit serve --adapters R1 --adapters R2`` as a user runs it: R1/x is broken and R2/x good; x is a 400 with
    R1/x's reason (never R2/x's answers), the warning names both folders, and R2's other adapter is served."""
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    good = sh.make_adapter(r2 / "x", seed=5, factory=bundled, r=4, target_modules=TARGETS)
    _copy(good, r1 / "x", config="{oops")
    sh.make_adapter(r2 / "y", seed=6, factory=bundled, r=4, target_modules=TARGETS)
    log = tmp_path / "stderr.txt"
    proc, url = sh.start_cli_server(["--adapters", str(r1), "--adapters", str(r2), "--kv-cache-mb", "8"], log)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="x", prompt=PROMPT, max_tokens=3)
        message = err.value.body["message"]
        assert message.startswith(f"adapter 'x' failed to register: {r1 / 'x' / 'adapter_config.json'} is not valid "
                                  f"JSON") and message.endswith(HINT), message
        assert [m.id for m in client.models.list()] == ["bundled", "y"]
        assert client.completions.create(model="y", prompt=PROMPT, max_tokens=3, temperature=0).choices[0].text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert f"WARNING: skipped adapter folder {r2 / 'x'}: the name 'x' belongs to {r1 / 'x'}" in text, text


def test_a_failed_adapter_says_how_this_deployment_serves_it_again(tmp_path, sh):
    """The 400 for an adapter whose folder failed ends with how to serve it again where it is served: ``lorakit serve``
    says to POST /v1/load_lora_adapter; an app built for Ray Serve replicas (``create_app(reload=...)``, which refuse
    that endpoint) says to deploy again, never to POST an endpoint that answers 400 there (was: the same POST hint)."""
    root = tmp_path / "root"
    good = sh.make_adapter(root / "ok", seed=3, r=4, target_modules=TARGETS)
    _copy(good, root / "broken", config='{"peft_type": "LORA", "r": 4,')
    ray_hint = "deploy again (serve.run): replicas register their adapter folders when they start"
    for reload, hint in [(None, HINT), (ray_hint, f"; fix its folder, then {ray_hint}")]:
        model = tiny_llama()
        store = AdapterStore(model, [root])
        store.register_dir(root, on_error="skip")
        engine = Engine(model, store=store, kv_cache_bytes=1 << 20, block_size=4)
        app = create_app(engine, model_name="tiny", **({} if reload is None else {"reload": reload}))
        server = sh.LiveServer(app)
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(model="broken", prompt=[5, 6, 7], max_tokens=2)
            message = e.value.body["message"]
            assert message.startswith("adapter 'broken' failed to register: ") and message.endswith(hint), message
            assert ("load_lora_adapter" in message) == (reload is None)
        finally:
            server.stop()
