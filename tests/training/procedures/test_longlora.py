"""LongLoRA (``training/procedures/longlora.py``): S²-Attn against the official code's equations, standard
attention at inference, trainable embeddings and norms, RoPE position interpolation.

References, written here from the official code (dvlab-research/LongLoRA, commit d4eb344, ``llama_attn_replace.py``):

- ``official_roll``: ``forward_noflashattn`` lines 286-326: heads ``num_heads//2:`` of q/k/v rolled by
  ``-group_size // 2`` on the sequence (288), reshaped to ``(bsz * q_len/G, G)`` groups (289), attention with the
  causal mask's top-left ``G × G`` block in every group (296-314), output heads ``num_heads//2:`` rolled back by
  ``group_size//2`` (326).
- ``official_flash``: ``forward_flashattn`` lines 104-119: the two head halves as two sequences (104), causal
  attention in the segments of ``cu_seqlens`` built at 110-112 (``arange(0, max_s, G)`` and ``+ G // 2``,
  offset by each sequence's start, closed by its end), ``flash_attn_varlen_qkvpacked_func(..., causal=True)``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.core.errors import ConfigError
from lorakit.training import TrainConfig, get_procedure, make_optimizer, train
from lorakit.training.procedures.longlora import (LongLoraConfig, apply_rope_linear_scaling, load_trainable_params,
                                                  s2_attention_core, s2_group_size)

from lk_models import tiny_llama_for


def _causal(q, k, v):  # (h, n, d) each -> (h, n, d)
    n = q.shape[1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


def official_roll(q, k, v, group_size):
    """forward_noflashattn (lines 286-326). q/k/v (bsz, nh, q_len, hd) -> (bsz, q_len, nh, hd)."""
    bsz, nh, q_len, hd = q.shape

    def shift(qkv):
        qkv = qkv.clone()
        qkv[:, nh // 2:] = qkv[:, nh // 2:].roll(-group_size // 2, dims=2)
        return qkv.transpose(1, 2).reshape(bsz * (q_len // group_size), group_size, nh, hd).transpose(1, 2)

    q, k, v = shift(q), shift(k), shift(v)
    weights = q @ k.transpose(2, 3) / math.sqrt(hd)
    mask = torch.full((group_size, group_size), float("-inf")).triu(1)  # the causal mask's top-left G×G block
    out = (weights + mask).softmax(-1) @ v
    out = out.transpose(1, 2).reshape(bsz, q_len, nh, hd)
    out[:, :, nh // 2:] = out[:, :, nh // 2:].roll(group_size // 2, dims=1)
    return out


def official_flash(q, k, v, group_size):
    """forward_flashattn (lines 104-119) for one unpadded sequence. q/k/v (1, nh, q_len, hd) -> (1, q_len, nh, hd)."""
    _, nh, q_len, hd = q.shape
    bsz, max_s = 1, q_len
    cu_q_lens = torch.tensor([0, q_len, 2 * q_len])  # unpad_input of the two half-head sequences
    tmp = torch.arange(0, max_s, group_size)
    tmp = torch.stack([tmp, tmp + group_size // 2]).repeat(bsz, 1) + cu_q_lens[:-1].unsqueeze(-1)
    cu = torch.cat([tmp, cu_q_lens[1:].unsqueeze(-1)], dim=-1).view(-1).tolist()
    # the packed stream: first-half heads of the sequence, then second-half heads (line 104's permute)
    stream = [torch.cat([t[0, : nh // 2], t[0, nh // 2:]], dim=1) for t in (q, k, v)]  # (nh/2, 2 q_len, hd)
    out = torch.zeros_like(stream[0])
    bounds = sorted(set(cu))
    for start, end in zip(bounds[:-1], bounds[1:]):
        out[:, start:end] = _causal(*(t[:, start:end] for t in stream))
    return torch.cat([out[:, :q_len], out[:, q_len:]], dim=0).transpose(0, 1)[None]  # (1, q_len, nh, hd)


def _qkv(b=2, h=4, n=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("n,group", [(16, 4), (32, 8), (24, 6)])
def test_s2_attention_equals_official_flash_path(n, group):
    q, k, v = _qkv(n=n)
    ours = s2_attention_core(q, k, v, group)
    for row in range(q.shape[0]):
        ref = official_flash(q[row:row + 1], k[row:row + 1], v[row:row + 1], group)
        torch.testing.assert_close(ours[row:row + 1], ref)


def test_s2_attention_equals_official_roll_path_except_its_wraparound():
    q, k, v = _qkv(n=16)
    group, h = 4, q.shape[1]
    ours, ref = s2_attention_core(q, k, v, group), official_roll(q, k, v, group)
    torch.testing.assert_close(ours[:, :, : h // 2], ref[:, :, : h // 2])  # unshifted heads: all positions
    torch.testing.assert_close(ours[:, group // 2:, h // 2:], ref[:, group // 2:, h // 2:])
    # Tokens 0..G/2 of the shifted heads: the roll path lets them see tokens L-G/2..L (wrap-around); the flash
    # path (followed here) does not.
    assert not torch.allclose(ours[:, : group // 2, h // 2:], ref[:, : group // 2, h // 2:])


def test_s2_attention_is_sparse_not_full():
    q, k, v = _qkv(n=16)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert not torch.allclose(s2_attention_core(q, k, v, 4), full)
    # group = sequence: unshifted heads are full causal attention
    torch.testing.assert_close(s2_attention_core(q, k, v, 16)[:, :, :2], full[:, :, :2])


def test_s2_attention_right_padding_matches_each_row_alone():
    q, k, v = _qkv(n=16)
    lengths = [16, 11]
    valid = torch.arange(16)[None] < torch.tensor(lengths)[:, None]
    ours = s2_attention_core(q, k, v, 4, key_valid=valid)
    assert torch.isfinite(ours).all()
    for row, n in enumerate(lengths):  # official: unpad, groups from each sequence's start, G from the padded q_len
        ref = official_flash(q[row:row + 1, :, :n], k[row:row + 1, :, :n], v[row:row + 1, :, :n], 4)
        torch.testing.assert_close(ours[row:row + 1, :n], ref)


@pytest.mark.parametrize("n,group", [(16, 4), (30, 6), (8, 8)])
def test_unmasked_and_masked_layouts_agree(n, group):
    q, k, v = _qkv(n=n)
    everything = torch.ones(q.shape[0], n, dtype=torch.bool)
    torch.testing.assert_close(s2_attention_core(q, k, v, group), s2_attention_core(q, k, v, group, key_valid=everything))


def test_group_size_rule():
    assert s2_group_size(8192, 0.25) == 2048  # the paper's 8k setting
    assert s2_group_size(30, 0.25) == 6  # int(7.5) = 7, rounded down to even
    assert s2_group_size(6, 0.25) == 0  # too short: full attention
    q, k, v = _qkv(n=30)
    out = s2_attention_core(q, k, v, 6)  # not a multiple of G: padded inside, pad invisible to real tokens
    torch.testing.assert_close(out, s2_attention_core(F.pad(q, (0, 0, 0, 6)), F.pad(k, (0, 0, 0, 6)),
                                                      F.pad(v, (0, 0, 0, 6)), 6)[:, :30])


def _model(tokenizer, **overrides):
    cfg = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = tiny_llama_for(tokenizer, **{**cfg, **overrides})
    base.set_attn_implementation("sdpa")
    return lk.add_adapter(base, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj"],
                                              init_lora_weights="gaussian"))


def test_llama_trains_with_s2_attn_and_infers_with_full_attention(tokenizer):
    """Through transformers' attention interface, the host model's source untouched: in training mode each
    layer computes the official flash path's attention (a reference registered as its own attention function);
    in eval mode it is the plain SDPA model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        reps = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(reps, 1), value.repeat_interleave(reps, 1)
        rows = [official_flash(*(t[i:i + 1].double() for t in (query, key, value)), 8) for i in range(len(query))]
        return torch.cat(rows).to(query.dtype), None

    AttentionInterface.register("test_longlora_ref", reference)
    AttentionMaskInterface.register("test_longlora_ref", sdpa_mask)
    model = _model(tokenizer)
    plain = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("test_longlora_ref")
    config = TrainConfig(max_length=32, procedure="longlora")
    procedure = get_procedure("longlora").build(config)
    make_optimizer(model, "default", config, procedure=procedure)
    assert model.config._attn_implementation == "lorakit_s2"
    ids = torch.randint(3, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
    model.train(), ref.train(), plain.train()
    s2 = model(input_ids=ids).logits
    torch.testing.assert_close(s2, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-4)  # G = 32 / 4 = 8
    assert not torch.allclose(s2, plain(input_ids=ids).logits, atol=1e-4)
    model.eval(), plain.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    procedure.finish(model, "default")
    assert model.config._attn_implementation == "sdpa"
    model.train()
    torch.testing.assert_close(model(input_ids=ids).logits, plain.train()(input_ids=ids).logits)


def test_llama_padded_batch_in_training_mode(tokenizer):
    """A right-padded row (transformers passes SDPA's 4-D mask): its real tokens get the logits of the unpadded
    batch (pads sit after every real token, so they are invisible under causal groups), and nothing is NaN."""
    model = _model(tokenizer)
    config = TrainConfig(max_length=32, procedure="longlora")
    make_optimizer(model, "default", config, procedure=get_procedure("longlora").build(config))
    model.train()
    ids = torch.randint(3, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0
    padded = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(padded).all()
    full = model(input_ids=ids).logits
    torch.testing.assert_close(padded[0], full[0])
    torch.testing.assert_close(padded[1, :20], full[1, :20])


def test_embeddings_and_norms_train_with_the_adapter(tokenizer, reverse_train):
    model = _model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(steps=2, batch_size=4, lr=1e-2, max_length=64, procedure="longlora")
    train(model, tokenizer, reverse_train, config, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert "model.layers.0.input_layernorm.weight" in changed
    assert any("lora_B" in n for n in changed)
    assert not any(n.endswith("q_proj.base_layer.weight") or "mlp" in n for n in changed)
    assert model.config._attn_implementation == "sdpa"  # restored at the end of the run


def test_trained_embeddings_norms_and_rope_reload_into_a_fresh_base(tokenizer, reverse_train, tmp_path):
    model = _model(tokenizer, max_position_embeddings=16)
    fresh = copy.deepcopy(model)
    config = TrainConfig(steps=2, batch_size=4, lr=1e-2, max_length=40, output_dir=str(tmp_path), procedure="longlora")
    with pytest.warns(UserWarning, match="factor 3"):  # ceil(40 / 16)
        train(model, tokenizer, reverse_train, config, progress=False)
    lk.delete_adapter(fresh, "default")
    loaded = load_trainable_params(fresh, tmp_path)
    assert "model.embed_tokens.weight" in loaded and "model.norm.weight" in loaded
    lk.load_adapter(fresh, tmp_path / "adapter", "default")
    ids = torch.randint(3, len(tokenizer), (1, 40), generator=torch.Generator().manual_seed(0))
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="no parameter"):
        load_trainable_params(tiny_llama_for(tokenizer, num_hidden_layers=1), tmp_path)


def test_rope_position_interpolation_as_fine_tune_py(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_llama_for(tokenizer, max_position_embeddings=32)
    assert apply_rope_linear_scaling(model, 32) == 1.0
    assert apply_rope_linear_scaling(model, 100) == 4.0  # ceil(100 / 32)
    config = LlamaConfig(**{**model.config.to_dict(), "rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                                          "rope_theta": 10000.0}})
    scaled = LlamaForCausalLM(config)
    scaled.load_state_dict(model.state_dict())
    ids = torch.randint(3, len(tokenizer), (1, 100), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(input_ids=ids).logits, scaled(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="default RoPE"):
        apply_rope_linear_scaling(model, 1000)


def test_bad_options_say_what_to_change(tokenizer):
    with pytest.raises(ConfigError, match="group_size_ratio"):
        LongLoraConfig(group_size_ratio=0.0)
    config = TrainConfig(procedure="longlora", procedure_args={"trainable_params": "embedz"})
    with pytest.raises(ConfigError, match="matches no base parameter"):
        make_optimizer(_model(tokenizer), "default", config, procedure=get_procedure("longlora").build(config))


def test_cli_eval_loads_the_trained_embeddings_and_norms(tmp_path, capsys):
    """`lorakit eval --adapter RUN/adapter` loads RUN/trainable_params.safetensors too: the same score as the
    training run's own final evaluation (without it the adapter scored differently; found by a break test). The CLI
    runs in-process (tests/test_cli.py::test_console_script_runs covers the console script)."""
    import json

    from lorakit.cli import main

    run = tmp_path / "run"
    common = ["--data", "reverse", "--eval-examples", "8"]
    assert main(["train", "--procedure", "longlora", "--steps", "3", "--lr", "0.01", "--batch-size", "4",
                 "--train-examples", "32", "--max-length", "64", "--output", str(run), "--quiet", *common]) == 0
    capsys.readouterr()
    assert (run / "trainable_params.safetensors").is_file()
    after = json.loads((run / "summary.json").read_text())
    assert after["procedure"] == "longlora"
    assert main(["eval", "--adapter", str(run / "adapter"), *common]) == 0
    out = capsys.readouterr()
    assert "base tensors trained with the adapter" in out.err
    assert f"{after['after']['exact_match']:.3f}" in out.out, (out.out, after["after"])
