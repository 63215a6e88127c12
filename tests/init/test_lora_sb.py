"""LoRA-SB (``lorakit/init/lora_sb.py``) on LoRA-XS's structure, against the official code's equations
(CERT-Lab/lora-sb): utils/gradient_utils.py ``estimate_and_process_grads_torch`` (``(outputs.loss /
samples).backward()``, summed, ``-1 * lr * torch.sign(grad)``), utils/svd_utils.py ``get_svd_grad``
(``manual_seed(42)``; ``randn(size(1), rank)``; ``svd_lowrank(q=rank, niter=10)``) and
utils/initialization_utils.py ``find_and_initialize_grad`` (``lora_A = Ur.T``, latent = ``diag(S)``,
``lora_B = Vrt.T``), run here on the gradients autograd gives for the untouched base model."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.core.model import adapter_layers

from lk_models import tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (x := torch.randint(0, 96, (2, 10), generator=g)), "labels": x.clone()} for _ in range(n)]


def _lora_sb(batches, **options):
    config = lk.get_method("lora_xs").config_cls(r=4, lora_alpha=8, target_modules=TARGETS)
    model = lk.add_adapter(tiny_llama(), config)
    lk.init_adapter(model, "default", batches, init="lora_sb", **options)
    return model


def _official_factors(batches, path, r, lr, warmup_steps):
    base = tiny_llama().train()
    weight = base.get_submodule(path).weight
    total = torch.zeros_like(weight)
    for b in batches:
        total += torch.autograd.grad(base(**b).loss / len(b["input_ids"]), weight)[0]
    processed = -1 * (lr / warmup_steps) * torch.sign(total)  # (out, in)
    torch.manual_seed(42)
    torch.randn(processed.T.size(1), r)
    U, S, V = torch.svd_lowrank(processed.T.float(), q=r, niter=10)
    return U.T, torch.diag(S), V.T.T, processed


@pytest.mark.parametrize("lr,warmup", [(1e-4, 1), (3e-3, 30)])
def test_lora_sb_factors_follow_the_official_code(lr, warmup):
    batches = _batches()
    model = _lora_sb(batches, lr=lr, warmup_steps=warmup)
    for path, layer in adapter_layers(model):
        d = layer.adapters["default"]
        A, R, B, update = _official_factors(batches, path, 4, lr, warmup)
        torch.testing.assert_close(d.lora_A.weight, A, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(d.lora_R.weight * d.scaling, R, atol=1e-7, rtol=1e-4)  # α=8, r=4: R absorbs 1/s
        torch.testing.assert_close(d.lora_B.weight, B, atol=1e-5, rtol=1e-4)
        # s·B R A is near the best rank-4 approximation of −η sign(G) (Eckart–Young; svd_lowrank with q = r and no
        # oversampling, as the official code calls it, is approximate on this flat spectrum)
        U, S, Vh = torch.linalg.svd(update)
        best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
        with torch.no_grad():
            assert float((update - d.delta_weight()).norm()) <= 1.05 * float((update - best).norm())


def test_lora_sb_trains_only_R_and_starts_at_the_approximate_update():
    batches = _batches()
    model = _lora_sb(batches)
    trainable = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_R"}
    base = tiny_llama()
    with torch.no_grad():
        for path, layer in adapter_layers(model):
            base.get_submodule(path).weight += layer.adapters["default"].delta_weight()
        torch.testing.assert_close(model(input_ids=batches[0]["input_ids"]).logits,
                                   base(input_ids=batches[0]["input_ids"]).logits, atol=1e-5, rtol=0)


def test_lora_sb_is_saved_in_the_config_and_not_rerun_on_load(tmp_path):
    batches = _batches()
    model = _lora_sb(batches)
    lk.save_adapter(model, tmp_path / "a")
    loaded = lk.load_adapter(tiny_llama(), tmp_path / "a")
    assert loaded.lorakit.configs["default"].init_weights == "lora_sb"
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lora_sb_rejects_plain_lora_and_bad_options():
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(lk.ConfigError, match="B·M·A adapter"):  # the config tells, before any data pass
        lk.init_adapter(model, "default", _batches(), init="lora_sb")
    xs = lk.add_adapter(tiny_llama(), lk.get_method("lora_xs").config_cls(r=4, target_modules=TARGETS))
    with pytest.raises(lk.ConfigError, match="warmup_steps"):
        lk.init_adapter(xs, "default", _batches(), init="lora_sb", warmup_steps=0)


def test_nlora_init_by_name_equals_the_nlora_method():
    """``--method slora --init nlora`` is NLoRA (official ``nlora_init``: A = W[:r,:], N = W[:r,:r], B = W[:,:r])."""
    by_init = lk.add_adapter(tiny_llama(), lk.get_method("slora").config_cls(r=4, target_modules=TARGETS), init="nlora")
    method = lk.add_adapter(tiny_llama(), lk.get_method("nlora").config_cls(r=4, target_modules=TARGETS))
    ours, ref = lk.adapter_state_dict(by_init), lk.adapter_state_dict(method)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    w = tiny_llama().model.layers[0].self_attn.q_proj.weight
    d = dict(adapter_layers(by_init))["model.layers.0.self_attn.q_proj"].adapters["default"]
    assert torch.equal(d.lora_A.weight, w[:4]) and torch.equal(d.lora_N.weight, w[:4, :4]) and torch.equal(d.lora_B.weight, w[:, :4])
    with pytest.raises(lk.ConfigError, match="Did you mean: nlora"):
        lk.get_method("slora").config_cls(r=4, init_weights="nlor")
