"""Concurrent training of several adapters on one base equals training each alone."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.data import load_examples
from lorakit.training import Job, TrainConfig, train, train_concurrent
from lorakit.training.loop import make_optimizer
from lorakit.training.procedures import get_procedure

TARGETS = ["q_proj", "v_proj", "lm_head"]


def _config(**kw):
    return TrainConfig(steps=kw.pop("steps", 5), batch_size=kw.pop("batch_size", 4), lr=5e-3, seed=kw.pop("seed", 0),
                       max_length=64, **kw)


def test_concurrent_equals_separate(make_model, tokenizer, tmp_path):
    data = {"rev": load_examples("reverse", "train", n=24, seed=0), "add": load_examples("add", "train", n=24, seed=0)}
    configs = {"rev": _config(), "add": _config(steps=3, batch_size=2, seed=1, lr_schedule="cosine")}
    model = make_model()
    lorakit.delete_adapter(model, "default")
    for name in data:
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), name=name)
        lorakit.save_adapter(model, tmp_path / "init" / name, name)
    out = train_concurrent(model, tokenizer, [Job(n, data[n], configs[n]) for n in data],
                           output_dir=str(tmp_path / "out"), progress=False)
    assert len(out["jobs"]["rev"].losses) == 5 and len(out["jobs"]["add"].losses) == 3
    assert out["jobs"]["rev"].losses[-1] < out["jobs"]["rev"].losses[0]

    for name in data:  # the same adapter, same initial weights, trained alone
        alone = make_model()
        lorakit.delete_adapter(alone, "default")
        lorakit.load_adapter(alone, tmp_path / "init" / name, name=name, is_trainable=True)
        result = train(alone, tokenizer, data[name], configs[name], adapter_name=name, progress=False)
        torch.testing.assert_close(result.losses, out["jobs"][name].losses, atol=1e-5, rtol=1e-4)
        ours = lorakit.adapter_state_dict(model, name)
        for k, v in lorakit.adapter_state_dict(alone, name).items():
            torch.testing.assert_close(ours[k], v, atol=1e-5, rtol=1e-4)
        saved = lorakit.load_adapter(make_model(), tmp_path / "out" / name, name=name)
        for k, v in lorakit.adapter_state_dict(saved, name).items():
            assert torch.equal(v, ours[k])


def test_concurrent_rejects_unknown_and_duplicate_jobs(make_model, tokenizer):
    model = make_model()
    data = load_examples("reverse", "train", n=4, seed=0)
    with pytest.raises(lorakit.AdapterError, match="no adapter 'nope'"):
        train_concurrent(model, tokenizer, [Job("nope", data, _config())], progress=False)
    with pytest.raises(ValueError, match="at least one job"):  # was: IndexError
        train_concurrent(model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="its own adapter"):
        train_concurrent(model, tokenizer, [Job("default", data, _config()), Job("default", data, _config())])


def test_concurrent_restores_active_adapters_and_mode(make_model, tokenizer):
    """Issue 10: train_concurrent leaves the active adapters and train/eval mode as it found them."""
    data = load_examples("reverse", "train", n=8, seed=0)
    model = make_model().eval()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=TARGETS), name="other")
    assert lorakit.active_adapters(model) == ["default"]
    train_concurrent(model, tokenizer, [Job("default", data, _config(steps=1)), Job("other", data, _config(steps=1))],
                     progress=False)
    assert lorakit.active_adapters(model) == ["default"] and not model.training


def test_concurrent_gamma_mod_keeps_the_answer_tokens(make_model, tokenizer, reverse_train):
    """γ-MoD through train_concurrent gets what lorakit.train gives it: its ARank init on the job's first batches
    (mod_layers=None: ARank among the blocks the bounds allow, block 0 of this 2-block model with
    dense_first_layers=0, dense_last_layers=1), and the supervised mask in the routing context, so every answer
    token goes through the MoD block (official masked routing, ``topk(r + mask)``, Gamma-MOD
    ``llava_llama_mod.py`` l. 143-153) while a share of the prompt tokens skips it."""
    from lorakit.core.model import adapter_state
    from lorakit.core.routing import SUPERVISED_KEY, current_routing
    from lorakit.data.collate import encode_completion
    from lorakit.methods.gamma_mod import GammaModConfig
    from lorakit.mixtures import record_routing

    config = GammaModConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], dense_first_layers=0,
                            dense_last_layers=1, capacity_factor=0.25)
    model = make_model(config)
    seen = []  # (input_ids, attention_mask, supervised mask) of each forward inside a routing context
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["input_ids"], kw["attention_mask"], (
        current_routing().extras.get(SUPERVISED_KEY)))) if current_routing() is not None else None, with_kwargs=True)
    data = reverse_train[:16]
    with record_routing(model, "default") as traces:
        out = train_concurrent(model, tokenizer, [Job("default", data, _config(steps=3))], progress=False)
    assert len(out["jobs"]["default"].losses) == 3
    assert adapter_state(model).configs["default"].mod_layers == [0]  # the init ran
    (trace,) = [t for t in traces.values() if t]  # block 0's router decisions, one entry per training forward
    assert len(seen) == len(trace) == 3
    completions = {tuple(encode_completion(tokenizer, ex.completion)) for ex in data}
    skipped = 0
    for (ids, mask, supervised), entry in zip(seen, trace):
        assert supervised is not None and supervised.shape == ids.shape
        for row in range(ids.shape[0]):
            assert tuple(ids[row][supervised[row]].tolist()) in completions  # exactly the row's answer tokens
        kept = entry["selected"][..., 1].reshape(ids.shape)
        assert bool(kept[supervised].all())  # every answer token is processed
        skipped += int((mask.bool() & ~kept).sum())
    assert skipped > 0  # and the routing did skip prompt tokens


def test_concurrent_refuses_a_whole_layer_method_beside_another_job(make_model, tokenizer, reverse_train):
    """A γ-MoD block routes every row of the batch, so a γ-MoD job cannot share the batch with another job."""
    from lorakit.methods.gamma_mod import GammaModConfig

    model = make_model(GammaModConfig(r=2, target_modules=["q_proj"], mod_layers=[1]))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=TARGETS), name="plain")
    jobs = [Job("default", reverse_train[:8], _config()), Job("plain", reverse_train[:8], _config())]
    with pytest.raises(lorakit.AdapterError, match="job 'default'.*train that job alone"):
        train_concurrent(model, tokenizer, jobs, progress=False)


# -- a job trains as lorakit.train trains it: the reference is the single-job loop on a copy of the model --------
def _check_against_train_alone(model, tokenizer, jobs, out):
    """Each job's losses and adapter equal ``lorakit.train`` of that job alone, from the same initial weights."""
    for job in jobs:
        alone = copy.deepcopy(model)  # (model is a copy of the initial state, see _run)
        lorakit.set_adapter(alone, job.adapter_name)
        result = train(alone, tokenizer, job.examples, job.config, adapter_name=job.adapter_name, progress=False)
        torch.testing.assert_close(out["jobs"][job.adapter_name].losses, result.losses, atol=1e-5, rtol=1e-4)
        assert len(result.losses) == job.config.steps
        expected = lorakit.adapter_state_dict(alone, job.adapter_name)
        assert expected
        for key, value in lorakit.adapter_state_dict(out["model"], job.adapter_name).items():
            torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-4, msg=f"{job.adapter_name}: {key}")


