"""Activation (gradient) checkpointing keeps every method's gradients (``lorakit.core.checkpointing``).

Reference: the same forward and backward without checkpointing. That checkpointing changes no gradient is its
definition (torch.utils.checkpoint: the recompute reproduces the forward's activations; PyTorch docs, "Activation
checkpointing"). Was: the recompute ran in ``backward()``, after the ``routing(...)`` block had closed, so methods
that read the routing context recomputed something else: routed LoRA's and MM-LoRA's gradients differed (by 0.04 and
0.26) without an error, MixDA and γ-MoD raised torch's CheckpointError, X-LoRA and RecLoRA raised "ran without
scalings" / "needs a user vector".
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import lorakit as lk
from lorakit.core.checkpointing import checkpointing_enabled, replay_routing_in_checkpoints
from lorakit.core.model import adapter_layers

from lk_models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))


def _methods():
    for method in lk.list_methods():
        if "linear" in method.layer_kinds:
            variant = next(iter(method.variants))
            yield pytest.param(method.name, variant, id=f"method={method.name}-{variant}")


def _loss_and_grads(name: str, variant: str, checkpointing: bool, replay: bool = True):
    method = lk.get_method(name)
    model = tiny_llama()
    lk.add_adapter(model, method.config_cls(target_modules=TARGETS, **method.variants[variant]), "default")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero delta whatever the method's init
        for _, layer in adapter_layers(model):
            for p in layer.adapters["default"].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.train()
    for m in model.modules():  # no random draws: both runs compute the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if checkpointing:
        model.activation_checkpointing_enable()
        assert checkpointing_enabled(model)
        if replay:
            assert replay_routing_in_checkpoints(model) > 0
            assert replay_routing_in_checkpoints(model) == 0  # idempotent
    info = method.example_routing(IDS) if method.example_routing is not None else None
    with lk.routing(**info) if info else contextlib.nullcontext():
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()  # outside the routing block, as a training loop calls it
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("name, variant", list(_methods()))
def test_checkpointing_keeps_the_loss_and_every_gradient(name, variant):
    loss, grads = _loss_and_grads(name, variant, checkpointing=False)
    loss_ckpt, grads_ckpt = _loss_and_grads(name, variant, checkpointing=True)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_without_the_replay_a_routed_method_gets_other_gradients():
    """What the wrapper fixes: routed LoRA's recompute without its task keys (every row then gets the base)."""
    variant = next(iter(lk.get_method("routed_lora").variants))
    _, grads = _loss_and_grads("routed_lora", variant, checkpointing=False)
    _, unreplayed = _loss_and_grads("routed_lora", variant, checkpointing=True, replay=False)
    assert any(not torch.allclose(unreplayed[n], grads[n], atol=1e-5) for n in grads)
