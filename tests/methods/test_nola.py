"""NOLA: A and B from seeded random bases (official UCDvision/NOLA equations), only coefficients trained and saved,
bases regenerated on load, export to a plain PEFT LoRA that loads in the real ``peft`` package."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.methods.lora import LoraConfig
from lorakit.methods.nola import NolaConfig, module_seed

from lk_models import assert_exports_to_peft, assert_trains_only, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _nudged(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.adapters["default"].parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _official_generate(coefficients, out_dim, in_dim, seed):
    """UCDvision/NOLA gpt/src/model_nola.py, GenerateParams.forward (lines 81-98, commit 03c7027): seed, W = zeros(num_basis, out,
    in), nn.init.uniform_(W, -1, 1), W *= 1/sqrt(num_basis), Out = einsum('b,boi->oi', coefficients, W). The
    official seeds the global CPU generator (torch.manual_seed), which draws the same stream as a seeded Generator."""
    torch.manual_seed(seed)
    W = torch.zeros(coefficients.shape[0], out_dim, in_dim)
    nn.init.uniform_(W, a=-1.0, b=1.0)
    W = W * (1.0 / math.sqrt(coefficients.shape[0]))
    return torch.einsum("b,boi->oi", coefficients, W)


def test_nola_factors_follow_official_generate_params(ids):
    cfg = NolaConfig(r=4, lora_alpha=8, num_basis_A=16, num_basis_B=12, projection_seed=3, target_modules=TARGETS)
    model = _nudged(lk.add_adapter(tiny_llama(), cfg))
    for path, layer in adapter_layers(model):
        d = layer.adapters["default"]
        seed = module_seed(3, path)
        info = layer.info
        # NOLALinear.forward: W = generate_params(coefficients, out, in, seed) + self.weight, where lora_A's weight is
        # Kaiming-uniform A0 and lora_B's weight is zero (LoRA.reset_lora_parameters)
        A = _official_generate(d.nola_alpha.detach(), 4, info.in_features, seed) + d.lora_A0
        B = _official_generate(d.nola_beta.detach(), info.out_features, 4, seed + 1)
        torch.testing.assert_close(d.lora_A(), A, atol=1e-6, rtol=0)
        torch.testing.assert_close(d.lora_B(), B, atol=1e-6, rtol=0)
        # LoRA.forward: lora_B(lora_A(x)) * alpha / rank
        x = torch.randn(5, info.in_features)
        torch.testing.assert_close(d(x, torch.zeros(5, info.out_features), None), (x @ A.T @ B.T) * 2.0,
                                   atol=1e-5, rtol=1e-5)


def test_nola_starts_at_base_and_trains_only_coefficients(ids):
    ref = tiny_llama()(input_ids=ids).logits
    model = lk.add_adapter(tiny_llama(), NolaConfig(r=4, num_basis_A=16, num_basis_B=16, target_modules=TARGETS))
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-6, rtol=0)
    assert_trains_only(model, ids, ["nola_alpha", "nola_beta"])
    # init alpha = beta = 0: B = 0, but beta's gradient flows through A0 (official reset_lora_parameters)
    for _, layer in adapter_layers(model):
        assert layer.adapters["default"].nola_beta.grad.abs().sum() > 0


def test_nola_saves_only_coefficients_and_is_smaller_than_lora(ids, tmp_path):
    model = _nudged(lk.add_adapter(tiny_llama(), NolaConfig(r=8, num_basis_A=32, num_basis_B=32,
                                                            projection_seed=5, target_modules=TARGETS)))
    expected = model(input_ids=ids).logits
    lk.save_adapter(model, tmp_path / "nola")
    saved = load_file(tmp_path / "nola" / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"nola_alpha", "nola_beta"}
    nola_floats = sum(v.numel() for v in saved.values())
    assert nola_floats == 6 * (32 + 32)
    fresh = lk.load_adapter(tiny_llama(), tmp_path / "nola")  # bases regenerated from projection_seed
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected, atol=1e-6, rtol=0)

    lora = lk.add_adapter(tiny_llama(), LoraConfig(r=8, target_modules=TARGETS))
    lk.save_adapter(lora, tmp_path / "lora")
    lora_floats = sum(v.numel() for v in load_file(tmp_path / "lora" / "adapter_model.safetensors").values())
    # LoRA r=8: 2 layers x 8·((32+32) + (32+16) + (64+32)) = 3328 floats, 3328 / 384 ≈ 8.7x NOLA's
    assert lora_floats == 3328 and nola_floats == 384
    nola_bytes = (tmp_path / "nola" / "adapter_model.safetensors").stat().st_size
    lora_bytes = (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size
    print(f"NOLA file {nola_bytes} B vs LoRA {lora_bytes} B")
    assert nola_bytes * 3 < lora_bytes


def test_nola_exports_to_peft(ids, tmp_path):
    model = _nudged(lk.add_adapter(tiny_llama(), NolaConfig(r=4, lora_alpha=8, num_basis_A=16, num_basis_B=16,
                                                            target_modules=TARGETS)))
    cfg = assert_exports_to_peft(model, "default", tiny_llama, ids, tmp_path)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8


def test_nola_config_errors():
    with pytest.raises(lk.ConfigError, match="num_basis_A"):
        NolaConfig(num_basis_A=0)


def _official_coefficient_grad(grad_output, num_basis, out_dim, in_dim, seed):
    """UCDvision/NOLA ``gpt/src/model_nola.py`` (commit 03c7027) ``GenerateParams.backward`` (lines 101-118): the
    coefficients' gradient regenerated from the seed, W = uniform_(-1, 1) / sqrt(num_basis) (lines 110-113),
    ``einsum('d,dl->l', grad_output.flatten(), W.permute(1, 2, 0).reshape(-1, num_basis))`` (lines 114-115)."""
    torch.manual_seed(seed)
    W = torch.zeros(num_basis, out_dim, in_dim)
    nn.init.uniform_(W, a=-1.0, b=1.0)
    W = W * (1.0 / math.sqrt(num_basis))
    return torch.einsum("d,dl->l", grad_output.flatten(), W.permute(1, 2, 0).reshape(-1, num_basis))


def test_nola_coefficient_gradients_match_the_official_backward():
    """The update: the official code trains α, β through its own autograd.Function, whose backward is written out by
    hand; ours is torch's autograd through the stored bases. Gradients of one loss must agree. The factor gradients
    the official backward receives: LoRA.forward (lines 197-198) = lora_B(lora_A(x)) * alpha / rank, each lora_X a
    NOLALinear computing ``x @ (generate_params(...) + weight).t()`` (lines 142-147)."""
    cfg = NolaConfig(r=4, lora_alpha=8, num_basis_A=16, num_basis_B=12, projection_seed=5, target_modules=["q_proj"])
    model = _nudged(lk.add_adapter(tiny_llama(), cfg), seed=4)
    path, layer = next(iter(adapter_layers(model)))
    d, seed = layer.adapters["default"], module_seed(5, path)
    x = torch.randn(6, layer.info.in_features, generator=torch.Generator().manual_seed(6))
    target = torch.randn(6, layer.info.out_features, generator=torch.Generator().manual_seed(7))

    ours = d(x, torch.zeros(6, layer.info.out_features), None)
    ((ours - target) ** 2).sum().backward()

    A = d.lora_A().detach().requires_grad_(True)  # (r, in): generate_params(α) + Kaiming A0
    B = d.lora_B().detach().requires_grad_(True)  # (out, r): generate_params(β) + zero weight
    official = (x @ A.t()) @ B.t() * (8 / 4)
    ((official - target) ** 2).sum().backward()
    torch.testing.assert_close(ours, official.detach(), atol=1e-5, rtol=1e-5)
    grad_alpha = _official_coefficient_grad(A.grad, 16, 4, layer.info.in_features, seed)
    grad_beta = _official_coefficient_grad(B.grad, 12, layer.info.out_features, 4, seed + 1)
    torch.testing.assert_close(d.nola_alpha.grad, grad_alpha, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.nola_beta.grad, grad_beta, atol=1e-5, rtol=1e-5)
