"""A PEFT sequence-classification adapter (task_type="SEQ_CLS": PEFT writes modules_to_save=["classifier",
"score"], of which a Llama classifier has only "score") loads into lorakit — attached and into serving banks —
with PEFT's own logits (issue 10, fault 6). The reference is the real ``peft`` package."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForSequenceClassification

from lk_models import tiny_bert

import lorakit as lk
from lorakit import serving


def tiny_llama_cls(seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


# Llama names its head "score" (no bias), BERT "classifier" (with a bias): PEFT lists both names either way.
MODELS = {"llama": (tiny_llama_cls, ["q_proj", "v_proj"], "score"), "bert": (tiny_bert, ["query", "value"], "classifier")}


@pytest.fixture(params=list(MODELS))
def peft_seq_cls(request, tmp_path):
    """(factory, head name, folder, PEFT's logits, input ids): a SEQ_CLS adapter with trained-looking (random)
    LoRA and classification head."""
    factory, targets, head = MODELS[request.param]
    peft_model = get_peft_model(factory(), PeftLoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                          target_modules=targets, init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path / "cls")
    assert sorted(json.loads((tmp_path / "cls" / "adapter_config.json").read_text())["modules_to_save"]) == \
        ["classifier", "score"]
    ids = torch.randint(1, 96, (3, 7), generator=g)
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
    return factory, head, tmp_path / "cls", expected, ids


def test_load_adapter_gives_peft_logits(peft_seq_cls):
    factory, head, folder, expected, ids = peft_seq_cls
    model = lk.load_adapter(factory(), folder)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-5
    assert list(model.get_submodule(head).copies) == ["default"]


def test_serving_load_adapters_gives_peft_logits(peft_seq_cls):
    factory, head, folder, expected, ids = peft_seq_cls
    model = factory()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    serving.load_adapters(model, {"cls": folder})
    with torch.no_grad(), serving.bank_routing(model, ["cls", None, "cls"]):
        got = model(input_ids=ids).logits
    assert (got[[0, 2]] - expected[[0, 2]]).abs().max() <= 1e-5
    assert (got[1] - base[1]).abs().max() <= 1e-5  # the row without adapter keeps the base head
