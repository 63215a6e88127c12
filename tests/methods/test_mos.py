"""MoS: per-projection shard pools shared across layers, per-layer index lists (subset selection, pair
dissociation, vector sharding, shard privatization) as in the official ``Forence1999/MoS`` ``modules/Tied_LoRA.py``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit.core.model import adapter_layers
from lorakit.methods.lora import LoraConfig
from lorakit.methods.mos import MosConfig

from lk_models import assert_exports_to_peft, assert_trains_only, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
CFG = dict(r=4, lora_alpha=8, valid_param_lora_r=3, valid_param_private_r=1, num_chunk_per_vec=2,
           target_modules=TARGETS)


def _mos(**kw):
    model = lk.add_adapter(tiny_llama(), MosConfig(**{**CFG, **kw}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.adapters["default"].parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _official_transform_chunks(mat, mask, num_chunk_per_vec):
    """Tied_LoRA.py ``transform_chunks``, as written there."""
    mat = mat[mask]
    return torch.cat([mat[i::num_chunk_per_vec] for i in range(num_chunk_per_vec)], dim=1)


def test_mos_forward_follows_official_tied_lora_forward(ids):
    model = _mos()
    for _, layer in adapter_layers(model):
        d = layer.adapters["default"]
        pool_A, pool_B = d.pools["A"].detach(), d.pools["B"].detach()
        # LoraLinear4bit_Tied_LoRA_forward: lora_A = transform_chunks(A, mask, l); lora_B = transform_chunks(B.t(), mask_B, l).t()
        A = _official_transform_chunks(pool_A, d.mos_index_A, 2)
        B = _official_transform_chunks(pool_B.t(), d.mos_index_B, 2).t()
        torch.testing.assert_close(d.lora_A(), A, atol=0, rtol=0)
        torch.testing.assert_close(d.lora_B(), B, atol=0, rtol=0)
        # output = ((dropout(x) @ lora_A.t() * (vec * anti_vec)) @ lora_B.t()) * scaling, vec * anti_vec = 1
        x = torch.randn(5, layer.info.in_features)
        torch.testing.assert_close(d(x, torch.zeros(5, layer.info.out_features), None),
                                   ((x @ A.t()) @ B.t()) * (8 / 4), atol=1e-5, rtol=1e-5)


def test_mos_index_lists_follow_official_reset_lora_parameters():
    model = lk.add_adapter(tiny_llama(), MosConfig(**CFG))
    e, p, l, r, L = 3, 1, 2, 4, 2  # two layers per projection type
    private_start = (e - p) * L * l  # LoraLayer_reset_lora_parameters
    by_type = {}
    for path, layer in adapter_layers(model):
        by_type.setdefault(path.rpartition(".")[2], []).append(layer.adapters["default"])
    for deltas in by_type.values():
        for ell, d in enumerate(deltas):
            for index in (d.mos_index_A, d.mos_index_B):
                assert index.shape == (r * l,) and index.dtype == torch.long
                shared, private = index[: (r - p) * l], index[(r - p) * l:]
                # privatization: this layer's own rows private_start + [ℓ·p·l, (ℓ+1)·p·l)
                assert private.tolist() == list(range(private_start + ell * p * l, private_start + (ell + 1) * p * l))
                # subset selection: distinct rows of the shared region (randperm prefix)
                assert len(set(shared.tolist())) == len(shared) and int(shared.max()) < private_start
        # one pool per projection type, the same tensors in every layer; rows = e·L·l
        assert deltas[0].pools is deltas[1].pools
        assert deltas[0].pools["A"].shape[0] == e * L * l == deltas[0].pools["B"].shape[1]
    # pair dissociation: A and B draw separately (over six modules they cannot all coincide)
    layers = [layer.adapters["default"] for _, layer in adapter_layers(model)]
    assert any(not torch.equal(d.mos_index_A, d.mos_index_B) for d in layers)


def test_mos_starts_at_base_trains_pools_and_has_lora_e_parameters(ids, tmp_path):
    ref = tiny_llama()(input_ids=ids).logits
    model = lk.add_adapter(tiny_llama(), MosConfig(**CFG))
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-6, rtol=0)  # pool B = 0
    assert_trains_only(model, ids, ["mos_pool_A", "mos_pool_B"])
    # the pools hold as many parameters as a rank-e LoRA (e = valid_param_lora_r = 3) on every layer
    lora_e = lk.add_adapter(tiny_llama(), LoraConfig(r=3, target_modules=TARGETS))
    assert lk.trainable_parameters(model)[0] == lk.trainable_parameters(lora_e)[0]
    lk.save_adapter(model, tmp_path / "mos")
    saved = load_file(tmp_path / "mos" / "adapter_model.safetensors")
    pools = [k for k in saved if "mos_pool" in k]
    assert len(pools) == 2 * 3 and all(".layers.0." in k for k in pools)  # once per projection type


def test_mos_groups_by_name_and_shape_and_explains_small_pools():
    model = lk.add_adapter(tiny_llama(), MosConfig(**{**CFG, "target_modules": ["q_proj", "o_proj"]}))
    q, o = (layer.adapters["default"] for p, layer in adapter_layers(model) if p.startswith("model.layers.0."))
    assert q.pools is not o.pools  # same shape, different projection type
    with pytest.raises(lk.TargetError, match="lower r or raise valid_param_lora_r"):
        lk.add_adapter(tiny_llama(), MosConfig(**{**CFG, "layers_to_transform": [0]}))
    with pytest.raises(lk.TargetError, match="num_chunk_per_vec=3"):
        lk.add_adapter(tiny_llama(), MosConfig(**{**CFG, "num_chunk_per_vec": 3}))


def test_mos_exports_to_peft(ids, tmp_path):
    cfg = assert_exports_to_peft(_mos(), "default", tiny_llama, ids, tmp_path)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8


def test_mos_config_errors():
    with pytest.raises(lk.ConfigError, match="valid_param_private_r"):
        MosConfig(r=4, valid_param_lora_r=2, valid_param_private_r=3)
    with pytest.raises(lk.ConfigError, match="r must equal 2"):
        MosConfig(r=4, valid_param_lora_r=2, valid_param_private_r=2)
