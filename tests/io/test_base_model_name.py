"""``base_model_name_or_path`` in saved adapters: the bundled bases by name ("bundled", "bundled-small", what
``--model`` takes and ``hub.resolve_model_path`` resolves), since their asset folders' absolute paths name one
checkout only; a user's folder or hub id exactly as given. PEFT reads the field in ``AutoPeftModel*.from_pretrained``
only (``peft/auto.py``: ``base_model_path = peft_config.base_model_name_or_path``, loaded with the auto class), so
an adapter on a user's folder must keep loading there."""

from __future__ import annotations

import json

import torch

import lorakit
from lorakit.hub import load_model_and_tokenizer, portable_model_name, resolve_model_path

TARGETS = ["q_proj", "v_proj"]


def _saved(model, folder, **config):
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False, **config))
    lorakit.save_adapter(model, folder)
    return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_the_bundled_bases_are_recorded_by_name_and_resolve_back(tmp_path):
    for name in ("bundled", "bundled-small"):
        model, _ = load_model_and_tokenizer(name)
        assert _saved(model, tmp_path / name) == name
        assert resolve_model_path(name) == str(lorakit.assets.BUNDLED_MODELS[name])
    # round trip through lorakit: the recorded name is a model lorakit loads, and the adapter loads onto it
    model, tokenizer = load_model_and_tokenizer(None)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    ids = torch.tensor([tokenizer.encode("reverse: a b c =>")])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    lorakit.save_adapter(model, tmp_path / "a")
    recorded = lorakit.io.peft_format.read_adapter_config(tmp_path / "a").base_model_name_or_path
    loaded = lorakit.load_adapter(load_model_and_tokenizer(recorded)[0], tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
    # PEFT: PeftModel.from_pretrained on the base the name resolves to gives the same logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_path(recorded)),
                                           str(tmp_path / "a")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_a_user_folder_and_a_hub_id_are_kept_as_given_and_auto_peft_loads_the_folder(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from lk_models import tiny_llama

    folder = tmp_path / "my-model"
    tiny_llama().save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder))  # as load_model_and_tokenizer loads a folder
    assert _saved(model, tmp_path / "a") == str(folder)
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # a hub id the user put in the config: written as given, never rewritten
    model = tiny_llama()
    assert _saved(model, tmp_path / "b", base_model_name_or_path="meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert portable_model_name(None) is None and portable_model_name("") is None



def test_same_model_reads_a_bundled_name_and_its_folder_alike(tmp_path):
    """merge-adapters compares the base a source records with the merge's model (whose name_or_path is the folder
    it was loaded from): "bundled" and the bundled asset folder are one model, the two bundled bases are not."""
    from lorakit.assets import BUNDLED_MODELS
    from lorakit.hub import same_model

    assert same_model("bundled", BUNDLED_MODELS["bundled"]) and same_model(str(BUNDLED_MODELS["bundled"]), "bundled")
    assert not same_model("bundled", "bundled-small")
    (tmp_path / "m").mkdir()
    (tmp_path / "x").mkdir()
    assert same_model(tmp_path / "m", str(tmp_path / "x" / ".." / "m"))
    assert same_model("org/model", "org/model") and not same_model("org/model", "org/other")
