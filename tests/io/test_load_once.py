"""``load_adapter`` builds an adapter once: on the meta device, where its shapes are checked against the file before
anything of the config's sizes is allocated, and then made from that build and the file's values. Before, every
delta was built twice (on the meta device for the checks, then again for real, with a random init the file then
overwrote) and the model was unmerged in three nested blocks. Methods whose deltas hold state the file does not give
(mixtures' buffers, shared pools) are still built for real after the checks; tests/core/test_contract.py's round
trip covers every method either way. Reference outputs: the adapter on the model that saved it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lorakit as lk
from lk_models import tiny_llama
from lorakit.core.delta import Delta
from lorakit.core.model import adapter_layers, adapter_state, merged_adapters

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def saved(tmp_path, ids):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=TARGETS, use_dora=True, init_lora_weights=False))
    lk.save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        return tmp_path / "a", model(input_ids=ids).logits


def test_each_delta_is_built_once(saved, ids, monkeypatch):
    folder, want = saved
    from lorakit.core import registry

    method = lk.get_method("lora")
    calls = []
    counting = dataclasses.replace(method, build=lambda *a, **k: calls.append(k["path"]) or method.build(*a, **k))
    monkeypatch.setitem(registry._METHODS, "lora", counting)
    model = tiny_llama()
    lk.load_adapter(model, folder)
    layers = [path for path, _ in adapter_layers(model)]
    assert sorted(calls) == sorted(layers) and len(layers) == 2 * 3  # 2 layers x 3 targets, each built once
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=1e-6)


def test_loaded_tensors_are_the_files_values_placed_as_planned(saved, ids):
    """float32 adapter tensors on a bf16 base (autocast_adapter_dtype, as PEFT), trainable with is_trainable, each its
    own storage (a later init re-run copies the file's values back into them)."""
    folder, _ = saved
    from safetensors.torch import load_file

    file = load_file(folder / "adapter_model.safetensors")
    model = tiny_llama(dtype=torch.bfloat16)
    lk.load_adapter(model, folder, is_trainable=True)
    state = lk.adapter_state_dict(model)
    assert state.keys() == file.keys()
    for key, value in state.items():
        assert value.dtype == torch.float32 and torch.equal(value, file[key])
        assert value.data_ptr() != file[key].data_ptr()
    params = lk.core.model.adapter_parameters(model, "default")
    assert params and all(p.requires_grad and isinstance(p, torch.nn.Parameter) for p in params.values())
    lk.load_adapter(model, folder, "frozen", autocast_adapter_dtype=False)
    assert {v.dtype for v in lk.adapter_state_dict(model, "frozen").values()} == {torch.bfloat16}


def test_load_beside_a_merged_adapter_unmerges_once_and_merges_back(saved, ids, monkeypatch):
    folder, want = saved
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "m")
    lk.merge_adapter(model)
    with torch.no_grad():
        merged_out = model(input_ids=ids).logits
    from lorakit.core import model as core_model

    blocks = []
    unmerged = core_model._unmerged

    def counting(*a, **k):
        blocks.append(1)
        return unmerged(*a, **k)

    monkeypatch.setattr(core_model, "_unmerged", counting)
    lk.load_adapter(model, folder, "b")
    assert len(blocks) == 1  # was 3, nested
    assert merged_adapters(model) == ["m"] and adapter_state(model).active == ["m"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged_out, rtol=0, atol=1e-5)
    lk.unmerge_adapter(model)
    lk.set_adapter(model, "b")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=1e-5)



class _HiddenProjection(Delta):
    """A delta B·P·x whose frozen projection P (r, in) is regenerated at build (a fixed pattern, as a seed would give)
    and held outside the registered submodules, so the file has only B (out, r). Test-only."""

    mergeable = False

    def __init__(self, info, r):
        super().__init__(info)
        projection = torch.nn.Linear(info.in_features, r, bias=False)
        with torch.no_grad():
            projection.weight.copy_(torch.linspace(-1, 1, r * info.in_features).reshape(r, info.in_features))
        object.__setattr__(self, "projection", projection)  # not a submodule: never saved, never trained
        self.lora_B = torch.nn.Parameter(torch.zeros(info.out_features, r))

    def forward(self, x, base_out, base_layer):
        return (self.projection(x.to(self.lora_B.dtype)) @ self.lora_B.T).to(base_out.dtype)


@dataclasses.dataclass
class _HiddenProjectionConfig(lk.LoraConfig):
    """LoRA's fields, for the test-only method "test_hidden_projection"."""


@pytest.fixture
def hidden_projection_method():
    from lorakit.core import registry

    lk.register_method("test_hidden_projection", config=_HiddenProjectionConfig, layer_kinds=("linear",),
                       build=lambda base, info, config, path="": _HiddenProjection(info, config.r),
                       description="B times a frozen projection kept outside the registered modules (test-only)")
    try:
        yield _HiddenProjectionConfig
    finally:  # keep the method out of the registry-driven test matrices
        registry._METHODS.pop("test_hidden_projection", None)


def test_a_delta_holding_an_unregistered_module_is_built_for_real(hidden_projection_method, tmp_path, ids):
    """The single build gives values to registered tensors only; a module held in a plain attribute would stay on the
    meta device (forward: "Tensor on device meta is not on the expected device"), so such a delta is built again."""
    model = tiny_llama()
    lk.add_adapter(model, hidden_projection_method(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for p in lk.core.model.adapter_parameters(model, "default").values():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        want = model(input_ids=ids).logits
    lk.save_adapter(model, tmp_path / "a")
    fresh = tiny_llama()
    lk.load_adapter(fresh, tmp_path / "a")
    for _, layer in adapter_layers(fresh):
        assert not layer.adapters["default"].projection.weight.is_meta
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=0, atol=1e-6)
