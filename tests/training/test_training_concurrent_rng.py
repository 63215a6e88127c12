"""Beside other jobs, a job's random draws are the ones it makes alone (its own stream, seeded with its seed).

Reference: ``lorakit.train`` of the job alone, from the same initial weights, with the same seed. The base (the
tiny Llama of conftest: attention_dropout 0) draws nothing, so every draw of a run is a job's own: dropout masks
(drawn at the job's own padded length, not the mixed batch's), GGPO's weight noise (``torch.randn`` in a forward
hook), DyLoRA's sampled rank (``randint`` in ``on_step``); losses and weights then agree to float rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.data import load_examples
from lorakit.training import Job, TrainConfig, train, train_concurrent

TARGETS = ["q_proj", "v_proj", "lm_head"]


def _config(**kw):
    return TrainConfig(**{"steps": 4, "batch_size": 4, "lr": 5e-3, "seed": 0, "max_length": 64, **kw})


def _alone(initial, tokenizer, job):
    alone = copy.deepcopy(initial)
    lorakit.set_adapter(alone, job.adapter_name)
    result = train(alone, tokenizer, job.examples, job.config, adapter_name=job.adapter_name, progress=False)
    return result.losses, lorakit.adapter_state_dict(alone, job.adapter_name)


def _check(initial, tokenizer, jobs, out, model, atol=1e-6):
    for job in jobs:
        losses, expected = _alone(initial, tokenizer, job)
        torch.testing.assert_close(out["jobs"][job.adapter_name].losses, losses, atol=atol, rtol=0)
        ours = lorakit.adapter_state_dict(model, job.adapter_name)
        for key, value in expected.items():
            torch.testing.assert_close(ours[key], value, atol=atol, rtol=0, msg=f"{job.adapter_name}: {key}")


def _jobs_of_other_lengths():
    """Two jobs whose micro-batches have other lengths (reverse vs. add prompts): the shorter one's rows are padded
    in the mixed batch, so a draw over the mixed rows' shape would differ from the job's own."""
    return [Job("rev", load_examples("reverse", "train", n=24, seed=0), _config(seed=3)),
            Job("add", load_examples("add", "train", n=24, seed=0), _config(steps=3, batch_size=2, seed=5,
                                                                             grad_accum=2))]


@pytest.mark.parametrize("dora", [False, True], ids=["lora_stacked", "dora_looped"])
def test_dropout_beside_another_job_draws_as_alone(make_model, tokenizer, dora):
    """LoRA with dropout runs the stacked bmm path (one mask per job, at its length), DoRA the per-adapter path
    (its rows cut to their length, its delta inside its stream). With one stream for the whole batch (before), the
    losses differed from step 2 on by 1e-3..3e-3; with per-job streams but masks drawn at the mixed batch's padded
    length, by 7e-3..1.5e-2."""
    model = make_model()
    lorakit.delete_adapter(model, "default")
    for name in ("rev", "add"):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.3,
                                                      use_dora=dora), name=name)
    jobs = _jobs_of_other_lengths()
    initial = copy.deepcopy(model)
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]),
                                                 with_kwargs=True)
    out = train_concurrent(model, tokenizer, jobs, progress=False)
    hook.remove()
    assert len(set(seen)) > 1  # mixed batches of several lengths
    _check(initial, tokenizer, jobs, out, model)


def _twins(make_model):
    """Adapters "default" and "twin": the same LoRA with dropout 0.5, the same initial weights."""
    model = make_model(lora_dropout=0.5)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj",
                                                                                       "lm_head"], lora_dropout=0.5),
                        name="twin")
    with torch.no_grad():
        twin = lorakit.adapter_state_dict(model, "twin")
        for key, value in lorakit.adapter_state_dict(model, "default").items():
            twin[key].copy_(value)
    return model


def test_masks_follow_each_jobs_seed(make_model, tokenizer, reverse_train):
    """Same seed and data: the two jobs draw the same masks (equal losses); another seed: other masks."""
    data = reverse_train[:16]
    out = train_concurrent(_twins(make_model), tokenizer, [Job("default", data, _config(seed=7)),
                                                           Job("twin", data, _config(seed=7))], progress=False)
    assert out["jobs"]["default"].losses == out["jobs"]["twin"].losses
    out = train_concurrent(_twins(make_model), tokenizer, [Job("default", data, _config(seed=7)),
                                                           Job("twin", data, _config(seed=8))], progress=False)
    assert out["jobs"]["default"].losses[0] != out["jobs"]["twin"].losses[0]


def test_procedure_noise_and_hook_draws_beside_dropout(make_model, tokenizer, reverse_train):
    """GGPO's noise (``randn`` in a forward hook, Chang et al. 2025 eq. 8) under dropout, DyLoRA's rank draw in
    ``on_step`` and a dropout LoRA: three jobs drawing in one run, each as alone."""
    from lorakit.methods.dylora import DyLoraConfig

    model = make_model(lora_dropout=0.2)
    lorakit.add_adapter(model, DyLoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1), name="dy")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.1),
                        name="plain")
    jobs = [Job("default", reverse_train[:16], _config(procedure="ggpo", procedure_args={"ggpo_sigma": 0.05,
                                                                                          "ggpo_beta": 0.05})),
            Job("dy", reverse_train[16:32], _config(seed=1)),
            Job("plain", load_examples("add", "train", n=16, seed=0), _config(steps=3, seed=2))]
    initial = copy.deepcopy(model)
    out = train_concurrent(model, tokenizer, jobs, progress=False)
    _check(initial, tokenizer, jobs, out, model)


def test_gradient_checkpointing_beside_another_job_is_refused(make_model, tokenizer, reverse_train):
    """A checkpointed block's recompute restores the default generators only, not a job's stream: refused up front,
    before any init or step."""
    model = make_model(lora_dropout=0.1)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=TARGETS, lora_dropout=0.1), name="other")
    model.activation_checkpointing_enable()  # (transformers' gradient checkpointing)
    jobs = [Job("default", reverse_train[:8], _config(steps=1)), Job("other", reverse_train[8:16], _config(steps=1))]
    with pytest.raises(lorakit.ConfigError, match="activation_checkpointing_disable"):
        train_concurrent(model, tokenizer, jobs, progress=False)
