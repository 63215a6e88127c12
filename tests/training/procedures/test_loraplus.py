"""LoRA+ (``training/procedures/loraplus.py``) against PEFT's ``create_loraplus_optimizer``
(peft/optimizers/loraplus.py, the installed package): same parameter groups, same updates."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

import lorakit as lk
from lorakit.training import TrainConfig, make_optimizer, train

from lk_models import tiny_llama


def _key(name: str) -> str:
    """One spelling for PEFT's and lorakit's parameter names."""
    for part in ("base_model.model.", ".default", ".adapters", ".base_layer"):
        name = name.replace(part, "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def _groups(optimizer, model):
    names = {id(p): _key(n) for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("kw,targets", [({"use_dora": True}, ["q_proj", "v_proj", "down_proj", "embed_tokens"]),
                                        ({"lora_bias": True}, ["q_proj", "v_proj", "down_proj"]),
                                        ({"trainable_token_indices": [3, 5]}, ["q_proj", "v_proj"])],
                         ids=["dora", "lora_bias", "token_rows"])  # PEFT has no lora_bias on embeddings
def test_groups_and_updates_match_peft(kw, targets, ids, tmp_path):
    """(token_rows: PEFT's trainable token rows are no LoRA embedding adapter, so they learn at lr, group A; were
    put at loraplus_lr_embedding, 1e-6 by default: barely trained.)"""
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                            init_lora_weights=False, **kw))
    ref.save_pretrained(tmp_path / "a")
    ours = lk.load_adapter(tiny_llama(), tmp_path / "a", is_trainable=True)  # the same starting weights
    lr, wd, ratio, emb_lr = 1e-2, 0.05, 8.0, 3e-3
    ref_opt = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                        loraplus_lr_embedding=emb_lr, loraplus_weight_decay=wd)
    config = TrainConfig(lr=lr, weight_decay=wd, procedure="loraplus",
                         procedure_args={"loraplus_lr_ratio": ratio, "loraplus_lr_embedding": emb_lr})
    our_opt, _ = make_optimizer(ours, "default", config)
    got, want = _groups(our_opt, ours), _groups(ref_opt, ref)
    assert got == want
    assert {v[0] for v in got.values()} == ({lr, lr * ratio, emb_lr} if "embed_tokens" in targets else {lr, lr * ratio})

    for _ in range(3):
        for model, opt in ((ref, ref_opt), (ours, our_opt)):
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    ref_params = {_key(n): p for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, ref_params[_key(n)], atol=1e-5, rtol=1e-4)


def test_loraplus_trains_in_the_loop_and_b_moves_faster(make_model, tokenizer, reverse_train):
    def relative_change(ratio):
        model = make_model(seed=1, init_lora_weights="gaussian")
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        config = TrainConfig(steps=3, batch_size=4, lr=1e-3, lr_schedule="constant", max_grad_norm=None,
                             procedure="loraplus", procedure_args={"loraplus_lr_ratio": ratio})
        train(model, tokenizer, reverse_train, config, progress=False)
        moved = {n: (p.detach() - before[n]).norm() for n, p in model.named_parameters() if p.requires_grad}
        return sum(v for n, v in moved.items() if "lora_B" in n)

    assert relative_change(16.0) > 4 * relative_change(1.0)  # η_B = 16 η: B travels much further


def test_bad_procedure_settings_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="unknown training procedure 'lorapls'.*loraplus"):
        TrainConfig(procedure="lorapls")
    with pytest.raises(lk.ConfigError, match="no option 'lr_ratio'.*loraplus_lr_ratio"):
        TrainConfig(procedure="loraplus", procedure_args={"lr_ratio": 4})
    with pytest.raises(lk.ConfigError, match="loraplus_lr_ratio must be >= 1"):
        TrainConfig(procedure="loraplus", procedure_args={"loraplus_lr_ratio": 0.5})
    with pytest.raises(lk.ConfigError, match="without a procedure"):
        TrainConfig(procedure_args={"loraplus_lr_ratio": 4})
