"""LoRA-GGPO (``training/procedures/ggpo.py``) against the formulas of kohya-ss/sd-scripts @ 48d368fa
``networks/lora_flux.py`` (``LoRAModule.forward`` lines 158-174: ε ~ N(0,1) of the weight's shape scaled per row by
(σ·‖W+ΔW‖_i + β·‖∇ΔW‖_i²)/√out, output += x εᵀ; ``update_norms`` 266-282: ‖W+ΔW‖_i = √(w̄² + ‖ΔW_i‖²), ΔW with the
scale s, which kohya's non in-place ``mul`` drops (line 276; see ggpo.py); ``update_grad_norms`` 284-302:
∇ΔW ≈ s(B ∇A + ∇B A)), both norms taken before ``optimizer.step()`` (train_network.py lines 1452-1457)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.training import TrainConfig, get_procedure, make_optimizer, train


def test_ggpo_perturbation_follows_the_formula():
    torch.manual_seed(0)
    model = lk.add_adapter(nn.Sequential(nn.Linear(6, 5)), lk.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                                         init_lora_weights=False)).train()
    sigma, beta = 0.5, 0.3
    config = TrainConfig(lr=1e-2, procedure="ggpo", procedure_args={"ggpo_sigma": sigma, "ggpo_beta": beta})
    procedure = get_procedure("ggpo").build(config)
    optimizer, _ = make_optimizer(model, "default", config, procedure=procedure)
    x = torch.randn(4, 6)
    layer = model.get_submodule("0")
    delta = layer.adapters["default"]
    plain = layer.base_layer(x) + delta.lora_out(x)
    torch.testing.assert_close(model(x), plain)  # no norms yet: no perturbation on the first step

    model(x).pow(2).sum().backward()
    a, b, s = delta.lora_A.weight, delta.lora_B.weight, delta.scaling
    with torch.no_grad():  # both norms from the weights the gradients were taken at (before the step)
        grad_norm = (s * (b @ a.grad + b.grad @ a)).norm(dim=1, keepdim=True)  # update_grad_norms, 284-302
        w_bar = layer.base_layer.weight.norm(dim=1).mean()  # initialize_norm_cache, 204-221 (all 5 rows)
        weight_norm = torch.sqrt(w_bar ** 2 + ((s * b @ a) ** 2).sum(dim=1, keepdim=True))  # update_norms, 266-282
    procedure.on_gradients(model, "default", 0)
    optimizer.step()
    optimizer.zero_grad()
    procedure.on_step(model, "default", 1, 10)

    with torch.no_grad():
        size = (sigma * weight_norm + beta * grad_norm ** 2) / math.sqrt(5)  # forward, 158-174; 1/√out: line 116
        plain = layer.base_layer(x) + delta.lora_out(x)
        torch.manual_seed(7)
        eps = torch.randn(5, 6) * size
    torch.manual_seed(7)
    got = model(x)  # a training forward (grad enabled)
    torch.testing.assert_close(got, plain + x @ eps.T, atol=1e-5, rtol=1e-5)
    model.eval()
    torch.testing.assert_close(model(x), plain)  # evaluation is unperturbed
    procedure.finish(model, "default")


def test_ggpo_one_forward_per_micro_batch_and_exact_resume(make_model, tokenizer, reverse_train, tmp_path):
    forwards = []

    def run(**kw):
        model = make_model()
        model.register_forward_pre_hook(lambda m, a, k: forwards.append(1), with_kwargs=True)
        config = TrainConfig(steps=4, batch_size=4, grad_accum=2, lr=1e-2, procedure="ggpo", log_every=1,
                             procedure_args={"ggpo_sigma": 0.1, "ggpo_beta": 0.1}, **kw)
        train(model, tokenizer, reverse_train, config, progress=False)
        return model

    straight = run(output_dir=str(tmp_path / "a"), save_every=2)
    assert len(forwards) == 4 * 2  # no second forward-backward (SAM would need 2 per micro-batch)
    resumed = run(output_dir=str(tmp_path / "b"), resume_from=str(tmp_path / "a" / "checkpoint-2"))
    bad = [n for (n, p), q in zip(straight.named_parameters(), resumed.parameters()) if not torch.equal(p, q)]
    assert not bad
    plain = make_model()
    train(plain, tokenizer, reverse_train, TrainConfig(steps=4, batch_size=4, grad_accum=2, lr=1e-2), progress=False)
    ours, theirs = lk.adapter_state_dict(straight), lk.adapter_state_dict(plain)
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours)  # the perturbation changed training


def test_ggpo_config_errors():
    with pytest.raises(lk.ConfigError, match="ggpo_sigma"):
        TrainConfig(procedure="ggpo", procedure_args={"ggpo_sigma": -1.0})


def test_ggpo_perturbs_the_lora_factors_and_trains_token_rows_plainly(make_model):
    """Trainable token rows beside LoRA (``Delta.extra``) get no perturbation (they are no ``B A``) and train as
    without the procedure: no hook, no norms, the plain gradient at the first step (no perturbation until the
    norms exist). (Was: refused as "needs plain LoRA on linear layers; 'model.embed_tokens' has TokenRows".)"""
    from lorakit.core.model import adapter_layers

    ids = torch.arange(3, 27).reshape(2, 12)  # tokens 3 and 5 occur
    kw = {"target_modules": ["q_proj", "v_proj"], "trainable_token_indices": [3, 5]}
    plain = make_model(lk.LoraConfig(r=4, **kw))
    plain(input_ids=ids, labels=ids).loss.backward()
    model = make_model(lk.LoraConfig(r=4, **kw))
    config = TrainConfig(procedure="ggpo")
    procedure = get_procedure("ggpo").build(config)
    optimizer, _ = make_optimizer(model, "default", config, procedure=procedure)
    layers = dict(adapter_layers(model))
    assert sorted(procedure.deltas) == sorted(p for p in layers if p.endswith(("q_proj", "v_proj")))
    rows = layers["model.embed_tokens"].adapters["default"].token_adapter.trainable_tokens_delta
    assert any(rows is p for g in optimizer.param_groups for p in g["params"])
    assert not layers["model.embed_tokens"].adapters["default"]._forward_hooks
    model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(rows.grad, plain.model.embed_tokens.adapters["default"].values.grad)
    procedure.on_gradients(model, "default", 0)
    assert "model.embed_tokens" not in procedure.grad_norm and len(procedure.grad_norm) == len(procedure.deltas)
    before = rows.detach().clone()
    optimizer.step()
    assert not torch.equal(rows.detach(), before)  # the rows trained
