"""LoftQ (arXiv:2310.08659): ``init_lora_weights="loftq"`` with PEFT's ``loftq_config``.

References: PEFT 0.21.2's ``loftq_init`` (peft/utils/loftq_utils.py:52-100) and ``LoraLayer.loftq_init``
(peft/tuners/lora/layer.py:583-597), and the paper's equations. PEFT's function moves the weight to "cuda"
(loftq_utils.py:70-72), so on a CPU-only machine it cannot run at all (``get_peft_model`` raises "Torch not compiled
with CUDA enabled"); the CPU reference below replays its lines with PEFT's own ``_low_rank_decomposition`` and the
bitsandbytes quantizer it calls, on the CPU. ``test_matches_peft_on_cuda`` runs real PEFT where a GPU is.

Quantizer: PEFT 0.21.2 has no NFQuantizer of its own any more (removed in PEFT 0.20, loftq_utils.py:66-69); like
lorakit it quantizes with bitsandbytes (``Params4bit(compress_statistics=False, quant_type="nf4")``, blocks of 64).
bitsandbytes' CPU quantizer rounds to the nearest NF4 value by bucketizing at the midpoints of the code
(backends/default/ops.py ``quantize_4bit``), the CUDA kernel by comparing with the same midpoints, so both give the
same codes (up to values exactly on a midpoint).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lk_models import tiny_gpt2, tiny_llama
from lorakit.core.inits import BaseSwap, init_record_tensors, pop_init_records
from lorakit.core.model import adapter_layers, adapter_state

pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama64(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose adapted weights have in_features 64 / 128: whole NF4 blocks of 64 per row. (bitsandbytes
    0.50.2's CPU ``dequantize_4bit`` misreads a 2-D weight whose rows end inside a block, which PEFT's replayed line
    would hit on the CPU; lorakit dequantizes such weights as one row.)"""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def loftq_config(bits: int = 4, steps: int = 1, r: int = 4, alpha: float = 4, **kw) -> lk.LoraConfig:
    return lk.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="loftq",
                         loftq_config={"loftq_bits": bits, "loftq_iter": steps}, **kw)


def peft_replay(weight: torch.Tensor, bits: int, r: int, steps: int):
    """peft/utils/loftq_utils.py:72-100 line by line, on the CPU: (dequantized weight, lora_A, lora_B)."""
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    weight = weight.to(torch.float32)
    res = weight.clone()
    for i in range(steps):
        if bits == 4:
            qweight = bnb.nn.Params4bit(res.to("cpu"), requires_grad=False, compress_statistics=False,
                                        quant_type="nf4").to("cpu")
            dequantized_weight = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)
        else:
            qweight = bnb.nn.Int8Params(res.to("cpu"), requires_grad=False).to("cpu")
            dequantized_weight = bnb.functional.int8_vectorwise_dequant(qweight.data, qweight.SCB)
        res = weight - dequantized_weight
        output = _low_rank_decomposition(res, reduced_rank=r)
        L, R = output["L"], output["R"]
        if i + 1 == steps:
            break
        res = weight - torch.mm(L, R)
    return dequantized_weight, R, L


def _ids(n=2, t=8):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits,steps", [(4, 1), (4, 3), (8, 1), (8, 2)])
def test_matches_peft_loftq_init(bits, steps):
    """lora_alpha = r (scaling 1, where PEFT's unscaled factors and lorakit's coincide): A, B and the base weight
    (peft/tuners/lora/layer.py:591-597: lora_A <- R, lora_B <- L, base <- dequantized Q) equal PEFT's."""
    originals = {n: m.weight.detach().clone() for n, m in llama64().named_modules() if n.endswith(tuple(TARGETS))}
    model = lk.add_adapter(llama64(), loftq_config(bits, steps))
    for path, layer in adapter_layers(model):
        Q, A, B = peft_replay(originals[path], bits, 4, steps)
        delta = layer.adapters["default"]
        torch.testing.assert_close(delta.lora_A.weight, A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta.lora_B.weight, B, rtol=1e-5, atol=1e-6)
        assert torch.equal(layer.base_layer.weight, Q), path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PEFT's loftq_init runs on CUDA only (loftq_utils.py:70)")
