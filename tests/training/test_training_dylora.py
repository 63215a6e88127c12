"""DyLoRA's per-step rank draw survives a checkpoint: 6 steps straight == 3 steps + resume, bit for bit."""

from __future__ import annotations

import torch

from lorakit.core.model import adapter_layers
from lorakit.methods.dylora import DyLoraConfig
from lorakit.training.config import TrainConfig
from lorakit.training.loop import train

TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]


def test_dylora_resume_is_bit_identical(make_model, tokenizer, reverse_train, tmp_path):
    def config(out, **kw):
        return TrainConfig(steps=6, batch_size=4, lr=1e-2, save_every=3, seed=3, output_dir=str(out), **kw)

    dy = DyLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    straight_model = make_model(dy)
    straight = train(straight_model, tokenizer, reverse_train, config(tmp_path / "a"), progress=False)
    resumed_model = make_model(dy)
    resumed = train(resumed_model, tokenizer, reverse_train, config(tmp_path / "b", resume_from=str(tmp_path / "a" / "checkpoint-3")),
                    progress=False)
    assert resumed.losses == straight.losses
    ranks = []
    for (_, a), (_, b) in zip(adapter_layers(straight_model), adapter_layers(resumed_model)):
        for (k, x), (_, y) in zip(a.adapters["default"].state_dict().items(), b.adapters["default"].state_dict().items()):
            assert torch.equal(x, y), k
        ranks.append(int(a.adapters["default"].train_rank))
    assert len(set(ranks)) == 1
