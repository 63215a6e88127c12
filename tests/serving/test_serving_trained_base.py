"""``lorakit serve`` checks an adapter's trained base as eval / generate / merge do: a folder of a training run whose
``base.json`` records another 4-bit setting than the served base (a QLoRA adapter served on the full-precision base,
a full-precision one on a 4-bit base) would load (the shapes agree) and answer with outputs other than the trained
model's. It is refused when registered, with its run's base.json and the flags named: not listed in /v1/models, a
400 with that reason for requests naming it; the folders that match are served. The run folders hold what ``lorakit
train`` writes: an adapter folder beside base.json, whose content is ``lorakit.cli._base_settings`` of that train
command line (real 4-bit training needs bitsandbytes' CPU forward, which fails on this machine)."""

from __future__ import annotations

import os

import httpx
import pytest

from lorakit.hub import load_model_and_tokenizer
from lorakit.io.files import atomic_write_json
from lorakit.io.peft_format import BASE_FILE

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

TARGETS = ["q_proj", "v_proj"]


def _run_folder(run, folder: str, train_flags: list[str], sh, seed: int):
    """A training run folder as ``lorakit train TRAIN_FLAGS --output RUN`` leaves it: ``folder`` (its adapter/ or a
    checkpoint-N) and base.json with the base settings that command records."""
    from lorakit.cli import _base_settings, build_parser

    args = build_parser().parse_args(["train", *train_flags, "--output", str(run)])
    sh.make_adapter(run / folder, seed=seed, factory=lambda: load_model_and_tokenizer()[0], r=4,
                    target_modules=TARGETS)
    atomic_write_json(run / BASE_FILE, _base_settings(args))
    return run


@pytest.mark.slow  # ~26 s here: a `lorakit serve` subprocess; the store's check runs in the tests below in seconds
def test_cli_serve_refuses_an_adapter_trained_on_another_base(tmp_path, sh):
    qlora = _run_folder(tmp_path / "qlora", "adapter", ["--quantize", "nf4"], sh, seed=1)
    plain = _run_folder(tmp_path / "plain", "checkpoint-2", [], sh, seed=2)
    proc, url = sh.start_cli_server(["--adapters", str(qlora), "--adapters", str(plain), "--kv-cache-mb", "8"],
                                    tmp_path / "stderr.txt", env=dict(os.environ))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert {m.id for m in client.models.list()} == {"bundled", "checkpoint-2"}
        r = client.completions.create(model="checkpoint-2", prompt="The quick brown fox", max_tokens=3,
                                      temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="adapter", prompt="The quick brown fox", max_tokens=3)
        message = e.value.body["message"]
        assert "'adapter' failed to register: " in message and "was trained on another base than this server" \
            in message, message
        assert "--quantize: trained 'nf4', this server None" in message and str(qlora / BASE_FILE) in message
        assert "--double-quant: trained True, this server None" in message
        r = httpx.post(url + "/v1/chat/completions", json={"model": "adapter", "messages": [
            {"role": "user", "content": "hi"}]}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"] == message
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "was trained on another base than this server" in (tmp_path / "stderr.txt").read_text()


def test_store_on_the_full_precision_base_refuses_a_qlora_adapter(tmp_path, sh):
    from lorakit.core.errors import AdapterLoadError
    from lorakit.serving.store import AdapterStore

    qlora = _run_folder(tmp_path / "qlora", "adapter", ["--quantize", "nf4"], sh, seed=1)
    plain = _run_folder(tmp_path / "plain", "checkpoint-2", [], sh, seed=2)
    store = AdapterStore(load_model_and_tokenizer()[0], [qlora, plain])
    assert store.register_roots([qlora, plain]) == ["checkpoint-2"]
    with pytest.raises(AdapterLoadError, match="'adapter' failed to register: .*--quantize: trained 'nf4', this "
                                               "server None"):
        store.check("adapter")


def test_store_on_a_4bit_base_refuses_a_full_precision_adapter(tmp_path, sh):
    """The store reads the served base's 4-bit setting from the model itself (``lorakit_quantize``, set by
    ``load_model_and_tokenizer(quantize=...)``): registering needs no forward, so this runs on the CPU too."""
    pytest.importorskip("bitsandbytes")
    from lorakit.core.errors import AdapterLoadError
    from lorakit.quantize import QuantizeConfig
    from lorakit.serving.store import AdapterStore

    qlora = _run_folder(tmp_path / "qlora", "adapter", ["--quantize", "nf4", "--no-double-quant"], sh, seed=1)
    plain = _run_folder(tmp_path / "plain", "checkpoint-2", [], sh, seed=2)
    model, _ = load_model_and_tokenizer(quantize=QuantizeConfig(quant_type="nf4", double_quant=False))
    store = AdapterStore(model, [qlora, plain])
    assert store.register_roots([qlora, plain]) == ["adapter"]
    assert "--quantize: trained None, this server 'nf4'" in store.failed["checkpoint-2"]
    with pytest.raises(AdapterLoadError, match="trained on another base than this server"):
        store.check("checkpoint-2")
    with pytest.raises(AdapterLoadError, match="--double-quant: trained False, this server True"):
        AdapterStore(load_model_and_tokenizer(quantize="nf4")[0], [qlora]).register_dir(qlora)


def test_an_adapter_whose_run_trained_base_weights_is_refused_not_served_on_the_untouched_base(tmp_path, capsys):
    """Was: a LISA run (its blocks trained in full, kept in trainable_params.safetensors) registered and was served
    as its adapter on the untouched base (here an adapter with B = 0, --no-train-adapter: the base's answers), so
    the server answered as the model the run did not train. The store refuses it, naming the file and `lorakit
    merge`; load_adapters (the banks) too; and a checkpoint of such a run while it is still going (no
    trainable_params.safetensors yet: the checkpoint's own state holds the trained blocks). A plain run and its
    checkpoint are served."""
    from lorakit.cli import main
    from lorakit.core.errors import AdapterError, AdapterLoadError
    from lorakit.serving import load_adapters
    from lorakit.serving.store import AdapterStore

    small = ["--steps", "2", "--batch-size", "2", "--train-examples", "4", "--eval-examples", "2", "--quiet"]
    lisa, plain = tmp_path / "lisa", tmp_path / "plain"
    assert main(["train", "--procedure", "lisa", "--lisa-interval-steps", "1", "--no-train-adapter",
                 "--lisa-activated-layers", "1", *small,
                 "--save-every", "1", "--output", str(lisa)]) == 0
    assert main(["train", *small, "--save-every", "1", "--output", str(plain)]) == 0
    capsys.readouterr()
    store = AdapterStore(load_model_and_tokenizer()[0], [tmp_path])
    with pytest.raises(AdapterLoadError, match=r"its run also trained base tensors in full \(.*lisa/trainable_params"
                                               r"\.safetensors: .*lorakit merge --adapter"):
        store.register("lisa", lisa)
    with pytest.raises(AdapterError, match="its run also trained base tensors in full"):
        load_adapters(load_model_and_tokenizer()[0], {"lisa": lisa / "adapter"})
    (lisa / "trainable_params.safetensors").unlink()  # as while the run is still going: the checkpoint's state says it
    with pytest.raises(AdapterLoadError, match=r"its run also trained base tensors in full \(.*lisa/checkpoint-1/"
                                               r"trainer_state\.safetensors: "):
        store.register("lisa-1", lisa / "checkpoint-1")
    assert store.register("plain-1", plain / "checkpoint-1") == plain / "checkpoint-1"
    assert store.register("plain", plain) == plain / "adapter" and sorted(store.names()) == ["plain", "plain-1"]
