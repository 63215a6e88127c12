"""S2-LoRA: A and B shared by every layer of one shape, per-module rank coefficients λ with an L1 penalty
(paper: arXiv:2309.11756 abstract; no official code exists; init as PEFT's AdaLoRA, whose rank coefficient the
paper adopts)."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.methods.s2lora import S2LoraConfig, rank_distribution, s2lora_extra_loss

from lk_models import assert_exports_to_peft, tiny_llama, train_with_hooks

TARGETS = ["q_proj", "o_proj", "v_proj", "down_proj"]


def _deltas(model):
    return {path: layer.adapters["default"] for path, layer in adapter_layers(model)}


def test_s2lora_shares_A_B_per_shape_and_keeps_lambda_per_module():
    model = lk.add_adapter(tiny_llama(), S2LoraConfig(r=4, target_modules=TARGETS))
    d = _deltas(model)
    square = [d[p] for p in d if p.endswith(("q_proj", "o_proj"))]  # 32→32 in both layers: one shape group
    assert all(x.shared is square[0].shared for x in square)
    assert d["model.layers.0.self_attn.v_proj"].shared is not square[0].shared  # 32→16
    assert len({id(x.lora_lambda) for x in d.values()}) == len(d)
    # trainable: r·(in+out) per shape group + r per module
    expected = 4 * ((32 + 32) + (32 + 16) + (64 + 32)) + 4 * len(d)
    assert lk.trainable_parameters(model)[0] == expected


def test_s2lora_delta_is_B_diag_lambda_A(ids):
    model = lk.add_adapter(tiny_llama(), S2LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    ref = tiny_llama()(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-6, rtol=0)  # λ = 0 (AdaLoRA's E = 0)
    with torch.no_grad():
        for x in _deltas(model).values():
            x.lora_lambda.normal_()
    for x in _deltas(model).values():
        A, B, lam = x.shared["A"], x.shared["B"], x.lora_lambda
        inp = torch.randn(3, A.shape[1])
        want = inp @ (B @ torch.diag(lam) @ A).T * (8 / 4)  # ΔW_m = s · B diag(λ_m) A
        torch.testing.assert_close(x(inp, torch.zeros(3, B.shape[0]), None), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.delta_weight(), B @ torch.diag(lam) @ A * 2, atol=1e-5, rtol=1e-5)


def test_s2lora_l1_penalty_sparsifies_lambda(ids):
    model = lk.add_adapter(tiny_llama(), S2LoraConfig(r=4, l1_lambda=0.5, target_modules=TARGETS))
    lambdas = [x.lora_lambda for x in _deltas(model).values()]
    with torch.no_grad():
        for lam in lambdas:
            lam.fill_(0.3)
    penalty = s2lora_extra_loss(model, "default")
    torch.testing.assert_close(penalty, torch.tensor(0.5 * 0.3 * 4 * len(lambdas)))  # l1_lambda · Σ_m ‖λ_m‖₁
    free = lk.add_adapter(tiny_llama(), S2LoraConfig(r=4, l1_lambda=0.0, target_modules=TARGETS))
    for m in (model, free):
        with torch.no_grad():
            for x in _deltas(m).values():
                x.lora_lambda.fill_(0.3)
        train_with_hooks(m, ids, steps=15, lr=1e-2)
    mass = {id(m): sum(float(x.lora_lambda.detach().abs().sum()) for x in _deltas(m).values()) for m in (model, free)}
    assert mass[id(model)] < 0.5 * mass[id(free)]
    assert set(rank_distribution(model, "default")) == set(_deltas(model))


def test_s2lora_exports_to_peft(ids, tmp_path):
    model = lk.add_adapter(tiny_llama(), S2LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for x in _deltas(model).values():
            x.lora_lambda.normal_()
    cfg = assert_exports_to_peft(model, "default", tiny_llama, ids, tmp_path)
    assert cfg["r"] == 4


def test_s2lora_config_errors():
    with pytest.raises(lk.ConfigError, match="l1_lambda"):
        S2LoraConfig(l1_lambda=-1.0)


def _whisper_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(input_features=torch.randn(2, 16, 40, generator=g), decoder_input_ids=torch.tensor([[1, 5, 6, 7],
                                                                                                    [1, 8, 9, 3]]))


def test_s2lora_on_whisper_shares_across_encoder_and_decoder(tmp_path):
    """The paper's host: an encoder-decoder Whisper. Every Linear of the same shape (encoder and decoder
    self-attention, cross-attention, fc1, fc2) joins one shared (A, B); the output head is not a target; zero λ is
    the base; after training the merged, unmerged and reloaded models agree and the export loads in PEFT."""
    from lk_models import tiny_whisper_asr

    inputs = _whisper_inputs()
    base = tiny_whisper_asr()(**inputs).logits
    model = lk.add_adapter(tiny_whisper_asr(), S2LoraConfig(r=4, target_modules="all-linear", l1_lambda=1e-3))
    d = _deltas(model)
    assert "proj_out" not in d and "model.decoder.layers.1.encoder_attn.k_proj" in d
    square = [x for p, x in d.items() if p.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    assert len(square) == 2 * 4 + 2 * 8  # encoder self-attn, decoder self- and cross-attn
    assert all(x.shared is square[0].shared for x in square)
    assert d["model.encoder.layers.0.fc1"].shared is d["model.decoder.layers.1.fc1"].shared
    torch.testing.assert_close(model(**inputs).logits, base, atol=1e-6, rtol=0)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(**inputs, labels=inputs["decoder_input_ids"]).loss + s2lora_extra_loss(model, "default")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    trained = model(**inputs).logits
    assert (trained - base).abs().max() > 1e-3
    lk.save_adapter(model, tmp_path / "a")
    reloaded = lk.load_adapter(tiny_whisper_asr(), tmp_path / "a")
    torch.testing.assert_close(reloaded(**inputs).logits, trained, atol=1e-5, rtol=0)
    lk.merge_adapter(model)
    torch.testing.assert_close(model(**inputs).logits, trained, atol=1e-5, rtol=0)
    lk.unmerge_adapter(model)

    from peft import PeftModel

    from lorakit.methods._plain import save_plain_lora
    save_plain_lora(model, "default", tmp_path / "plain")
    peft_model = PeftModel.from_pretrained(tiny_whisper_asr(), tmp_path / "plain").eval()
    # PeftModel without a task type forwards input_ids only; its injected base model takes Whisper's inputs
    torch.testing.assert_close(peft_model.get_base_model()(**inputs).logits, trained, atol=1e-5, rtol=0)
