"""LoRA-XS: B, A from the truncated SVD of W (frozen), only the r×r R trains; exports as a plain LoRA."""

from __future__ import annotations

import numpy as np
import torch

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.methods.lora_xs import LoraXSConfig

from lk_models import assert_exports_to_peft, assert_trains_only, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _host_weight(model, path):
    return dict(model.named_modules())[path].weight.detach()


def test_lora_xs_init_is_truncated_svd_of_W():
    r = 4
    base = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(tuple(TARGETS))}
    model = lk.add_adapter(base, LoraXSConfig(r=r, target_modules=TARGETS))
    for path, layer in adapter_layers(model):
        d = layer.adapters["default"]
        # Official utils/initialization_utils.py get_svd_replacement_module (lines 14-28): svd of weight.T,
        # u = u @ diag(s), keep the top r; lora_A = encoder.T, lora_B = decoder.T (find_and_initialize, 103-105).
        u, s, vh = np.linalg.svd(weights[path].numpy().T.astype(np.float64), full_matrices=False)
        encoder, decoder = (u @ np.diag(s))[:, :r], vh[:r, :]
        expected = decoder.T @ encoder.T  # B A, sign-invariant
        np.testing.assert_allclose((d.lora_B.weight @ d.lora_A.weight).detach().numpy(), expected, atol=1e-5)
        # init_module_weights(latent, sigma=0.00001): R ~ N(0, 1e-5)
        assert d.lora_R.weight.abs().max() < 1e-4 and d.lora_R.weight.abs().max() > 0


def test_lora_xs_trains_only_R(ids):
    model = lk.add_adapter(tiny_llama(), LoraXSConfig(r=4, target_modules=TARGETS))
    assert_trains_only(model, ids, ["lora_R.weight"])
    assert lk.trainable_parameters(model)[0] == 4 * 4 * len(list(adapter_layers(model)))


def test_lora_xs_zero_R_starts_at_base(ids):
    base_out = tiny_llama()(input_ids=ids).logits
    model = lk.add_adapter(tiny_llama(), LoraXSConfig(r=4, init_R_std=0.0, target_modules=TARGETS))
    torch.testing.assert_close(model(input_ids=ids).logits, base_out, atol=1e-6, rtol=0)


def test_lora_xs_exports_to_peft(ids, tmp_path):
    model = lk.add_adapter(tiny_llama(), LoraXSConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.adapters["default"].lora_R.weight.normal_(std=0.5)
    cfg = assert_exports_to_peft(model, "default", tiny_llama, ids, tmp_path)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
