"""Rank schedules survive a checkpoint: 6 steps straight == 3 steps + resume, bit for bit (DyLoRA's per-step rank
draw, SoRA's proximal ξ schedule, IncreLoRA's importance EMAs and rank growth, LaMDA's gradual freeze of B: frozen
whole at step 2 of 6 here, so after the resume at 3 it must stay frozen, as in the straight run)."""

from __future__ import annotations

import pytest
import torch

from lorakit.core.model import adapter_layers
from lorakit.methods.dylora import DyLoraConfig
from lorakit.methods.increlora import IncreLoraConfig
from lorakit.methods.lamda import LamdaConfig, LamdaPlusPlusConfig
from lorakit.methods.sora import SoraConfig
from lorakit.training.config import TrainConfig
from lorakit.training.loop import train

TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]
CONFIGS = {
    "dylora": lambda: DyLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
    "sora": lambda: SoraConfig(r=4, sparse_lambda_2=0.05, max_lambda=0.3, lambda_num=3, lambda_schedule="linear",
                               target_modules=TARGETS),
    "increlora": lambda: IncreLoraConfig(r=1, target_rank=3, init_warmup=1, incre_interval=2, top_h=3,
                                         target_modules=TARGETS),
    "lamda": lambda: LamdaConfig(r=4, freeze_ratio=0.3, target_modules=TARGETS),
    "lamda_pp": lambda: LamdaPlusPlusConfig(r=4, freeze_ratio=0.3, target_modules=TARGETS),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_rank_schedule_resume_is_bit_identical(method, make_model, tokenizer, reverse_train, tmp_path):
    def config(out, **kw):
        return TrainConfig(steps=6, batch_size=4, lr=1e-2, save_every=3, seed=3, output_dir=str(out), **kw)

    straight_model = make_model(CONFIGS[method]())
    straight = train(straight_model, tokenizer, reverse_train, config(tmp_path / "a"), progress=False)
    resumed_model = make_model(CONFIGS[method]())
    resumed = train(resumed_model, tokenizer, reverse_train,
                    config(tmp_path / "b", resume_from=str(tmp_path / "a" / "checkpoint-3")), progress=False)
    assert resumed.losses == straight.losses
    for (_, a), (_, b) in zip(adapter_layers(straight_model), adapter_layers(resumed_model)):
        sa, sb = a.adapters["default"].state_dict(), b.adapters["default"].state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