def _run(model, tokenizer, jobs):
    initial = copy.deepcopy(model)
    out = train_concurrent(model, tokenizer, jobs, progress=False)
    return initial, {**out, "model": model}


def _groups_and_procedures_model(make_model):
    from lorakit.methods.sora import SoraConfig

    model = make_model()  # "default": plain LoRA
    lorakit.add_adapter(model, SoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.0, sparse_lr=0.05,
                                          sparse_lambda=0.1, sparse_lambda_2=1e-3), name="sora")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), name="plus")
    return model


def _groups_and_procedures_jobs(reverse_train):
    """GGPO (procedure: forward hooks on its deltas drawing noise, on_gradients, on_step), SoRA (method param
    groups: the gates at their own lr, extra loss, on_step) with grad_accum=2, LoRA+ (procedure param groups: B at
    16x the lr) with a cosine schedule and fewer steps."""
    ggpo = TrainConfig(steps=4, batch_size=4, lr=5e-3, seed=0, max_length=64, procedure="ggpo",
                       procedure_args={"ggpo_sigma": 0.05, "ggpo_beta": 0.05})
    sora = TrainConfig(steps=4, batch_size=2, grad_accum=2, lr=5e-3, seed=1, max_length=64)
    plus = TrainConfig(steps=3, batch_size=4, lr=2e-3, seed=2, max_length=64, lr_schedule="cosine",
                       procedure="loraplus", procedure_args={"loraplus_lr_ratio": 16.0})
    return [Job("default", reverse_train[:16], ggpo), Job("sora", reverse_train[16:32], sora),
            Job("plus", reverse_train[32:], plus)]


