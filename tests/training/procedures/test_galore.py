"""GaLore (``training/procedures/galore.py``) against the official ``galore-torch`` package on the same run.

Reference: ``galore_torch.GaLoreAdamW`` (galore_torch/adamw.py ``AdamW.step`` lines 78-140, projector in
galore_torch/galore_projector.py lines 12-107) with the parameter groups of the official ``torchrun_main.py``:
``nn.Linear`` weights of modules named ``attn``/``mlp`` in a ``rank`` group, every other parameter in a plain one.
"""

from __future__ import annotations

import pytest
import torch
from galore_torch import GaLoreAdamW as ReferenceGaLoreAdamW
from torch import nn
from transformers import Trainer, TrainingArguments

import lorakit as lk
from lorakit.data import CausalLMCollator, TokenizedDataset
from lorakit.training import LorakitCallback, TrainConfig, get_procedure, make_optimizer, train
from lorakit.training.procedures.galore import GaLoreConfig

from lk_models import tiny_llama

RANK, GAP, SCALE, LR, WD = 4, 2, 0.25, 1e-2, 0.01


def _model(seed: int = 0) -> nn.Module:
    """A tiny Llama with a zero-delta LoRA (B = 0) that GaLore leaves frozen: the base trains alone."""
    model = lk.add_adapter(tiny_llama(seed), lk.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    return model.train()


def _reference_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    adapter = {id(p) for n, p in model.named_parameters() if ".adapters." in n}
    galore = [m.weight for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and ("attn" in n or "mlp" in n) and id(m.weight) not in adapter]
    others = [p for p in model.parameters() if id(p) not in adapter and all(p is not g for g in galore)]
    for p in model.parameters():
        p.requires_grad_(id(p) not in adapter)
    return ReferenceGaLoreAdamW([{"params": others}, {"params": galore, "rank": RANK, "update_proj_gap": GAP,
                                                      "scale": SCALE, "proj_type": "std"}],
                                lr=LR, weight_decay=WD)


def _config(**kw) -> TrainConfig:
    args = dict(rank=RANK, update_proj_gap=GAP, scale=SCALE, train_adapter=False, **kw)
    return TrainConfig(lr=LR, weight_decay=WD, max_grad_norm=None, procedure="galore", procedure_args=args)


@pytest.mark.parametrize("per_layer", [False, True], ids=["one_step", "per_layer_hooks"])
def test_galore_matches_galore_torch(per_layer):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    ours, ref = _model(), _model()
    config = _config(per_layer=per_layer)
    procedure = get_procedure("galore").build(config)
    our_opt, params = make_optimizer(ours, "default", config, procedure=procedure)
    ref_opt = _reference_optimizer(ref)
    assert not any(".adapters." in n for n in params) and len(params) == len(list(tiny_llama().parameters()))
    for step in range(5):  # GAP = 2: the projector is refreshed at steps 0, 2, 4
        for model, opt in ((ref, ref_opt), (ours, our_opt)):
            model(input_ids=ids, labels=ids).loss.backward()
            if model is ours and per_layer:
                assert all(p.grad is None for p in params.values())  # updated and dropped inside the hooks
            opt.step()
            opt.zero_grad(set_to_none=True)
    procedure.finish(ours, "default")
    ref_params = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p, ref_params[n], atol=1e-6, rtol=1e-5, msg=n)
    moved = ours.model.layers[0].self_attn.v_proj.weight - tiny_llama().model.layers[0].self_attn.v_proj.weight
    assert moved.abs().max() > 0
    state = our_opt.state[ours.model.layers[0].mlp.up_proj.weight]  # (64, 32): m >= n, right projection
    assert state["projector"].shape == (RANK, 32) and state["exp_avg"].shape == (64, RANK)


@pytest.mark.parametrize("per_layer", [False, True], ids=["one_step", "per_layer_hooks"])
def test_galore_resume_is_bit_exact(per_layer, make_model, tokenizer, reverse_train, tmp_path):
    def run(**kw):
        model = make_model()
        config = TrainConfig(steps=4, batch_size=4, grad_accum=2, lr=1e-2, procedure="galore", log_every=1,
                             procedure_args={"rank": 2, "update_proj_gap": 3, "per_layer": per_layer}, **kw)
        train(model, tokenizer, reverse_train, config, progress=False)
        return model

    straight = run(output_dir=str(tmp_path / "a"), save_every=2)
    resumed = run(output_dir=str(tmp_path / "b"), resume_from=str(tmp_path / "a" / "checkpoint-2"))
    bad = [n for (n, p), q in zip(straight.named_parameters(), resumed.parameters()) if not torch.equal(p, q)]
    assert not bad
    assert not any(p._post_accumulate_grad_hooks for p in straight.parameters())  # finish() removed the hooks


def test_galore_under_hf_trainer_matches_galore_torch(tokenizer, reverse_train, tmp_path):
    """Per-layer GaLore under Trainer (its scheduler, its grad accumulation) == galore-torch under Trainer."""
    from lk_models import tiny_llama_for

    def run(optimizer_for, callbacks=lambda: []):
        model = lk.add_adapter(tiny_llama_for(tokenizer), lk.LoraConfig(r=4, target_modules=["q_proj"])).train()
        optimizer = optimizer_for(model)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=LR, weight_decay=WD, max_grad_norm=0.0,
                                 report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=TokenizedDataset(reverse_train, tokenizer, max_length=64),
                data_collator=CausalLMCollator.from_tokenizer(tokenizer), optimizers=(optimizer, None),
                callbacks=[LorakitCallback("default"), *callbacks()]).train()
        return model

    config = TrainConfig(lr=LR, weight_decay=WD, grad_accum=2, procedure="galore",
                         procedure_args=dict(rank=RANK, update_proj_gap=GAP, scale=SCALE, train_adapter=False))
    procedure = get_procedure("galore").build(config)
    ours = run(lambda m: make_optimizer(m, "default", config, procedure=procedure)[0],
               lambda: [LorakitCallback("default", procedure=procedure)])
    ref = run(_reference_optimizer)
    ref_params = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p, ref_params[n], atol=1e-6, rtol=1e-5, msg=n)


def test_galore_config_errors():
    with pytest.raises(lk.ConfigError, match="proj_type.*std"):
        GaLoreConfig(proj_type="stdd")
    with pytest.raises(lk.ConfigError, match="rank"):
        GaLoreConfig(rank=0)
    with pytest.raises(lk.ConfigError, match="no nn.Linear") as e:
        make_optimizer(_model(), "default", _config(optim_target_modules=["nothing"]))
    assert e.value.field == "GaLoreConfig.optim_target_modules"  # worded as --optim-target-modules on a command line


@pytest.mark.parametrize("eps", [-1e-8, float("nan"), float("inf")])
def test_galore_refuses_an_eps_adam_refuses(eps):
    """Was: --eps -1 trained (a denominator sqrt(v) + eps that can cross zero); torch.optim.AdamW and galore-torch's
    AdamW both raise "Invalid epsilon value" for eps < 0."""
    with pytest.raises(lk.ConfigError, match="GaLoreConfig.eps") as e:
        GaLoreConfig(eps=eps)
    assert e.value.field == "GaLoreConfig.eps"
    GaLoreConfig(eps=0.0)  # allowed, as torch allows it