def test_matches_peft_on_cuda():
    """Real PEFT, ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1))``,
    against lorakit on the same CUDA weights."""
    from peft import LoftQConfig, LoraConfig, get_peft_model

    ref = get_peft_model(llama64().cuda(), LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS,
                                                      init_lora_weights="loftq",
                                                      loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)))
    model = lk.add_adapter(llama64().cuda(), loftq_config(4, 1))
    theirs = dict(ref.base_model.model.named_modules())
    for path, layer in adapter_layers(model):
        peft_layer = theirs[path]
        delta = layer.adapters["default"]
        assert torch.equal(layer.base_layer.weight, peft_layer.base_layer.weight), path
        torch.testing.assert_close(delta.lora_A.weight, peft_layer.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(delta.lora_B.weight, peft_layer.lora_B["default"].weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [4, 16])
def test_defining_property_from_the_paper(alpha):
    """Paper eq. 6-8 with T = 1: Q = q_N(W) is plain quantization (Q0), and (B, A) is the best rank-r approximation
    of W − Q0 (Eckart–Young), so ``‖W − (Q + s·B A)‖_F² = Σ_{i>r} σ_i(W − Q0)²`` < ``‖W − Q0‖_F² = Σ_i σ_i²``.
    alpha = 16 (s = 4): lorakit divides s out of the factors (PEFT 0.21.2 does not), so the property holds for any s."""
    from lorakit.quantize.nf4 import quantize_dequantize

    originals = {n: m.weight.detach().clone() for n, m in tiny_llama().named_modules() if n.endswith(tuple(TARGETS))}
    model = lk.add_adapter(tiny_llama(), loftq_config(4, 1, r=4, alpha=alpha))
    for path, layer in adapter_layers(model):
        W = originals[path]
        Q0 = quantize_dequantize(W, 4)
        assert torch.equal(layer.base_layer.weight, Q0), path
        sigma = torch.linalg.svdvals((W - Q0).double())
        delta = layer.adapters["default"]
        err = torch.linalg.norm(W.double() - Q0.double() - delta.delta_weight().double())
        torch.testing.assert_close(err, sigma[4:].square().sum().sqrt(), rtol=1e-4, atol=0)
        assert err < torch.linalg.norm((W - Q0).double()) * 0.95  # r = 4 of 32 directions take > 5% of the error
        # the base holds values of the NF4 grid: quantizing it again changes nothing (storable in 4 bit)
        assert torch.equal(quantize_dequantize(layer.base_layer.weight, 4), layer.base_layer.weight)


def test_more_alternations_reach_a_smaller_error_than_plain_quantization():
    """Algorithm 1 with T = 5 at 4 bits: the final ‖W − Q_T − s·B_T A_T‖ stays below plain quantization's ‖W − Q0‖
    (the paper's objective, eq. 6), summed over the adapted layers."""
    from lorakit.quantize.nf4 import quantize_dequantize

    originals = {n: m.weight.detach().clone() for n, m in llama64().named_modules() if n.endswith(tuple(TARGETS))}
    model = lk.add_adapter(llama64(), loftq_config(4, 5, r=8, alpha=16))
    loftq = plain = 0.0
    for path, layer in adapter_layers(model):
        W = originals[path]
        delta_w = layer.adapters["default"].delta_weight().detach()
        loftq += float(torch.linalg.norm(W - layer.base_layer.weight - delta_w) ** 2)
        plain += float(torch.linalg.norm(W - quantize_dequantize(W, 4)) ** 2)
    assert loftq < plain


def test_save_load_redoes_loftq_and_gives_the_same_outputs(tmp_path):
    """The file carries loftq_config (PEFT reads it); loading redoes LoftQ on the original base (as PEFT's
    from_pretrained: update_layer -> loftq_init, then the state dict), then copies the trained A, B in."""
    from peft import LoraConfig as PeftLoraConfig

    model = lk.add_adapter(tiny_llama(), loftq_config(4, 2, r=4, alpha=8))
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.adapters["default"].lora_B.weight.mul_(1.5)  # as if trained
        expected = model(_ids()).logits
    lk.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq" and config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    assert PeftLoraConfig.from_pretrained(str(tmp_path / "a")).loftq_config == {"loftq_bits": 4, "loftq_iter": 2}
    loaded = lk.load_adapter(tiny_llama(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, expected)
    bases = {p: lay.base_layer.weight for p, lay in adapter_layers(model)}
    for path, layer in adapter_layers(loaded):
        assert torch.equal(layer.base_layer.weight, bases[path]), path


def test_restore_base_and_delete_adapter_put_the_original_weights_back():
    before = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    model = lk.add_adapter(tiny_llama(), loftq_config())
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight,
                           before["model.layers.0.self_attn.q_proj.weight"])
    lk.restore_base(model, "default")
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".adapters." not in k}
    for k, v in before.items():
        assert torch.equal(state[k], v), k
    lk.init_adapter(model, "default")  # runs again (the record was dropped), then delete_adapter undoes it
    lk.delete_adapter(model, "default")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_python_api_and_init_options_write_the_config():
    """``init_adapter(..., init="loftq", loftq_bits=8)`` on a plain LoRA: the option wins over the default and the
    adapter's config records what ran."""
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.init_adapter(model, "default", init="loftq", loftq_bits=8, loftq_iter=2)
    config = adapter_state(model).configs["default"]
    assert config.init_lora_weights == "loftq" and config.loftq_config == {"loftq_bits": 8, "loftq_iter": 2}
    assert lk.LoraConfig(init_lora_weights="loftq").loftq_config == {"loftq_bits": 4, "loftq_iter": 1}
    assert config.with_init("pissa").loftq_config == {}


