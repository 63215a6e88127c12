"""Random saved LoRA adapters on the tiny Llama for the merge tests."""

from __future__ import annotations

import torch

import lorakit as lk


def make_adapter(model_factory, path, seed: int, **config):
    """Save a random (non-zero) adapter made on a fresh model from ``model_factory``; DoRA magnitudes perturbed."""
    model = model_factory()
    torch.manual_seed(seed)
    config.setdefault("target_modules", "all-linear")
    lk.add_adapter(model, lk.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
            if "lora_B" in name and name.endswith("bias"):
                p.normal_()
    lk.save_adapter(model, path)
    return path


def output_with(model_factory, path, ids):
    model = model_factory()
    lk.load_adapter(model, path)
    with torch.no_grad():
        return model(input_ids=ids).logits


def base_output(model_factory, ids):
    with torch.no_grad():
        return model_factory()(input_ids=ids).logits


def peft_all_active(model_factory, paths):
    """The real PEFT model on a fresh base with every adapter in ``paths`` loaded and active together
    (``base_model.set_adapter([...])``: PEFT adds every active adapter's delta)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model_factory(), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(paths))])
    return model