@pytest.mark.parametrize("together", [False, True], ids=["each_alone", "together"])
def test_concurrent_param_groups_and_procedures_match_train(make_model, tokenizer, reverse_train, together):
    """Per-group learning rates (SoRA's gate group, LoRA+'s B group) and procedure hooks (GGPO) give the same
    training as lorakit.train alone: through train_concurrent with the job alone, and beside the other jobs (no
    dropout, and GGPO's noise is the only random draw, so even the shared RNG sequence matches)."""
    jobs = _groups_and_procedures_jobs(reverse_train)
    for group in ([jobs] if together else [[job] for job in jobs]):
        initial, out = _run(_groups_and_procedures_model(make_model), tokenizer, group)
        _check_against_train_alone(initial, tokenizer, group, out)
    model = _groups_and_procedures_model(make_model)
    (plus,) = [job for job in jobs if job.adapter_name == "plus"]
    lorakit.set_adapter(model, "plus")
    optimizer, _ = make_optimizer(model, "plus", plus.config, procedure=get_procedure("loraplus").build(plus.config))
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [2e-3, 16 * 2e-3]  # the groups compared above


def test_concurrent_routing_keys_and_vectors_match_train(make_model, tokenizer, reverse_train):
    """Batches with routing keys and vectors: RecLoRA reads each row's user vector (``routing`` extras), routed_lora
    each row's task key (ids of its own data's sorted task names: reverse=0, upper=1), beside a LoRA job whose data
    has another task index (add=0). Concatenated, each job's rows keep their keys and vectors, and each job trains
    as lorakit.train trains it alone."""
    from dataclasses import replace

    from lorakit.methods.routed import RecLoraConfig, RoutedLoraConfig

    users = {0: [1.0, 0.0, -1.0], 1: [-2.0, 0.5, 0.0]}
    rec_data = [replace(ex, routing={"user_state": users[i % 2]}) for i, ex in enumerate(reverse_train[:16])]
    keyed_data = load_examples("reverse,upper", "train", n=16, seed=0)
    assert {ex.task for ex in keyed_data} == {"reverse", "upper"}
    model = make_model(RecLoraConfig(num_experts=2, r=2, user_dim=3, lora_dropout=0.0, gate_dropout=0.0))
    lorakit.add_adapter(model, RoutedLoraConfig(expert_r=[2, 2], lora_dropout=0.0, key_to_expert={
        "reverse": 0, "upper": 1}), name="keyed")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=TARGETS), name="plain")
    jobs = [Job("default", rec_data, _config(steps=3)), Job("keyed", keyed_data, _config(steps=3, seed=1)),
            Job("plain", load_examples("add", "train", n=16, seed=0), _config(steps=2, batch_size=2, seed=2))]
    initial, out = _run(model, tokenizer, jobs)
    _check_against_train_alone(initial, tokenizer, jobs, out)
    with pytest.raises(lorakit.LorakitError, match="user_state"):  # the vectors were needed
        train_concurrent(copy.deepcopy(initial), tokenizer, [Job("default", reverse_train[:8], _config(steps=1))],
                         progress=False)


def test_concurrent_refuses_what_cannot_share_a_batch(make_model, tokenizer, reverse_train):
    """Refused up front, naming the job: a procedure acting on the whole model (BA-LoRA reads the whole batch's
    logits), a job whose examples carry no task key beside one whose do."""
    from lorakit.data import Example

    model = make_model()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=TARGETS), name="other")
    balora = _config(procedure="balora")
    with pytest.raises(lorakit.ConfigError, match="job 'default'.*procedure 'balora'.*train that job alone"):
        train_concurrent(model, tokenizer, [Job("default", reverse_train[:8], balora),
                                            Job("other", reverse_train[:8], _config())], progress=False)
    untasked = [Example(ex.prompt, ex.completion) for ex in reverse_train[:8]]
    with pytest.raises(lorakit.ConfigError, match="job 'default'.*task keys and job 'other'"):
        train_concurrent(model, tokenizer, [Job("default", reverse_train[:8], _config()),
                                            Job("other", untasked, _config())], progress=False)


