"""torch.compile of an adapted model traces without graph breaks, as PEFT's does, and routing still reaches the
layers under compile. Every adapted layer read the routing ContextVar, which Dynamo cannot trace: 28 graph breaks
on a 2-layer Llama, and ``fullgraph=True`` failed (PEFT's adapted model compiles whole)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import lorakit as lk
from lk_models import tiny_llama


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("use_dora", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["lora", "dora"])
def test_adapted_model_compiles_whole_with_peft_outputs(use_dora, ids, tmp_path):
    kwargs = dict(r=4, target_modules="all-linear", modules_to_save=["lm_head"], use_dora=use_dora,
                  init_lora_weights=False)
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(**kwargs)).eval()
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits  # (PEFT's DoRA itself does not compile with fullgraph=True)
    model = lk.load_adapter(tiny_llama(), tmp_path)
    with torch.no_grad():  # fullgraph=True: any graph break is an error
        got = torch.compile(model, fullgraph=True, backend="eager")(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.slow  # (three compilations: ~35 s on one thread)
def test_routing_reaches_layers_of_a_compiled_model(ids):
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "b")
    lk.set_adapter(model, "default")
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with lk.routing(adapter_names=["b", None, "default"]):
            routed = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="eager")
        assert torch.equal(compiled(input_ids=ids).logits, plain)
        with lk.routing(adapter_names=["b", None, "default"]):  # a routing block after compiling: recompiled
            assert torch.equal(compiled(input_ids=ids).logits, routed)
        assert torch.equal(compiled(input_ids=ids).logits, plain)  # and the block's routing ends with it
    assert not torch.equal(routed, plain)
