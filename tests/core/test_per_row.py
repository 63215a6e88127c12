"""Per-row adapters in one batch (routing(adapter_names=...)): equal to running each row alone."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lk_models import tiny_gpt2, tiny_llama


def _model(factory, variants):
    model = factory()
    for i, (name, kwargs) in enumerate(variants.items()):
        lk.add_adapter(model, lk.LoraConfig(target_modules="all-linear", init_lora_weights=False, **kwargs), name=name)
    return model


VARIANTS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=8, lora_alpha=4, use_rslora=True),
            "c": dict(r=2, lora_alpha=16, lora_bias=True)}


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("with_dora", [False, True])
def test_mixed_rows_equal_single_rows(factory, with_dora, ids):
    variants = dict(VARIANTS)
    if with_dora:
        variants["d"] = dict(r=4, use_dora=True)  # not stackable: exercises the reference loop for that layer
    model = _model(factory, variants)
    names = (list(variants) + [None, "__base__"])[: ids.shape[0] + 2]
    batch = torch.cat([ids, ids[:2]])[: len(names)]
    with torch.no_grad(), lk.routing(adapter_names=names):
        mixed = model(input_ids=batch).logits
    for i, n in enumerate(names):
        with torch.no_grad():
            if n in (None, "__base__"):
                with lk.disable_adapters(model):
                    alone = model(input_ids=batch[i:i + 1]).logits
            else:
                lk.set_adapter(model, n)
                alone = model(input_ids=batch[i:i + 1]).logits
        assert (mixed[i:i + 1] - alone).abs().max() <= 1e-5, n


def test_stacked_rows_train_each_adapter_separately(ids):
    model = _model(tiny_llama, {"a": dict(r=4), "b": dict(r=8)})
    lk.set_adapter(model, ["a", "b"])
    model.train()
    with lk.routing(adapter_names=["a", "a", "b"]):
        loss_rows = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, 96),
                                                      ids[:, 1:].reshape(-1), reduction="none").view(3, -1)
    loss_rows[2].mean().backward()  # only row 2 (adapter b) in the loss
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None or g.abs().max() == 0 for n, g in grads.items() if ".adapters.a." in n)
    assert any(g is not None and g.abs().max() > 0 for n, g in grads.items() if ".adapters.b." in n)
