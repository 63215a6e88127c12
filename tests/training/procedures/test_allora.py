"""ALLoRA (``training/procedures/allora.py``) against the paper's update (arXiv:2410.09692, §3: per output row i,
g̃_i = g_i / √(‖(BA)_{i,:}‖ + 1/η²), applied to the gradients of A and B only; no official code exists)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.training import TrainConfig, get_procedure, make_optimizer, train


def _model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    return lk.add_adapter(base, lk.LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"], init_lora_weights=False))


def test_allora_scales_adapter_gradients_per_output_row():
    x = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(1))
    w = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(2))
    eta = 2.0 ** 0.5

    # Plain LoRA: the upstream gradient g = ∂L/∂y and the input of each adapted layer.
    plain = _model()
    seen = {}

    def record(name):
        def hook(module, args, y):
            seen[name] = [args[0].detach(), None]
            y.register_hook(lambda g: seen[name].__setitem__(1, g))
        return hook

    for name in ("0", "2"):
        plain.get_submodule(name).register_forward_hook(record(name))
    x_plain = x.clone().requires_grad_(True)
    plain_out = plain(x_plain)
    (plain_out * w).sum().backward()

    ours = _model()
    config = TrainConfig(procedure="allora", procedure_args={"eta": eta})
    procedure = get_procedure("allora").build(config)
    make_optimizer(ours, "default", config, procedure=procedure)
    x_ours = x.clone().requires_grad_(True)
    out = ours(x_ours)
    torch.testing.assert_close(out, plain_out)  # the forward value is LoRA's (s = 1)
    (out * w).sum().backward()
    # The gradient flowing on to the input (lower layers) is not scaled.
    torch.testing.assert_close(x_ours.grad, x_plain.grad, atol=1e-6, rtol=1e-5)
    procedure.finish(ours, "default")
    for name in ("0", "2"):
        delta = ours.get_submodule(name).adapters["default"]
        a, b = delta.lora_A.weight.detach(), delta.lora_B.weight.detach()
        inp, g = (t.reshape(-1, t.shape[-1]) for t in seen[name])  # (N, in), (N, out)
        c = 1.0 / torch.sqrt((b @ a).norm(dim=1) + 1.0 / eta ** 2)  # (out,)
        g_scaled = g * c
        torch.testing.assert_close(delta.lora_B.weight.grad, g_scaled.T @ (inp @ a.T), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(delta.lora_A.weight.grad, b.T @ g_scaled.T @ inp, atol=1e-5, rtol=1e-5)
    assert not ours.get_submodule("0").adapters["default"]._forward_hooks  # finish() removed the hooks


def test_allora_trains_in_the_loop(make_model, tokenizer, reverse_train):
    model = make_model(lk.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]))
    result = train(model, tokenizer, reverse_train, TrainConfig(steps=3, batch_size=4, lr=1e-2, procedure="allora",
                                                                log_every=1), progress=False)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    b = model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B
    assert b.weight.abs().max() > 0 and not b._forward_hooks
    assert not model.model.layers[0].self_attn.q_proj.adapters["default"]._forward_hooks


@pytest.mark.parametrize("kw,match", [({"lora_alpha": 4}, "scaling"), ({"lora_dropout": 0.1}, "dropout"),
                                      ({"use_dora": True}, "plain LoRA")])
def test_allora_rejects_scaled_or_dropout_lora(kw, match):
    torch.manual_seed(0)
    model = lk.add_adapter(nn.Sequential(nn.Linear(6, 5)), lk.LoraConfig(**{"r": 2, "lora_alpha": 2,
                                                                           "target_modules": ["0"], **kw}))
    with pytest.raises(lk.ConfigError, match=match):
        make_optimizer(model, "default", TrainConfig(procedure="allora"))


def test_allora_scales_the_lora_factors_and_trains_token_rows_plainly(make_model):
    """Trainable token rows beside LoRA (``Delta.extra``) are no ``BA``: ALLoRA scales only the factors' gradients
    and the rows get the plain gradient (the one flowing on to the input is unscaled, so the same as without
    ALLoRA), as LoRA+ keeps them in its plain group. (Was: refused as "needs plain LoRA on linear layers ... leave
    embeddings untargeted", though no embedding was targeted.)"""
    ids = torch.arange(3, 27).reshape(2, 12)  # tokens 3 and 5 occur
    kw = {"lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "trainable_token_indices": [3, 5]}
    grads = {}
    for name in ("plain", "allora"):
        model = make_model(lk.LoraConfig(r=4, **kw))
        if name == "allora":
            config = TrainConfig(procedure="allora", procedure_args={"eta": 2.0})
            make_optimizer(model, "default", config, procedure=get_procedure("allora").build(config))
        model(input_ids=ids, labels=ids).loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    rows = [n for n in grads["plain"] if "trainable_tokens_delta" in n]
    assert len(rows) == 1 and grads["plain"][rows[0]].abs().max() > 0
    torch.testing.assert_close(grads["allora"][rows[0]], grads["plain"][rows[0]], rtol=1e-5, atol=1e-7)
    b = [n for n in grads["plain"] if "lora_B" in n]
    # B = 0 at the start: every row's c = 1 / √(0 + 1/η²) = η = 2 (the paper's rate for a zero-norm row)
    for n in b:
        torch.testing.assert_close(grads["allora"][n], 2.0 * grads["plain"][n], rtol=1e-5, atol=1e-7)