def test_conv1d_bases_and_dora():
    """GPT-2's Conv1D (stored (in, out)): quantized and factorised as (out, in), the stored weight is Qᵀ. DoRA: the
    magnitude is ‖Q + s·B A‖ per row (as PEFT's DoRA variant init after loftq_init), so DoRA's step-0 output is
    LoRA's."""
    from lorakit.quantize.nf4 import quantize_dequantize

    w = tiny_gpt2().transformer.h[0].attn.c_attn.weight.detach().clone()  # (in, out)
    cfg = lk.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="loftq")
    gpt = lk.add_adapter(tiny_gpt2(), cfg)
    assert torch.equal(gpt.transformer.h[0].attn.c_attn.base_layer.weight, quantize_dequantize(w.T, 4).T)
    lora = lk.add_adapter(tiny_llama(), loftq_config(alpha=8))
    dora = lk.add_adapter(tiny_llama(), loftq_config(alpha=8, use_dora=True))
    with torch.no_grad():
        torch.testing.assert_close(dora(_ids()).logits, lora(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_checkpoint_records_round_trip():
    model = lk.add_adapter(tiny_llama(), loftq_config())
    tensors = init_record_tensors(model)
    records = pop_init_records(dict(tensors))
    record, config = records["default"]
    assert config.loftq_config == {"loftq_bits": 4, "loftq_iter": 1}
    ours = adapter_state(model).inits["default"].edits
    assert set(record.edits) == set(ours)
    for path, edit in record.edits.items():
        assert isinstance(edit, BaseSwap) and torch.equal(edit.original, ours[path].original)


@pytest.mark.parametrize("loftq,says", [
    ({"loftq_bits": 3}, r"loftq_bits'\]=3: LoftQ quantizes to 4 bits \(NF4\) or 8 bits"),
    ({"loftq_bits": 4, "loftq_iter": 0}, r"loftq_iter'\]=0 must be an integer >= 1"),
    ({"loftq_bit": 4}, r"has no key 'loftq_bit'. Did you mean: loftq_bits"),
])
def test_bad_settings_are_clear_errors(loftq, says):
    """Bit widths and iteration counts PEFT refuses (peft/utils/loftq_utils.py:59-62), misspelt keys."""
    with pytest.raises(lk.ConfigError, match=says):
        lk.LoraConfig(init_lora_weights="loftq", loftq_config=loftq)


@pytest.mark.parametrize("options,says", [({"loftq_bits": 2}, r"loftq_bits'\]=2"),
                                          ({"loftq_bitz": 4}, "unknown option 'loftq_bitz' for init 'loftq'")])
def test_bad_init_options_leave_the_adapter_as_it_was(options, says):
    before = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lk.ConfigError, match=says):
        lk.init_adapter(model, "default", init="loftq", **options)
    assert adapter_state(model).configs["default"].init_lora_weights is True
    _unchanged(model, before)


def test_settings_without_the_init_are_refused():
    with pytest.raises(lk.ConfigError, match=r"loftq_config=\{'loftq_bits': 4\} sets LoftQ, but init_lora_weights"):
        lk.LoraConfig(loftq_config={"loftq_bits": 4})


def _unchanged(model, before):
    for k, v in model.state_dict().items():
        if ".adapters." not in k:
            assert torch.equal(v, before[k.replace(".base_layer", "")]), k


def test_modules_it_cannot_handle_are_refused_with_the_model_unchanged():
    before = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(lk.AdapterError, match=r"'model.embed_tokens' is an embedding layer; LoftQ quantizes linear"):
        lk.init_adapter(model, "default", init="loftq")
    _unchanged(model, before)
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=40, target_modules=["q_proj"]))
    with pytest.raises(lk.AdapterError, match=r"r=40 at module .* exceeds min\(out, in\) = 32"):
        lk.init_adapter(model, "default", init="loftq")
    _unchanged(model, before)
    with pytest.raises(lk.ConfigError, match="init 'loftq' cannot initialise a 'lora_xs' adapter"):
        lk.add_adapter(tiny_llama(), lk.get_method("lora_xs").config_cls(r=2, target_modules=["q_proj"]),
                       init="loftq")


