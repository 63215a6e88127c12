"""The contract every registered method passes, on every layer kind it supports, in fp32 and bf16.

Parametrised from the registry: a new method is tested by registering it. Ids read ``method=NAME-variant-layer-dtype``;
``pytest -k NAME`` selects exactly that method's tests (tests/conftest.py makes the match exact for method names).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import lorakit as lk
from lorakit.core.model import adapter_layers

from lk_models import tiny_gpt2, tiny_llama, tiny_unet, tiny_whisper, unet_inputs, whisper_inputs

# case -> (model factory, target_modules, layer kind) covering nn.Linear, transformers Conv1D, nn.Embedding,
# nn.Conv2d (a diffusers UNet: 3×3, 1×1 and stride-2 kernels) and nn.Conv1d (Whisper's encoder convolutions)
LAYER_CASES = {
    "linear": (tiny_llama, ["q_proj", "v_proj", "down_proj"], "linear"),
    "conv1d": (tiny_gpt2, ["c_attn", "c_proj"], "linear"),
    "embedding": (tiny_llama, ["embed_tokens"], "embedding"),
    "ffn": (tiny_llama, ["mlp"], "ffn"),
    "ffn_gpt2": (tiny_gpt2, ["mlp"], "ffn"),
    "nn_conv2d": (tiny_unet, ["conv_in", "conv1", "conv2", "conv_shortcut", "conv"], "conv"),
    "nn_conv1d": (tiny_whisper, ["conv1", "conv2"], "conv"),
}
WITH_BIAS = ("conv1d", "nn_conv2d", "nn_conv1d")  # cases whose targets have a base bias (lora_bias merges into it)


def _cases():
    for method in lk.list_methods():
        for variant, kwargs in method.variants.items():
            for case, (_, _, kind) in LAYER_CASES.items():
                if kind not in method.layer_kinds:
                    continue
                if kwargs.get("lora_bias") and case not in WITH_BIAS:
                    continue  # a delta bias needs a base bias to merge into (GPT-2's layers have one)
                for dtype in ("fp32", "bf16"):
                    yield pytest.param(method.name, variant, case, dtype,
                                       id=f"method={method.name}-{variant}-{case}-{dtype}")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "bf16": 3e-2}


def _config(method_name, variant, case, **extra):
    method = lk.get_method(method_name)
    kwargs = dict(method.variants[variant])
    kwargs.update(extra)
    return method.config_cls(target_modules=LAYER_CASES[case][1], **kwargs)


def _perturb(model, name, seed):
    """Make the adapter's delta non-zero without knowing the method: nudge every adapter parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.adapters[name].parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)


_ROUTING = {}  # set per test: routing kwargs the method needs (keys, masks)


def _call(model, ids, case, labels=False):
    """The model's output for ``ids`` (its loss with ``labels``): token ids for language models, noise + timesteps
    for the UNet (loss: mean squared output), mel features + decoder ids for Whisper (output: the encoder's)."""
    dtype = next(model.parameters()).dtype
    with lk.routing(**_ROUTING) if _ROUTING else contextlib.nullcontext():
        if case == "nn_conv2d":
            out = model(**unet_inputs(ids.shape[0], dtype=dtype)).sample
            return out.float().pow(2).mean() if labels else out.float()
        inputs = whisper_inputs(ids, dtype=dtype) if case == "nn_conv1d" else {"input_ids": ids}
        if labels:
            return model(**inputs, labels=ids).loss
        out = model(**inputs)
        # Whisper: the encoder's output (what its convolutions change; the tiny decoder's logits barely move)
        return (out.encoder_last_hidden_state if case == "nn_conv1d" else out.logits).float()


def _out(model, ids, case="linear"):
    return _call(model, ids, case)


@pytest.fixture
def setup(request):
    method_name, variant, case, dtype = request.param
    factory = LAYER_CASES[case][0]
    base = factory(dtype=DTYPES[dtype])
    return method_name, variant, case, dtype, factory, base


