"""LoRAM (``prune/loram.py``, arXiv:2502.13533): prune, train LoRA small, recover to the full shapes, merge.

Reference: junzhang-zj/LoRAM ``loram/3_recovered_low_rank_matrix_generation.py`` — MLP lines 30–52: for
``down_proj.lora_A`` a zero (r, len) matrix (``normA``: ``normal_(std=1/r)``) whose ``saved_columns = [i for i in
range(recover_len) if i not in pruned_neuro_idx]`` get the trained columns; ``gate/up_proj.lora_B`` the same on
rows. Attention lines 64–103: pruned kv channel indices, ``pruned_neuro_idx_kv[::head_dim] * (num_heads //
num_key_value_heads)`` as starts of the pruned q/o ranges of length ``head_dim * n_rep``. The test replays those
lines on our PrunePlan's complement.
"""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.prune.loram import LoramConfig, PrunePlan, loram_prune, plan_summary, recover_adapter, recover_state_dict

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEAD_DIM = 8


def _full(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _official_recover(pruned_adapter, plan, layer, full_cfg):
    """Lines 30–103 of the official recovery script, on the indices our plan pruned."""
    out = {}
    pre = f"base_model.model.model.layers.{layer}"
    inter = full_cfg.intermediate_size
    pruned_neuro_idx = torch.tensor([i for i in range(inter) if i not in plan.channels[layer].tolist()])
    for idx, m in enumerate([f"{pre}.mlp.down_proj.lora_A.weight", f"{pre}.mlp.gate_proj.lora_B.weight",
                             f"{pre}.mlp.up_proj.lora_B.weight"]):
        w = pruned_adapter[m]
        if idx == 0:
            recover_len = pruned_neuro_idx.shape[0] + w.shape[1]
            rw = torch.zeros((w.shape[0], recover_len))
            saved = [i for i in range(recover_len) if i not in pruned_neuro_idx]
            rw[:, saved] = w
        else:
            recover_len = pruned_neuro_idx.shape[0] + w.shape[0]
            rw = torch.zeros((recover_len, w.shape[1]))
            saved = [i for i in range(recover_len) if i not in pruned_neuro_idx]
            rw[saved, :] = w
        out[m] = rw
    num_heads, num_kv = full_cfg.num_attention_heads, full_cfg.num_key_value_heads
    pruned_kv_heads = [g for g in range(num_kv) if g not in plan.groups[layer].tolist()]
    pruned_idx_kv = torch.cat([torch.arange(g * HEAD_DIM, (g + 1) * HEAD_DIM) for g in pruned_kv_heads])
    starts = pruned_idx_kv[::HEAD_DIM] * (num_heads // num_kv)
    pruned_idx_qo = torch.cat([torch.arange(s, s + HEAD_DIM * (num_heads // num_kv)) for s in starts])
    for idx, m in enumerate([f"{pre}.self_attn.o_proj.lora_A.weight", f"{pre}.self_attn.q_proj.lora_B.weight",
                             f"{pre}.self_attn.k_proj.lora_B.weight", f"{pre}.self_attn.v_proj.lora_B.weight"]):
        w = pruned_adapter[m]
        if idx == 0:
            recover_len = pruned_idx_qo.shape[0] + w.shape[1]
            rw = torch.zeros((w.shape[0], recover_len))
            saved = [i for i in range(recover_len) if i not in pruned_idx_qo]
            rw[:, saved] = w
        else:
            index = pruned_idx_qo if "q_proj" in m else pruned_idx_kv
            recover_len = index.shape[0] + w.shape[0]
            rw = torch.zeros((recover_len, w.shape[1]))
            saved = [i for i in range(recover_len) if i not in index]
            rw[saved, :] = w
        out[m] = rw
    return out


@pytest.mark.parametrize("criterion", ["random", "magnitude"])
def test_recovery_matches_the_official_script(criterion):
    full = _full()
    pruned, plan = loram_prune(full, LoramConfig(ratio=0.5, criterion=criterion, seed=3))
    lk.add_adapter(pruned, lk.LoraConfig(r=4, target_modules=ALL, init_lora_weights=False))
    small = lk.adapter_state_dict(pruned)
    recovered = recover_state_dict(small, plan)
    for layer in range(3):
        for key, expected in _official_recover(small, plan, layer, full.config).items():
            torch.testing.assert_close(recovered[key], expected, rtol=0, atol=0)
    a_keys = [k for k in small if "q_proj.lora_A" in k]
    assert all(torch.equal(recovered[k], small[k]) for k in a_keys)  # the hidden side is never pruned


def test_pruned_model_is_smaller_and_loads_in_transformers(tmp_path):
    full = _full()
    pruned, plan = loram_prune(full, LoramConfig(ratio=0.5))
    assert pruned.config.num_key_value_heads == 1 and pruned.config.num_attention_heads == 2
    assert pruned.config.intermediate_size == 24 and full.config.intermediate_size == 48
    summary = plan_summary(plan, full, pruned)
    assert 0.2 < summary["removed_fraction"] < 0.6
    pruned.save_pretrained(tmp_path / "p")
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "p")(input_ids=ids).logits,
                                   pruned(input_ids=ids).logits)
    plan.save(tmp_path / "plan")
    again = PrunePlan.load(tmp_path / "plan")
    assert again.blocks == plan.blocks and all(torch.equal(again.channels[i], plan.channels[i]) for i in plan.channels)


def test_block_range_keeps_outer_blocks_whole():
    full = _full(layers=4)
    pruned, plan = loram_prune(full, LoramConfig(ratio=0.5, block_range=(1, 3)))
    widths = [layer.mlp.gate_proj.out_features for layer in pruned.model.layers]
    assert widths == [48, 24, 24, 48] and sorted(plan.blocks) == [1, 2]
    with torch.no_grad():
        assert pruned(input_ids=torch.randint(0, 64, (1, 5))).logits.isfinite().all()  # unequal widths run in memory


def test_train_small_infer_large(tmp_path):
    full = _full()
    pruned, plan = loram_prune(full, LoramConfig(ratio=0.5, seed=1))
    lk.add_adapter(pruned, lk.LoraConfig(r=4, lora_alpha=8, target_modules=ALL)).train()
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in pruned.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        pruned(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    lk.save_adapter(pruned, tmp_path / "small")
    recover_adapter(tmp_path / "small", plan, tmp_path / "large")
    large = lk.load_adapter(_full(), tmp_path / "large")
    # ΔW of every module: the small model's on the kept rows/columns, zero on the pruned ones.
    for layer in range(3):
        for name in ALL:
            part = "self_attn" if name in ALL[:4] else "mlp"
            small_delta = getattr(getattr(pruned.model.layers[layer], part), name).adapters["default"].delta_weight()
            big_delta = getattr(getattr(large.model.layers[layer], part), name).adapters["default"].delta_weight()
            dim, index, _ = plan.kept(f"model.layers.{layer}.{part}.{name}")
            torch.testing.assert_close(big_delta.index_select(dim, index), small_delta)
            assert big_delta.abs().sum().item() == pytest.approx(small_delta.abs().sum().item(), rel=1e-5)
    with torch.no_grad():
        before = large(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(_full(), tmp_path / "large")  # PEFT loads the recovered adapter
        torch.testing.assert_close(theirs(input_ids=ids).logits, before, rtol=0, atol=1e-5)
        merged = lk.merge_and_unload(large)
        torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    normal = recover_state_dict(lk.adapter_state_dict(pruned), plan, recover="normal")
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    pruned_cols = [c for c in range(48) if c not in plan.channels[0].tolist()]
    assert normal[key][:, pruned_cols].std().item() == pytest.approx(1 / 4, rel=0.3)  # normA: N(0, 1/r) in pruned columns


def test_loram_errors():
    with pytest.raises(lk.ConfigError, match="ratio"):
        LoramConfig(ratio=1.0)
    with pytest.raises(lk.ConfigError, match="criterion.*random"):
        LoramConfig(criterion="llm-pruner")
    with pytest.raises(lk.ConfigError, match="3 blocks"):
        loram_prune(_full(), LoramConfig(block_range=(0, 5)))
    model = lk.add_adapter(_full(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lk.LorakitError, match="without adapters"):
        loram_prune(model)


@pytest.mark.parametrize("quantize", [[], ["--quantize", "nf4"]], ids=["loram", "qloram"])
def test_cli_trains_small_and_writes_the_recovered_adapter(tmp_path, capsys, quantize):
    import json

    from safetensors.torch import load_file

    from lorakit.cli import main

    if quantize:
        pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    assert main(["train", "--loram-ratio", "0.5", *quantize, "--data", "reverse", "--steps", "2", "--batch-size", "2",
                 "--train-examples", "4", "--eval-examples", "2", "--output", str(out), "--quiet", "--r", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "after_pruned_model" in summary and "exact_match" in summary["after"]
    small = load_file(out / "adapter_pruned" / "adapter_model.safetensors")
    large = load_file(out / "adapter" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    assert small[key].shape == (344, 2) and large[key].shape == (688, 2)
    assert PrunePlan.load(out / "loram_plan").channels[0].numel() == 344
    assert main(["merge", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "merged")]) == 0


def test_cli_pruned_adapter_records_the_pruned_base_and_evaluates_without_model(tmp_path, capsys):
    """adapter_pruned/ fits the pruned base, not the full one its config recorded: ``lorakit eval`` of it without
    --model loaded the full base and failed on the first shape. The run writes the pruned base (pruned_base/, a
    transformers model with its tokenizer) and the pruned adapter records it; the recovered adapter records the full
    base. The saved base is the one training used: its output with the adapter equals the same prune of the bundled
    model's (LoRAM-Rand, seed 0) with the same adapter."""
    import json

    from lorakit.cli import main
    from lorakit.hub import bundled_name, load_model_and_tokenizer

    out = tmp_path / "run"
    assert main(["train", "--loram-ratio", "0.5", "--data", "reverse", "--steps", "2", "--batch-size", "2",
                 "--train-examples", "4", "--eval-examples", "2", "--output", str(out), "--quiet", "--r", "2"]) == 0
    recorded = {name: json.loads((out / name / "adapter_config.json").read_text())["base_model_name_or_path"]
                for name in ("adapter_pruned", "adapter")}
    assert recorded["adapter_pruned"] == "../pruned_base"  # beside it in the run folder (next test: moving it)
    assert bundled_name(recorded["adapter"]) == "bundled"
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "adapter_pruned"), "--data", "reverse", "--eval-examples", "2"]) == 0
    assert f"base model: {(out / 'pruned_base').resolve()}" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(out / "adapter_pruned"), "--prompt", "abc", "--max-new-tokens", "2"]) == 0
    saved = lk.load_adapter(load_model_and_tokenizer(str(out / "pruned_base"))[0], out / "adapter_pruned")
    pruned, _ = loram_prune(load_model_and_tokenizer(None)[0], LoramConfig(ratio=0.5, seed=0))
    pruned = lk.load_adapter(pruned, out / "adapter_pruned")
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        torch.testing.assert_close(saved.eval()(ids).logits, pruned.eval()(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("move", [shutil.move, shutil.copytree], ids=["moved", "copied"])
def test_a_moved_or_copied_loram_run_still_loads_its_pruned_base(tmp_path, capsys, move):
    """adapter_pruned/ and the checkpoints record their base as ``../pruned_base``: after the run folder is moved
    (or copied and the original deleted) ``lorakit eval`` finds the base beside them. Was: the absolute path of the
    original run folder, so a moved run failed with "... was trained on '/old/run/pruned_base', which cannot be
    loaded here". A folder an older lorakit wrote (absolute path, nothing moved) still loads."""
    from lorakit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--loram-ratio", "0.5", "--data", "reverse", "--steps", "2", "--save-every", "1",
                 "--batch-size", "2", "--train-examples", "4", "--eval-examples", "2", "--output", str(out), "--quiet",
                 "--r", "2"]) == 0
    for folder in ("adapter_pruned", "checkpoint-1"):
        assert json.loads((out / folder / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            "../pruned_base"
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    move(str(out), str(moved))
    shutil.rmtree(out, ignore_errors=True)
    for folder in ("adapter_pruned", "checkpoint-1"):
        capsys.readouterr()
        assert main(["eval", "--adapter", str(moved / folder), "--data", "reverse", "--eval-examples", "2"]) == 0
        assert f"base model: {(moved / 'pruned_base').resolve()}" in capsys.readouterr().err
    config_file = moved / "adapter_pruned" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": str((moved / "pruned_base").resolve())}))
    assert main(["eval", "--adapter", str(moved / "adapter_pruned"), "--data", "reverse", "--eval-examples", "2"]) == 0


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_cli_with_a_base_changing_init_recovers_the_trained_delta(tmp_path, init):
    """PiSSA / OLoRA move W's principal part into the adapter of the *pruned* base. Their files said
    ``init_lora_weights="pissa"``, so loading the recovered adapter on the full model re-ran PiSSA on the full
    weights (another SVD) and added the small model's factors on top. LoRAM's recovered delta must be what training
    changed on the pruned base, ΔW = W_small_trained − W_small (paper Eq. 3, ``W* = W_0 + R(B A)``), on the kept
    rows / columns and zero elsewhere. Both sides are merged by real PEFT."""
    from lorakit.cli import main
    from lorakit.hub import load_model_and_tokenizer

    out = tmp_path / "run"
    assert main(["train", "--loram-ratio", "0.5", "--init", init, "--data", "reverse", "--steps", "2", "--lr", "0.05",
                 "--batch-size", "2", "--train-examples", "4", "--eval-examples", "2", "--output", str(out), "--quiet",
                 "--r", "2", "--target-modules", "q_proj", "down_proj"]) == 0
    full = load_model_and_tokenizer(None)[0]
    small, plan = loram_prune(load_model_and_tokenizer(None)[0], LoramConfig(ratio=0.5, seed=0))
    small_orig = {k: v.clone() for k, v in small.state_dict().items()}
    full_orig = {k: v.clone() for k, v in full.state_dict().items()}
    with torch.no_grad():
        small_new = peft.PeftModel.from_pretrained(small, out / "adapter_pruned").merge_and_unload().state_dict()
        full_new = peft.PeftModel.from_pretrained(full, out / "adapter").merge_and_unload().state_dict()
    checked = 0
    for key, w in full_orig.items():
        if not key.endswith(("q_proj.weight", "down_proj.weight")):
            torch.testing.assert_close(full_new[key], w, rtol=0, atol=0)
            continue
        small_delta = small_new[key] - small_orig[key]
        big_delta = full_new[key] - w
        dim, index, _ = plan.kept(key.removesuffix(".weight"))
        torch.testing.assert_close(big_delta.index_select(dim, index), small_delta, rtol=0, atol=1e-5)
        assert big_delta.abs().sum().item() == pytest.approx(small_delta.abs().sum().item(), rel=1e-4)
        assert small_delta.abs().max() > 1e-4  # training moved it
        checked += 1
    assert checked == 12


def test_recover_refuses_an_adapter_whose_init_reruns_on_load(tmp_path):
    """A PiSSA adapter saved as PiSSA is relative to the pruned base's residual; recovered as it is, loading would
    redo PiSSA on the full model. recover_adapter says to save it for the original base first (which then works)."""
    full = _full()
    pruned, plan = loram_prune(full, LoramConfig(ratio=0.5, seed=1))
    lk.add_adapter(pruned, lk.LoraConfig(r=2, lora_alpha=4, target_modules=ALL), init="pissa")
    lk.save_adapter(pruned, tmp_path / "small")
    with pytest.raises(lk.AdapterError, match="init_lora_weights='pissa' is redone .*original_base=True"):
        recover_adapter(tmp_path / "small", plan, tmp_path / "large")
    assert not (tmp_path / "large").exists()
    lk.save_adapter(pruned, tmp_path / "small_plain", original_base=True)
    recover_adapter(tmp_path / "small_plain", plan, tmp_path / "large")

def test_recover_refuses_a_pickle_only_adapter_without_unpickling_it(tmp_path):
    """A folder holding only adapter_model.bin (PEFT's legacy pickle) was refused as "missing weights file" here,
    unlike every other loader, which names the pickle and how to convert it; it is never unpickled either way."""
    import pickle

    _, plan = loram_prune(_full(), LoramConfig(ratio=0.5, seed=1))
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "adapter_config.json").write_text('{"peft_type": "LORA", "target_modules": ["q_proj"]}')
    marker = tmp_path / "unpickled"
    (tmp_path / "small" / "adapter_model.bin").write_bytes(pickle.dumps(_Unpickled(str(marker))))
    with pytest.raises(lk.AdapterLoadError, match=r"only adapter_model\.bin, a pickle file; lorakit never unpickles"):
        recover_adapter(tmp_path / "small", plan, tmp_path / "large")
    assert not marker.exists() and not (tmp_path / "large").exists()


class _Unpickled:
    """Unpickling this creates a marker file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# -- alignment (pipeline step 1, ``loram/1_pruned_full_rank_weight_alignment.py``) ------------------------------
def _pattern_blocks(n, seq=12, seed=0):
    """Token blocks with learnable structure for the tiny vocab-64 model: each row counts up mod 64 from a random start."""
    starts = torch.randint(0, 64, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(seq)) % 64  # (n, seq)


def test_alignment_reduces_held_out_loss_trains_all_but_lm_head_and_keeps_the_original():
    from lorakit.pretrain.loram_align import AlignConfig, align_pruned

    full = _full()
    original = {k: v.clone() for k, v in full.state_dict().items()}
    pruned, plan = loram_prune(full, LoramConfig(ratio=0.5, seed=2))
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    config = AlignConfig(steps=30, lr=1e-2, batch_size=8, seq_len=12, warmup_steps=3, bf16=False)
    result = align_pruned(pruned, None, config, blocks=(_pattern_blocks(64), _pattern_blocks(16, seed=1)), log=lambda s: None)
    assert result["eval_loss_after"] < result["eval_loss_before"] - 0.5
    assert result["tokens"] == 30 * 8 * 12 and len(result["train_loss_curve"]) == 10
    after = pruned.state_dict()
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])  # frozen, as the official lines 69–73
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # untied here
    assert not torch.equal(after["model.layers.1.mlp.down_proj.weight"], before["model.layers.1.mlp.down_proj.weight"])
    assert all(torch.equal(full.state_dict()[k], v) for k, v in original.items())  # the original model is untouched
    assert all(p.requires_grad for p in pruned.parameters())  # flags restored (a fresh model: all True)

    # the adapter trained on the aligned small model still recovers to, and merges into, the original shapes
    lk.add_adapter(pruned, lk.LoraConfig(r=2, target_modules=ALL, init_lora_weights=False))
    large = lk.load_adapter(_full(), _saved_recovered(pruned, plan))
    merged = lk.merge_and_unload(large)
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in original.items()}
    delta = merged.model.layers[0].mlp.up_proj.weight - original["model.layers.0.mlp.up_proj.weight"]
    pruned_rows = [c for c in range(48) if c not in plan.channels[0].tolist()]
    assert delta[pruned_rows].abs().max() == 0 and delta.abs().max() > 0  # ΔW lands on the kept rows only


def _saved_recovered(pruned, plan):
    import tempfile

    folder = tempfile.mkdtemp()
    lk.save_adapter(pruned, f"{folder}/small")
    return recover_adapter(f"{folder}/small", plan, f"{folder}/large")


@pytest.mark.slow  # builds the offline corpus from the whole stdlib: minutes on a loaded 2-core machine
def test_alignment_on_the_bundled_corpus_lowers_the_pruned_models_loss():
    """The bundled base pruned by half, aligned a few steps on lorakit's offline pretraining corpus: its held-out
    LM loss goes down; the tied embedding / lm_head stays as it was."""
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.pretrain.loram_align import AlignConfig, align_pruned

    full, tokenizer = load_model_and_tokenizer(None)
    pruned, _ = loram_prune(full, LoramConfig(ratio=0.5))
    head = pruned.lm_head.weight.clone()
    config = AlignConfig(steps=6, lr=2e-3, batch_size=4, seq_len=64, warmup_steps=1, corpus_chars=40_000, eval_blocks=8)
    result = align_pruned(pruned, tokenizer, config, log=lambda s: None)
    assert result["eval_loss_after"] < result["eval_loss_before"]
    assert torch.equal(pruned.lm_head.weight, head) and pruned.model.embed_tokens.weight is pruned.lm_head.weight


def test_alignment_errors():
    from lorakit.pretrain.loram_align import AlignConfig, align_pruned

    with pytest.raises(lk.ConfigError, match="steps"):
        AlignConfig(steps=0)
    with pytest.raises(lk.ConfigError, match="warmup_steps"):
        AlignConfig(steps=5, warmup_steps=6)
    with pytest.raises(lk.ConfigError, match="max_position_embeddings"):
        align_pruned(_full(), None, AlignConfig(seq_len=64), blocks=(_pattern_blocks(8), _pattern_blocks(2)))
    model = lk.add_adapter(_full(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lk.LorakitError, match="before add_adapter"):
        align_pruned(model, None, AlignConfig(seq_len=12), blocks=(_pattern_blocks(8), _pattern_blocks(2)))


def test_cli_align_steps_need_loram_ratio(tmp_path, capsys):
    from lorakit.cli import main

    assert main(["train", "--loram-align-steps", "2", "--data", "reverse", "--steps", "1", "--output",
                 str(tmp_path / "x")]) == 2
    assert "give --loram-ratio too" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--loram-align-lr", "0.01"], "give --loram-ratio too"),
    (["--loram-ratio", "0.5", "--loram-align-lr", "0.01"], "give --loram-align-steps N too"),
    (["--loram-ratio", "0.5", "--loram-align-steps", "-1"], "--loram-align-steps must be >= 0"),
    # was: AdamW at lr inf trained the pruned base to NaN (then, with the pretraining loop's own check, an error
    # naming --lr, a flag of the adapter's training, after the model had loaded)
    (["--loram-ratio", "0.5", "--loram-align-steps", "2", "--loram-align-lr", "inf"],
     "--loram-align-lr must be > 0 and finite, got inf."),
    (["--loram-ratio", "0.5", "--method", "mixlora"], "--method mixlora makes other tensors"),
    (["--loram-ratio", "0.5", "--use-dora"], "--use-dora adds tensors"),
    (["--loram-ratio", "0.5", "--lora-bias"], "--lora-bias adds tensors"),
])
def test_cli_loram_flags_are_checked_before_anything_runs(tmp_path, capsys, flags, message):
    """LoRAM recovers lora_A / lora_B only: a mixture's expert tensors or a DoRA magnitude stayed at the pruned width
    and were found only after training (a mixlora run left an adapter that does not load); the alignment flags
    need LoRAM. All refused up front, with no output folder."""
    from lorakit.cli import main

    assert main(["train", *flags, "--data", "reverse", "--steps", "1", "--output", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # the corpus, as above
def test_cli_aligns_the_pruned_base_before_training(tmp_path, capsys):
    from lorakit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--loram-ratio", "0.5", "--loram-align-steps", "2", "--data", "reverse", "--steps", "1",
                 "--batch-size", "2", "--train-examples", "4", "--eval-examples", "2", "--output", str(out), "--quiet",
                 "--r", "2"]) == 0
    printed = capsys.readouterr().out
    assert "LoRAM alignment: 4,096 tokens" in printed and "held-out LM loss of the pruned base" in printed
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_an_interrupted_recovery_leaves_no_half_adapter(tmp_path, monkeypatch):
    """Saves are atomic (DESIGN.md): the recovered folder was created first and filled file by file, so a recovery
    killed after the weights left an adapter folder without adapter_config.json. Other files of the source folder
    (task_index.json) now go along with the recovered adapter."""
    import lorakit.prune.loram as loram

    pruned, plan = loram_prune(_full(), LoramConfig(ratio=0.5, seed=1))
    lk.add_adapter(pruned, lk.LoraConfig(r=2, target_modules=ALL))
    lk.save_adapter(pruned, tmp_path / "small")
    (tmp_path / "small" / "task_index.json").write_text('{"reverse": 0}')

    def killed(path, obj):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loram, "atomic_write_json", killed)  # the config, written after the weights
        with pytest.raises(KeyboardInterrupt):
            recover_adapter(tmp_path / "small", plan, tmp_path / "large")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]
    recover_adapter(tmp_path / "small", plan, tmp_path / "large")
    assert (tmp_path / "large" / "task_index.json").read_text() == '{"reverse": 0}'
    lk.load_adapter(_full(), tmp_path / "large")


def test_a_mistyped_criterion_or_recovery_names_its_near_match():
    """Was: "choose one of ('random', 'magnitude')" with no near match, where the other name checks say one."""
    with pytest.raises(lk.ConfigError, match=r"criterion='magnitud': choose one of .*Did you mean: magnitude\?"):
        LoramConfig(ratio=0.5, criterion="magnitud")
    _, plan = loram_prune(_full(), LoramConfig(ratio=0.5))
    with pytest.raises(lk.ConfigError, match=r"recover='zeros': choose one of .*Did you mean: zero\?"):
        recover_state_dict({}, plan, recover="zeros")