def test_a_4bit_base_is_refused():
    """LoftQ quantizes the full-precision base itself (PEFT's LoraConfig docstring: "you should not pass a quantized
    model in this case"); a 4-bit base no longer has W."""
    from lorakit.quantize import quantize_model

    model = lk.add_adapter(quantize_model(llama64()), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lk.AdapterError, match=r"init 'loftq' changes the base weights.*loftq quantizes it itself"):
        lk.init_adapter(model, "default", init="loftq")


def test_no_lora_for_the_untouched_base(tmp_path):
    model = lk.add_adapter(tiny_llama(), loftq_config())
    with pytest.raises(lk.AdapterError, match="no rank-2r LoRA can fold in"):
        lk.save_adapter(model, tmp_path / "x", original_base=True)
    assert not (tmp_path / "x").exists()


def test_merging_and_serving_refuse_it_with_the_reason(tmp_path):
    """A LoftQ adapter's ΔW from the original base is W − Q + s·B A, of full rank: merge_adapters cannot fold it in
    (the model is left as it was), and the serving / mixture check says why instead of suggesting an export."""
    from lorakit.compose import merge_adapters
    from lorakit.core.inits import changed_base_error

    lk.save_adapter(lk.add_adapter(tiny_llama(), loftq_config()), tmp_path / "loftq")
    lk.save_adapter(lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=TARGETS)), tmp_path / "plain")
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.ConfigError, match="replaced base weights by full-rank ones"):
        merge_adapters([str(tmp_path / "plain"), str(tmp_path / "loftq")], model=model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k.replace(".base_layer", "")]), k
    says = changed_base_error("x", "loftq", "every request runs on")
    assert "replaced the base weights" in says and "no LoRA for the untouched base exists" in says


def test_stacking_with_another_base_changing_init_is_refused():
    """PiSSA's W − s·B A then LoftQ's swap (or the other order): restore_base of one would undo the other wrongly.
    Refused, naming the other adapter; model unchanged."""
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.AdapterError, match="the init 'pissa' of adapter 'default' already changed"):
        lk.add_adapter(model, loftq_config(), "q")
    assert list(adapter_state(model).configs) == ["default"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model = lk.add_adapter(tiny_llama(), loftq_config())
    with pytest.raises(lk.AdapterError, match="the init 'loftq' of adapter 'default' already changed"):
        lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="olora"), "o")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights="olora"), "k")  # other modules


def test_loading_onto_weights_another_loftq_adapter_replaced_is_refused_and_attaches_nothing(tmp_path):
    lk.save_adapter(lk.add_adapter(tiny_llama(), loftq_config()), tmp_path / "a")
    model = lk.add_adapter(tiny_llama(), loftq_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.AdapterError, match="the init 'loftq' of adapter 'default' already changed"):
        lk.load_adapter(model, tmp_path / "a", "second")
    assert list(adapter_state(model).configs) == ["default"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_failure_partway_puts_back_the_bases_and_the_adapter_tensors(monkeypatch):
    """LoftQ writes one module at a time; when a later module fails (here: its quantization raises, as an out-of-
    memory error would), the modules already written get back their base weights and the adapter its tensors, so
    re-initialising a trained adapter loses nothing (were: the bases only; the trained A, B of the modules done
    were left as LoftQ factors)."""
    import lorakit.init.loftq as loftq
    from lorakit.core.model import adapter_parameters

    model = lk.add_adapter(llama64(), lk.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="gaussian"))
    with torch.no_grad():
        for p in adapter_parameters(model, "default").values():
            p.add_(0.1)  # "trained": B is no longer zero
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls, real = [], loftq.quantize_dequantize

    def failing(weight, bits):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(weight, bits)

    monkeypatch.setattr(loftq, "quantize_dequantize", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        lk.init_adapter(model, "default", init="loftq")
    assert len(calls) == 3  # two modules were written before the failure
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert adapter_state(model).configs["default"].init_lora_weights == "gaussian"
