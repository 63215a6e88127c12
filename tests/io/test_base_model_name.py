"""``base_model_name_or_path`` in saved adapters: what PEFT writes, the folder the model was loaded from (the
bundled bases' asset folders too), so ``AutoPeftModel*.from_pretrained`` loads the base from it (``peft/auto.py``:
``base_model_path = peft_config.base_model_name_or_path``, loaded with the auto class); a user's hub id as given.
lorakit resolves a bundled base's asset folder recorded by another installation back to the bundled base
(``hub.bundled_name``), so such a file merges and loads here."""

from __future__ import annotations

import json

import torch

import lorakit
from lorakit.assets import BUNDLED_MODELS
from lorakit.hub import bundled_name, load_model_and_tokenizer, resolve_model_path, same_model

TARGETS = ["q_proj", "v_proj"]


def _saved(model, folder, **config):
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False, **config))
    lorakit.save_adapter(model, folder)
    return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_a_bundled_base_is_recorded_as_peft_records_it_and_auto_peft_loads_it(tmp_path):
    from peft import AutoPeftModelForCausalLM

    for name in ("bundled", "bundled-small"):
        model, _ = load_model_and_tokenizer(name)
        recorded = _saved(model, tmp_path / name)
        assert recorded == str(BUNDLED_MODELS[name]) and bundled_name(recorded) == name
    model, tokenizer = load_model_and_tokenizer(None)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    ids = torch.tensor([tokenizer.encode("reverse: a b c =>")])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    lorakit.save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        got = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_bundled_asset_folder_of_another_installation_resolves_to_the_bundled_base(tmp_path):
    """An adapter trained in another checkout / site-packages records that installation's asset folder, which does
    not exist here: lorakit loads (resolve_model_path) and compares (same_model) it as the bundled base."""
    for name, folder in BUNDLED_MODELS.items():
        elsewhere = str(tmp_path / "other" / "site-packages" / "lorakit" / "assets" / folder.name)
        assert bundled_name(elsewhere) == name and resolve_model_path(elsewhere) == str(folder)
        assert same_model(elsewhere, folder) and same_model(elsewhere, name)
    # a folder that exists is itself, whatever its name ends in
    mine = tmp_path / "mine" / "lorakit" / "assets" / "base_model"
    mine.mkdir(parents=True)
    assert bundled_name(mine) is None and not same_model(mine, "bundled")
    assert bundled_name("org/model") is None and bundled_name(None) is None and bundled_name("") is None


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



def test_same_model_reads_a_bundled_name_and_its_folder_alike(tmp_path):
    """merge-adapters compares the base a source records with the merge's model (whose name_or_path is the folder
    it was loaded from): "bundled" and the bundled asset folder are one model, the two bundled bases are not."""
    assert same_model("bundled", BUNDLED_MODELS["bundled"]) and same_model(str(BUNDLED_MODELS["bundled"]), "bundled")
    assert not same_model("bundled", "bundled-small")
    (tmp_path / "m").mkdir()
    (tmp_path / "x").mkdir()
    assert same_model(tmp_path / "m", str(tmp_path / "x" / ".." / "m"))
    assert same_model("org/model", "org/model") and not same_model("org/model", "org/other")
