"""train_concurrent's checkpoints, resume, evaluations, log callbacks and device, against lorakit.train alone.

Reference: ``lorakit.train`` of each job alone on a copy of the same initial model (its checkpoints, its
``resume_from``, its ``on_log`` records and ``eval_history``). The jobs use LoRA dropout, so a checkpoint must carry
the job's own random stream for a resume to continue exactly.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

import lorakit
from lorakit.data import load_examples
from lorakit.training import Job, TrainConfig, train, train_concurrent

TARGETS = ["q_proj", "v_proj", "lm_head"]


def _model(make_model):
    model = make_model()
    lorakit.delete_adapter(model, "default")
    for name in ("rev", "add"):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.3),
                            name=name)
    return model


def _jobs(tmp_path, **kw):
    rev = TrainConfig(steps=4, batch_size=4, lr=5e-3, seed=3, max_length=64, save_every=2,
                      output_dir=str(tmp_path / "rev"), **kw)
    add = TrainConfig(steps=3, batch_size=2, grad_accum=2, lr=5e-3, seed=5, max_length=64, save_every=2,
                      output_dir=str(tmp_path / "add"), lr_schedule="cosine", **kw)
    return [Job("rev", load_examples("reverse", "train", n=24, seed=0), rev),
            Job("add", load_examples("add", "train", n=24, seed=0), add)]


def _assert_same_adapter(model, other, name):
    theirs = lorakit.adapter_state_dict(other, name)
    for key, value in lorakit.adapter_state_dict(model, name).items():
        torch.testing.assert_close(value, theirs[key], atol=1e-6, rtol=0, msg=f"{name}: {key}")


def test_checkpoints_resume_exactly_with_train_and_with_train_concurrent(make_model, tokenizer, tmp_path):
    model = _model(make_model)
    initial = copy.deepcopy(model)
    jobs = _jobs(tmp_path / "run")
    out = train_concurrent(model, tokenizer, jobs, progress=False)

    rev, add = out["jobs"]["rev"], out["jobs"]["add"]
    assert [p.rsplit("/", 1)[-1] for p in rev.checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert [p.rsplit("/", 1)[-1] for p in add.checkpoints] == ["checkpoint-2"]
    for job in jobs:  # lorakit.train's layout in the job's own folder
        folder = tmp_path / "run" / job.adapter_name
        assert (folder / "checkpoint-2" / "trainer_state.safetensors").is_file()
        assert (folder / "checkpoint-2" / "adapter_model.safetensors").is_file()
        assert out["jobs"][job.adapter_name].adapter_dir == str(folder / "adapter")
        saved = json.loads((folder / "train_result.json").read_text())
        assert saved["losses"] == out["jobs"][job.adapter_name].losses
        assert not list(folder.glob("*.tmp*"))  # atomic writes leave no temporary folders

    for job in jobs:  # lorakit.train alone, straight and resumed from the concurrent run's checkpoint-2
        straight = copy.deepcopy(initial)
        lorakit.set_adapter(straight, job.adapter_name)
        config = replace(job.config, output_dir=str(tmp_path / "alone" / job.adapter_name), save_every=0)
        expected = train(straight, tokenizer, job.examples, config, adapter_name=job.adapter_name, progress=False)
        torch.testing.assert_close(out["jobs"][job.adapter_name].losses, expected.losses, atol=1e-6, rtol=0)
        _assert_same_adapter(model, straight, job.adapter_name)
        resumed = copy.deepcopy(initial)
        lorakit.set_adapter(resumed, job.adapter_name)
        result = train(resumed, tokenizer, job.examples, replace(config, resume_from=str(
            tmp_path / "run" / job.adapter_name / "checkpoint-2")), adapter_name=job.adapter_name, progress=False)
        assert result.start_step == 2
        torch.testing.assert_close(result.losses, expected.losses, atol=1e-6, rtol=0)
        _assert_same_adapter(model, resumed, job.adapter_name)

    again = copy.deepcopy(initial)  # train_concurrent resuming both jobs from their checkpoint-2
    resumed_jobs = [replace(job, config=replace(job.config, output_dir=str(tmp_path / "again" / job.adapter_name),
                                                resume_from=str(tmp_path / "run" / job.adapter_name / "checkpoint-2")))
                    for job in jobs]
    out2 = train_concurrent(again, tokenizer, resumed_jobs, progress=False)
    assert out2["steps"] == 2 and out2["jobs"]["add"].start_step == 2
    for job in jobs:
        torch.testing.assert_close(out2["jobs"][job.adapter_name].losses, out["jobs"][job.adapter_name].losses,
                                   atol=1e-6, rtol=0)
        _assert_same_adapter(model, again, job.adapter_name)


def test_eval_every_and_log_callbacks_report_as_train(make_model, tokenizer, tmp_path, reverse_test):
    """Each job's callbacks get the records lorakit.train of the job alone sends (tokens_per_s aside: it is a
    rate of the shared run), and its eval_history holds the same evaluations."""
    model = _model(make_model)
    initial = copy.deepcopy(model)
    settings = dict(eval_every=2, log_every=2, eval_examples=3)
    jobs = [replace(job, eval_examples=reverse_test, config=replace(job.config, save_every=0, output_dir=None,
                                                                     **settings)) for job in _jobs(tmp_path)]
    logs = {job.adapter_name: [] for job in jobs}
    jobs = [replace(job, on_log=[logs[job.adapter_name].append]) for job in jobs]
    out = train_concurrent(model, tokenizer, jobs, progress=False)
    for job in jobs:
        alone = copy.deepcopy(initial)
        lorakit.set_adapter(alone, job.adapter_name)
        records = []
        expected = train(alone, tokenizer, job.examples, job.config, adapter_name=job.adapter_name,
                         eval_examples=reverse_test, progress=False, on_log=[records.append])
        ours = logs[job.adapter_name]
        assert [sorted(r) for r in ours] == [sorted(r) for r in records]
        for got, want in zip(ours, records):
            if "eval" in want:
                assert got == want
            else:
                for key in ("step", "lr"):
                    assert got[key] == pytest.approx(want[key], abs=1e-12)
                for key in ("loss", "grad_norm"):
                    assert got[key] == pytest.approx(want[key], abs=1e-5)
        result = out["jobs"][job.adapter_name]
        assert [e["step"] for e in result.eval_history] == [e["step"] for e in expected.eval_history]
        assert result.eval_history == expected.eval_history and result.final_metrics == expected.final_metrics
        _assert_same_adapter(model, alone, job.adapter_name)  # evaluating did not change the training
    assert [e["step"] for e in out["jobs"]["rev"].eval_history] == [2, 4]
    assert [e["step"] for e in out["jobs"]["add"].eval_history] == [2, 3]  # every 2 steps, and at its last


def test_devices_and_launchers_that_cannot_work_are_refused(make_model, tokenizer, reverse_train, monkeypatch):
    model = _model(make_model)
    data = reverse_train[:8]
    jobs = [Job("rev", data, TrainConfig(steps=1, batch_size=4, max_length=64, device="cpu")),
            Job("add", data, TrainConfig(steps=1, batch_size=4, max_length=64, device="cuda:0"))]
    with pytest.raises(lorakit.ConfigError, match="jobs 'rev' and 'add' ask for different devices"):
        train_concurrent(model, tokenizer, jobs, progress=False)
    jobs[1] = replace(jobs[1], config=replace(jobs[1].config, device=None))  # None follows the other job's device
    out = train_concurrent(model, tokenizer, jobs, progress=False)
    assert len(out["jobs"]["add"].losses) == 1 and next(model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="job 'rev'.*eval_every=1.*no eval_examples"):
        train_concurrent(model, tokenizer, [Job("rev", data, replace(jobs[0].config, eval_every=1))], progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(lorakit.ConfigError, match="one of 2"):
        train_concurrent(model, tokenizer, jobs, progress=False)