@pytest.mark.parametrize("method_name,variant,case,dtype", list(_cases()))
def test_contract(method_name, variant, case, dtype, ids, tmp_path):
    factory = LAYER_CASES[case][0]
    torch_dtype = DTYPES[dtype]
    tol = TOL[dtype]
    method = lk.get_method(method_name)
    _ROUTING.clear()
    if method.example_routing is not None:
        _ROUTING.update(method.example_routing(ids))
    model = factory(dtype=torch_dtype)
    base_params = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _out(model, ids, case)

    lk.add_adapter(model, _config(method_name, variant, case))
    assert list(adapter_layers(model)), "no layer adapted"
    out = _out(model, ids, case)
    assert out.shape == ref.shape
    if lk.get_method(method_name).zero_init:
        torch.testing.assert_close(out, ref, atol=tol, rtol=0)

    _perturb(model, "default", 0)
    out = _out(model, ids, case)
    assert (out - ref).abs().max() > 10 * tol, "perturbed adapter has no effect"
    with lk.disable_adapters(model):
        torch.testing.assert_close(_out(model, ids, case), ref, atol=tol, rtol=0)

    # merged == unmerged, merge -> unmerge restores the base weights (input-dependent methods refuse to merge)
    if method.mergeable:
        lk.merge_adapter(model)
        torch.testing.assert_close(_out(model, ids, case), out, atol=10 * tol if dtype == "bf16" else 1e-4, rtol=0)
        with lk.disable_adapters(model):  # disabling a merged model gives the base back
            torch.testing.assert_close(_out(model, ids, case), ref, atol=10 * tol if dtype == "bf16" else 1e-5, rtol=0)
        lk.unmerge_adapter(model)
    else:
        with pytest.raises(lk.AdapterError, match="cannot be merged"):
            lk.merge_adapter(model)
    if dtype == "fp32":
        restored = lk.unload(copy.deepcopy(model)).state_dict()
        for k, v in base_params.items():
            torch.testing.assert_close(restored[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(_out(model, ids, case), out, atol=tol, rtol=0)

    # save -> load round trip into a fresh base
    lk.save_adapter(model, tmp_path / "a")
    fresh = factory(dtype=torch_dtype)
    lk.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(_out(fresh, ids, case), out, atol=1e-6, rtol=0)

    # two adapters are isolated: adding/training b changes nothing of a
    lk.add_adapter(model, _config(method_name, variant, case), name="b")
    _perturb(model, "b", 1)
    a_params = {k: v.clone() for k, v in lk.adapter_state_dict(model, "default").items()}
    torch.testing.assert_close(_out(model, ids, case), out, atol=tol, rtol=0)  # b added inactive
    lk.set_adapter(model, "b")
    out_b = _out(model, ids, case)
    assert (out_b - out).abs().max() > 10 * tol
    model.train()
    loss = _call(model, ids, case, labels=True)
    if method.extra_loss is not None:
        loss = loss + method.extra_loss(model, "b")
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads, "no parameter received a gradient"
    assert all(".adapters.b." in n for n in grads), f"gradients outside adapter b: {sorted(grads)[:5]}"
    frozen = {id(p) for _, layer in adapter_layers(model) if "b" in layer.adapters
              for f, p in layer.adapters["b"].named_parameters() if f in set(layer.adapters["b"].frozen_names())}
    for n, p in model.named_parameters():
        if ".adapters.b." in n and id(p) not in frozen:  # a delta's frozen_names stay frozen
            assert p.requires_grad
        else:
            assert not p.requires_grad, n
    model.eval()
    for k, v in lk.adapter_state_dict(model, "default").items():
        assert torch.equal(v, a_params[k])
    lk.set_adapter(model, "default")
    torch.testing.assert_close(_out(model, ids, case), out, atol=tol, rtol=0)
    if method.extra_loss is not None:
        method.extra_loss(model, "default")  # drains records of the eval forwards (none are kept in eval mode)

    # deleting both adapters gives the plain base model back
    lk.delete_adapter(model, "b")
    lk.delete_adapter(model, "default")
    assert not list(adapter_layers(model))
    torch.testing.assert_close(_out(model, ids, case), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merge_keep_original_is_bit_exact(factory, variant, ids):
    model = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lk.add_adapter(model, lk.LoraConfig(target_modules="all-linear", init_lora_weights=False, use_dora=variant == "dora"))
    lk.add_adapter(model, lk.LoraConfig(target_modules="all-linear", init_lora_weights=False), name="b")
    lk.set_adapter(model, ["default", "b"])
    unmerged = _out(model, ids)
    lk.merge_adapter(model, keep_original=True)
    torch.testing.assert_close(_out(model, ids), unmerged, atol=1e-4, rtol=0)
    lk.unmerge_adapter(model)
    after = lk.unload(model).state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_every_method_has_a_contract_case():
    names = {c.values[0] for c in _cases()}
    assert names == {m.name for m in lk.list_methods()}


@pytest.mark.parametrize("method_name,variant,case", [pytest.param(*v, id=f"method={v[0]}-{v[1]}-{v[2]}")
                                                     for v in sorted({c.values[:3] for c in _cases()})])
def test_planned_shapes_on_the_meta_device_are_the_built_shapes(method_name, variant, case):
    """A loader sizes every delta on the meta device (``planned_shapes``) and checks the file against those shapes
    before building anything real; there is no fallback, so every method must build there, to the real shapes."""
    from lorakit.core.model import plan_adapter, planned_shapes

    model = LAYER_CASES[case][0]()
    config = _config(method_name, variant, case)
    _, planned, _ = planned_shapes(model, config, "default", set())
    built = plan_adapter(model, config, "default").deltas
    assert planned == {path: {k: tuple(v.shape) for k, v in delta.state_dict().items()}
                       for path, (_, _, delta) in built.items()}


@pytest.mark.parametrize("method_name,variant", [pytest.param(*v, id=f"method={v[0]}-{v[1]}")
                                                 for v in sorted({c.values[:2] for c in _cases()
                                                                  if c.values[2] == "linear"})])
def test_load_beside_a_merged_adapter_on_bf16_gives_the_saved_output(method_name, variant, ids, tmp_path):
    """``load_adapter`` builds each delta once on the meta device and gives it the file's values, or builds it for
    real when it holds state the file does not give; either way the loaded adapter's output is the saving model's.
    Here on a bf16 base that already has a merged LoRA (the load unmerges it, builds, merges it back): the loaded
    adapter, alone active, matches the saving model exactly (both run the same float32 adapter on the same base)."""
    method = lk.get_method(method_name)
    _ROUTING.clear()
    if method.example_routing is not None:
        _ROUTING.update(method.example_routing(ids))
    model = tiny_llama(dtype=torch.bfloat16)
    lk.add_adapter(model, _config(method_name, variant, "linear"))
    _perturb(model, "default", 0)
    want = _out(model, ids)
    lk.save_adapter(model, tmp_path / "a")
    fresh = tiny_llama(dtype=torch.bfloat16)
    lk.add_adapter(fresh, lk.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False), "m")
    lk.merge_adapter(fresh)
    lk.load_adapter(fresh, tmp_path / "a")
    lk.unmerge_adapter(fresh)
    lk.set_adapter(fresh, "default")
    torch.testing.assert_close(_out(fresh, ids), want, atol=0, rtol=0)