def test_concurrent_refuses_xlora_beside_another_job(make_model, tokenizer, reverse_train, tmp_path):
    """X-LoRA's scalings come from a scaling pass over every row of the batch (``Delta.whole_batch``)."""
    from lorakit.methods.xlora import XLoraConfig

    model = make_model()
    for source in ("a", "b"):
        lorakit.save_adapter(model, tmp_path / source, "default")
    lorakit.add_adapter(model, XLoraConfig(adapter_paths=[str(tmp_path / "a"), str(tmp_path / "b")]), name="x")
    jobs = [Job("x", reverse_train[:8], _config()), Job("default", reverse_train[:8], _config())]
    with pytest.raises(lorakit.AdapterError, match="job 'x'.*whole batch.*train that job alone"):
        train_concurrent(model, tokenizer, jobs, progress=False)


def test_concurrent_trains_classifiers_as_train_does():
    """The model's head picks the objective (SEQ_CLS: cross-entropy of the head's logits, one label per row), as in
    lorakit.train; each job's head trains as its adapter's modules_to_save copy (per-row copies beside another job).
    No dropout in the base, so the two jobs together draw nothing random either."""
    from transformers import BertConfig, BertForSequenceClassification

    from lorakit.data import Example
    from lk_models import word_level_tokenizer

    words = ["good", "bad", "film", "plot", "cast", "long"]
    texts = [" ".join(words[(i * 3 + j) % len(words)] for j in range(1 + i % 3)) for i in range(16)]
    examples = [Example(t, "pos" if "good" in t.split() else "neg") for t in texts]
    tok = word_level_tokenizer(examples)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id, num_labels=2, id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1}, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    for name in ("default", "other"):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]), name=name)
    jobs = [Job("default", examples, TrainConfig(steps=4, batch_size=4, lr=5e-3, seed=0)),
            Job("other", examples[::-1], TrainConfig(steps=3, batch_size=2, lr=1e-2, seed=1))]
    for group in ([jobs[0]], jobs):
        initial, out = _run(copy.deepcopy(model), tok, group)
        _check_against_train_alone(initial, tok, group, out)
    # each classifier adapter is saved with its label names in head order, as lorakit.train saves it
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out = train_concurrent(copy.deepcopy(model), tok, jobs, output_dir=folder, progress=False)
        for name, job in out["jobs"].items():
            assert json.loads((Path(job.adapter_dir) / "labels.json").read_text()) == {"labels": ["neg", "pos"]}, name


def test_concurrent_runs_a_whole_model_procedure_alone_as_train_does(make_model, tokenizer, reverse_train):
    """A job alone may use any procedure: Flexora (held-out validation split, its own validation forwards and
    layer-logit updates in on_step, hooks removed in finish) gives the same adapter as lorakit.train."""
    config = _config(steps=4, procedure="flexora", procedure_args={"val_size": 8, "val_batches": 2})
    job = Job("default", reverse_train[:24], config)
    model = make_model(lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    initial, out = _run(model, tokenizer, [job])
    _check_against_train_alone(initial, tokenizer, [job], out)
    assert not any(m._forward_pre_hooks for m in model.modules() if m is not model)  # Flexora's input scalers


def test_concurrent_refuses_a_base_changing_init_beside_another_job(make_model, tokenizer, reverse_train):
    """LoRA-GA's init (pending until the loop's first batches) rewrites the shared base weights (W − s·B·A), so a
    plain LoRA job beside it would train on another base than ``lorakit.train`` gives it alone (its first loss was
    0.10 off): refused up front, naming the job, before any init has touched the base."""
    model = make_model()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="lora_ga"),
                        name="ga")
    before = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}  # the base's tensors
    jobs = [Job("default", reverse_train[:8], _config(steps=1)), Job("ga", reverse_train[8:16], _config(steps=1))]
    with pytest.raises(lorakit.ConfigError, match="job 'ga'.*lora_ga.*base weights.*train that job alone"):
        train_concurrent(model, tokenizer, jobs, progress=False)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    alone = train_concurrent(model, tokenizer, [jobs[1]], progress=False)  # alone it runs, as lorakit.train
    assert len(alone["jobs"]["ga"].losses) == 1


def test_an_unknown_job_adapter_is_named_with_near_matches(make_model, tokenizer):
    """A job naming an adapter the model lacks: UnknownAdapterError (as lorakit.train and the serving store raise for
    an unknown name; was a plain AdapterError), with the near match."""
    data = load_examples("reverse", "train", n=4, seed=0)
    with pytest.raises(lorakit.UnknownAdapterError, match="no adapter 'defualt' on the model. Did you mean: default?"):
        train_concurrent(make_model(), tokenizer, [Job("defualt", data, _config(steps=1))], progress=False)
