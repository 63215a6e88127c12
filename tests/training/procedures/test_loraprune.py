"""LoRAPrune (``training/procedures/loraprune.py``) against the official code's equations.

Reference: aim-uofa/LoRAPrune ``loraprune/utils.py`` — ``compute_sensitivity`` (lines 60–87):
``grad = grad_b @ a + b @ grad_a - grad_b @ grad_a``; ``s = |grad * (b @ a * scaling + W)|``; transposed for
o_proj/down_proj (``pruning_groups['block']``); attention rows summed per head (``s.reshape(out // head_dim, -1)
.sum(1)``); L2-normalised; ``update_sensitivity_dict`` (44–58) sums the block's modules and keeps
``0.9 * old + 0.1 * new``; ``schedule_sparsity_ratio`` (171–188). The test re-derives those from the LoRA
tensors with plain loops, on a multi-head model (one head = one unit, as the official code).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.training import TrainConfig, get_procedure, train
from lorakit.training.procedures.loraprune import export_pruned, sparsity_schedule

from lk_models import tiny_llama_for

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(tokenizer, kv_heads=4, layers=2, seed=0):
    base = tiny_llama_for(tokenizer, seed=seed, num_attention_heads=4, num_key_value_heads=kv_heads,
                          num_hidden_layers=layers)
    return lk.add_adapter(base, lk.LoraConfig(r=2, lora_alpha=4, target_modules=ALL, init_lora_weights=False)).train()


def _procedure(model, **args):
    config = TrainConfig(steps=100, procedure="loraprune", procedure_args=args)
    proc = get_procedure("loraprune").build(config)
    proc.param_groups(model, "default", [])
    return proc


@pytest.mark.parametrize("step,expected", [(0, 0.0), (10, 0.0), (30, 0.5 - 0.5 * 0.75 ** 3), (50, 0.4375),
                                           (90, 0.5), (95, 0.5)])
def test_cubic_schedule_matches_the_official_formula(step, expected):
    # T=100, warm-up 0.1, cool-down 0.1, r0=0, rf=0.5: mul = 1 - (t - 10) / 80; r = 0.5 + (0 - 0.5) * mul³.
    assert sparsity_schedule(step, 100, 0.1, 0.1, 0.0, 0.5) == pytest.approx(expected)


def _official_sensitivity(layer, head_dim, is_attn, transpose):
    unit = layer.adapters["default"]
    a, b = unit.lora_A.weight.detach(), unit.lora_B.weight.detach()
    grad_a, grad_b = unit.lora_A.weight.grad, unit.lora_B.weight.grad
    grad = grad_b @ a + b @ grad_a - grad_b @ grad_a
    s = (grad * (b @ a * unit.scaling + layer.base_layer.weight.detach())).abs()
    if transpose:
        s = s.t()
    if is_attn:
        s = s.reshape(s.shape[0] // head_dim, -1)
    s = s.sum(1)
    return s / (torch.linalg.norm(s) + 1e-8)


def test_importance_and_moving_average_match_the_official_code(tokenizer, reverse_train):
    model = _model(tokenizer)
    proc = _procedure(model)
    ids = tokenizer([ex.prompt + ex.completion for ex in reverse_train[:4]], return_tensors="pt", padding=True)
    model(**ids, labels=ids["input_ids"]).loss.backward()
    proc.on_gradients(model, "default", step=1)  # 1 % prune_freq != 0: importance only, no pruning
    for i, layer in enumerate(model.model.layers):
        attn = sum(_official_sensitivity(getattr(layer.self_attn, n), 8, True, n == "o_proj")
                   for n in ["q_proj", "k_proj", "v_proj", "o_proj"])
        mlp = sum(_official_sensitivity(getattr(layer.mlp, n), 8, False, n == "down_proj")
                  for n in ["gate_proj", "up_proj", "down_proj"])
        torch.testing.assert_close(proc.importance[f"attn.{i}"], 0.1 * attn)  # 0.9 * 0 + 0.1 * new
        torch.testing.assert_close(proc.importance[f"mlp.{i}"], 0.1 * mlp)
    assert all(m.all() for m in proc.masks.values())
    proc.on_gradients(model, "default", step=2)
    for i in range(2):
        assert proc.importance[f"attn.{i}"].abs().sum() > 0


def test_pruning_masks_lowest_importance_and_keeps_pruned_units_pruned():
    proc = get_procedure("loraprune").build(TrainConfig(steps=10, procedure="loraprune"))
    proc.blocks = []
    proc.config.protected_blocks = ""
    proc.importance = {"mlp.0": torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4])}
    proc.masks = {"mlp.0": torch.ones(8)}
    proc.blocks = [type("B", (), {"index": 0})()]
    proc.masks["attn.0"], proc.importance["attn.0"] = torch.ones(4), torch.tensor([0.3, 0.1, 0.2, 0.4])
    proc.prune_to(0.25)  # int(8 * 0.25) = 2 channels, int(4 * 0.25) = 1 group
    assert proc.masks["mlp.0"].tolist() == [1, 0, 1, 1, 1, 0, 1, 1]
    assert proc.masks["attn.0"].tolist() == [1, 0, 1, 1]
    proc.importance["mlp.0"][1] = 10.0  # a masked unit's importance is multiplied by its mask (0): stays pruned
    proc.prune_to(0.5)
    assert proc.masks["mlp.0"].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_masked_model_equals_the_physically_pruned_model(tokenizer, tmp_path, kv_heads):
    model = _model(tokenizer, kv_heads=kv_heads)
    proc = _procedure(model)
    g = torch.Generator().manual_seed(0)
    for key in proc.importance:
        proc.importance[key] = torch.rand(proc.importance[key].shape, generator=g)
    proc.prune_to(0.5)
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=g)
    model.eval()
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    pruned = export_pruned(model, proc.masks)
    assert pruned.config.num_key_value_heads == kv_heads // 2 and pruned.config.intermediate_size == 32
    assert pruned.config.num_attention_heads == 2 and pruned.config.head_dim == 8
    pruned.save_pretrained(tmp_path / "p")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in lk.unload(model).parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, masked, rtol=1e-4, atol=1e-5)


def test_loraprune_in_the_loop_reaches_the_ratio_and_writes_a_smaller_model(tokenizer, reverse_train, tmp_path):
    model = _model(tokenizer, kv_heads=2)
    config = TrainConfig(steps=10, batch_size=4, lr=1e-2, procedure="loraprune", output_dir=str(tmp_path),
                         procedure_args={"ratio": 0.5, "prune_freq": 2, "warmup": 0.1, "cooldown": 0.2})
    result = train(model, tokenizer, reverse_train[:16], config, progress=False)
    assert result.steps == 10
    masks = model.lorakit_prune_masks
    for key, mask in masks.items():
        assert int((mask == 0).sum()) == int(mask.numel() * 0.5), key
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned_model")
    assert loaded.config.intermediate_size == 32 and loaded.config.num_key_value_heads == 1
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_loraprune_resume_is_exact(tokenizer, reverse_train, tmp_path):
    def run(**kw):
        model = _model(tokenizer, kv_heads=2)
        config = TrainConfig(steps=6, batch_size=4, lr=1e-2, procedure="loraprune", log_every=1,
                             procedure_args={"prune_freq": 2, "save_pruned": False}, **kw)
        train(model, tokenizer, reverse_train[:16], config, progress=False)
        return model

    straight = run(output_dir=str(tmp_path / "a"), save_every=3)
    resumed = run(output_dir=str(tmp_path / "b"), resume_from=str(tmp_path / "a" / "checkpoint-3"))
    assert all(torch.equal(straight.lorakit_prune_masks[k], resumed.lorakit_prune_masks[k])
               for k in straight.lorakit_prune_masks)
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))


def test_loraprune_errors(tokenizer):
    with pytest.raises(lk.ConfigError, match="init_ratio <= ratio"):
        TrainConfig(procedure="loraprune", procedure_args={"ratio": 1.0})
    with pytest.raises(lk.ConfigError, match="protected_blocks"):
        TrainConfig(procedure="loraprune", procedure_args={"protected_blocks": "a,b"})
    model = lk.add_adapter(tiny_llama_for(tokenizer), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lk.ConfigError, match="plain LoRA adapter 'default' on model.layers.0.self_attn.k_proj"):
        _procedure(model)


def test_cli_writes_a_pruned_model_usable_as_model(tmp_path, capsys):
    import json

    from lorakit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--procedure", "loraprune", "--ratio", "0.5", "--prune-freq", "2", "--data", "reverse",
                 "--steps", "3", "--batch-size", "2", "--train-examples", "4", "--eval-examples", "2",
                 "--output", str(out), "--quiet", "--r", "2"]) == 0
    config = json.loads((out / "pruned_model" / "config.json").read_text())
    assert config["intermediate_size"] == 688 - int(688 * 0.5) and config["num_key_value_heads"] == 1
    assert main(["eval", "--model", str(out / "pruned_model"), "--data", "reverse", "--eval-examples", "2"]) == 0
    assert "exact match" in capsys.readouterr().out


def test_loraprune_on_a_4bit_base(tokenizer, reverse_train, tmp_path):
    """QLoRA + LoRAPrune: importance reads the dequantized weight; the export is a full-precision smaller model."""
    pytest.importorskip("bitsandbytes")
    from lorakit.quantize import quantize_model

    base = quantize_model(tiny_llama_for(tokenizer, num_attention_heads=4, num_key_value_heads=2))
    model = lk.add_adapter(base, lk.LoraConfig(r=2, target_modules=ALL)).train()
    config = TrainConfig(steps=4, batch_size=4, lr=1e-2, procedure="loraprune", output_dir=str(tmp_path),
                         procedure_args={"ratio": 0.5, "prune_freq": 2})
    train(model, tokenizer, reverse_train[:8], config, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned_model")
    assert loaded.config.intermediate_size == 32 and getattr(loaded.config, "quantization_config", None) is None
    # the smaller model transformers loads is the masked 4-bit model + adapter lorakit trained (same logits)
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval(), loaded.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("config", [lk.get_method("nola").config_cls(r=2, target_modules=ALL),
                                    lk.LoraConfig(r=2, target_modules=ALL, use_dora=True),
                                    lk.get_method("ffa_lora").config_cls(r=2, target_modules=ALL)],
                         ids=["nola", "dora", "ffa_lora"])
def test_an_adapter_without_trained_lora_A_and_B_is_refused(tokenizer, reverse_train, config):
    """The importance is |G ⊙ (W + s·B·A)| with G from ∇A and ∇B (official ``compute_sensitivity``, lines 60–87):
    NOLA's A, B are computed from coefficients and get no .grad, FFA-LoRA's A is frozen; the procedure used to read
    their importance as all zeros and prune arbitrary units (argsort of zeros)."""
    model = lk.add_adapter(tiny_llama_for(tokenizer), config).train()
    with pytest.raises(lk.ConfigError, match="LoRAPrune needs a plain LoRA adapter"):
        train(model, tokenizer, reverse_train[:8], TrainConfig(steps=2, batch_size=4, procedure="loraprune"),
              progress=False)


def test_protected_blocks_with_a_pruned_model_to_write_are_refused_before_training(tmp_path):
    """A transformers config has one width for all blocks (export_pruned refuses protected blocks): with an
    output_dir and save_pruned the run used to train to the end and then fail, writing no adapter."""
    with pytest.raises(lk.ConfigError, match="protected_blocks") as e:
        TrainConfig(procedure="loraprune", output_dir=str(tmp_path), procedure_args={"protected_blocks": "0"})
    assert "save_pruned=False" in str(e.value)
    TrainConfig(procedure="loraprune", output_dir=str(tmp_path), procedure_args={"protected_blocks": "0",
                                                                                 "save_pruned": False})
    TrainConfig(procedure="loraprune", procedure_args={"protected_blocks": "0"})  # in memory: fine


def test_an_interrupted_pruned_model_save_leaves_no_half_folder(tokenizer, reverse_train, tmp_path, monkeypatch):
    """Saves are atomic (DESIGN.md): pruned_model was written in place, so a save killed after config.json left a
    folder that `lorakit train` (which checks pruned_model/config.json) and `--model` took for a model."""
    from transformers import LlamaForCausalLM

    def half_save(self, folder, **kwargs):
        self.config.save_pretrained(folder)
        raise KeyboardInterrupt  # killed before the weights are written

    model = _model(tokenizer)
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", half_save)
    config = TrainConfig(steps=2, batch_size=4, procedure="loraprune", output_dir=str(tmp_path),
                         procedure_args={"ratio": 0.5, "prune_freq": 1})
    with pytest.raises(KeyboardInterrupt):
        train(model, tokenizer, reverse_train[:8], config, progress=False)
    assert not any(p.name.startswith(".pruned_model") or p.name == "pruned_model" for p in tmp_path.iterdir())
