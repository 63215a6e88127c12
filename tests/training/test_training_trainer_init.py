"""A data-driven init the adapter's config names (``init_lora_weights="corda"`` / ``"eva"``, left pending by
add_adapter) runs under transformers.Trainer + LorakitCallback as in lorakit's loop: on Trainer's first
``init_batches`` batches, before the first optimizer step, with the optimizer training what the init left.

Was: the callback ran only a method's own init, so Trainer trained the default-initialised adapter and the saved
file still said ``init_lora_weights="corda"`` (silently). Expected values come from the installed ``peft`` on the
same batches (peft/tuners/lora/corda.py ``preprocess_corda`` + layer.py ``corda_init``; peft/tuners/lora/eva.py
``initialize_lora_eva_weights``), as in tests/init/test_corda.py and tests/init/test_eva.py."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.eva import initialize_lora_eva_weights
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import lorakit as lk
from lorakit.core import inits
from lorakit.data import CausalLMCollator, TokenizedDataset
from lorakit.training import LorakitCallback

TARGETS = ["q_proj", "v_proj", "down_proj"]


class AfterInit(TrainerCallback):
    """Listed after LorakitCallback: what the model and the optimizer hold once the init ran, before step 1."""

    def __init__(self):
        self.adapter: dict[str, torch.Tensor] = {}
        self.base: dict[str, torch.Tensor] = {}
        self.optimizer_params: set[int] = set()
        self.trainable: dict[str, torch.nn.Parameter] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.adapter = {k: v.clone() for k, v in lk.adapter_state_dict(model).items()}
        self.base = _base(model)
        self.optimizer_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}


def _base(model) -> dict[str, torch.Tensor]:
    """Base weights by host name, for a lorakit model or a PEFT one."""
    return {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
            for n, p in model.named_parameters() if "lora_" not in n}


def _trainer(model, tokenizer, examples, tmp_path, batch_size, init_batches=3, max_steps=2):
    """Sequential sampling, so the init's batches are the dataset's first items in order (the reference gets them)."""
    after = AfterInit()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=batch_size,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1,
                             disable_tqdm=True, train_sampling_strategy="sequential")
    dataset = TokenizedDataset(examples, tokenizer, max_length=64)
    collate = CausalLMCollator.from_tokenizer(tokenizer)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                      callbacks=[LorakitCallback("default", init_batches=init_batches), after])
    first = [collate([dataset[i] for i in range(k * batch_size, (k + 1) * batch_size)]) for k in range(init_batches)]
    return trainer, after, first


def _assert_close_all(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k, **tol)


def test_trainer_runs_a_pending_corda_init_as_peft_does_on_its_first_batches(make_model, tokenizer, reverse_train,
                                                                          tmp_path):
    """Batch size 1: PEFT's CorDA covariance hook assumes it (tests/init/test_corda.py)."""
    model = make_model(lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda"))
    assert inits.init_pending(model, "default")
    trainer, after, first = _trainer(model, tokenizer, reverse_train, tmp_path, batch_size=1)

    host = lk.unload(make_model())  # the same base weights, no adapter
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method="ipm"))
    preprocess_corda(host, config, run_model=lambda: [host(**b) for b in first])
    ref = peft.get_peft_model(host, config)

    trainer.train()
    _assert_close_all(after.adapter, peft.get_peft_model_state_dict(ref), atol=1e-5, rtol=1e-4)
    _assert_close_all(after.base, _base(ref), atol=1e-6, rtol=0)  # the residual base, as PEFT leaves it
    assert not inits.init_pending(model, "default") and inits.base_edits(model, "default")
    # CorDA sets A, B in place: the optimizer Trainer built before holds them and trained them
    assert set(map(id, after.trainable.values())) == after.optimizer_params
    trained = lk.adapter_state_dict(model)
    assert all(not torch.equal(trained[k], after.adapter[k]) for k in trained)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_trainer_runs_a_pending_lora_ga_init_as_peft_does_on_its_first_batches(make_model, tokenizer, reverse_train,
                                                                             tmp_path, seeded_svd):
    """LoRA-GA's gradient pass (peft/tuners/lora/loraga.py ``preprocess_loraga``: loss.backward() over the batches,
    then layer.py ``lora_ga_init``), on Trainer's first batches, inside Trainer's lifecycle. ``svd_lowrank`` draws a
    random projection: reseeded before every call, in torch and in the name PEFT bound at import (tests/conftest.py
    ``seeded_svd``), so PEFT and lorakit draw the same."""
    from peft.tuners.lora.loraga import preprocess_loraga

    model = make_model(lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga"))
    trainer, after, first = _trainer(model, tokenizer, reverse_train, tmp_path, batch_size=2)

    host = lk.unload(make_model())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig())

    def train_step():
        for b in first:
            host(**b).loss.backward()

    preprocess_loraga(host, config, train_step)
    ref = peft.get_peft_model(host, config)

    trainer.train()
    _assert_close_all(after.adapter, peft.get_peft_model_state_dict(ref), atol=1e-5, rtol=1e-4)
    _assert_close_all(after.base, _base(ref), atol=1e-6, rtol=0)
    assert set(map(id, after.trainable.values())) == after.optimizer_params
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("r,rho", [(4, 2.0), (1, 8.0)])  # (1, 8.0): both down_proj get rank 0 and are dropped
def test_trainer_runs_a_pending_eva_init_and_trains_the_layers_it_resized(r, rho, make_model, tokenizer,
                                                                        reverse_train, tmp_path):
    """EVA redistributes ranks by explained variance: the layers whose rank changes get new modules, rank-0 ones
    lose theirs. Trainer's optimizer, built before the init, is pointed at what the model now holds, so training
    moves the model's adapter, not the discarded tensors. (o_proj / down_proj: q, k, v share their input, and on
    this tiny model EVA keeps their ranks.)"""
    targets = ["o_proj", "down_proj"]
    model = make_model(lk.LoraConfig(r=r, lora_alpha=8, target_modules=targets, init_lora_weights="eva"))
    inits.set_init_options(model, "default", rho=rho)
    old = {id(p) for n, p in model.named_parameters() if p.requires_grad}
    trainer, after, first = _trainer(model, tokenizer, reverse_train, tmp_path, batch_size=4)

    ref = peft.get_peft_model(lk.unload(make_model()), peft.LoraConfig(
        r=r, lora_alpha=8, target_modules=targets, init_lora_weights="eva", eva_config=peft.EvaConfig(rho=rho)))
    initialize_lora_eva_weights(ref, first, show_progress_bar=False)

    trainer.train()
    _assert_close_all(after.adapter, peft.get_peft_model_state_dict(ref), atol=1e-5, rtol=1e-4)
    ours_c, ref_c = model.lorakit.configs["default"], ref.peft_config["default"]
    assert ours_c.rank_pattern == ref_c.rank_pattern and ours_c.rank_pattern  # some layer's rank changed
    assert sorted(ours_c.target_modules) == sorted(ref_c.target_modules)
    assert any(id(p) not in old for p in after.trainable.values())  # ... so it has new parameters
    assert set(map(id, after.trainable.values())) == after.optimizer_params
    trained = lk.adapter_state_dict(model)
    assert all(not torch.equal(trained[k], after.adapter[k]) for k in trained if "lora_A" in k)  # each A trained
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_an_init_that_replaces_parameters_under_a_procedures_optimizer_is_refused(make_model, tokenizer,
                                                                                  reverse_train, tmp_path):
    """A procedure's optimizer may hold more than its param groups (GaLore's per-parameter gradient hooks), so where
    EVA replaced parameters it was built on, the callback refuses before step 1 and says to run the init first."""
    from lorakit.training import TrainConfig, make_optimizer
    from lorakit.training.procedures import get_procedure

    model = make_model(lk.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"],
                                     init_lora_weights="eva"))
    config = TrainConfig(lr=1e-2, procedure="loraplus")
    procedure = get_procedure("loraplus").build(config)
    optimizer, _ = make_optimizer(model, "default", config, procedure=procedure)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenizedDataset(reverse_train, tokenizer, max_length=64),
                      data_collator=CausalLMCollator.from_tokenizer(tokenizer), optimizers=(optimizer, None),
                      callbacks=[LorakitCallback("default", procedure=procedure)])
    with pytest.raises(lk.ConfigError, match=r"init replaced parameters \(model\.layers\..*procedure LoraPlus's "
                                             r"optimizer.*lorakit\.init_adapter\(model, 'default', batches\)"):
        trainer.train()
    assert trainer.state.global_step == 0 and "forward" not in model.__dict__


def test_zero_init_batches_for_a_pending_data_driven_init_is_refused_before_training(make_model, tokenizer,
                                                                                   reverse_train, tmp_path):
    model = make_model(lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda"))
    before = {k: v.clone() for k, v in lk.adapter_state_dict(model).items()}
    trainer, _, _ = _trainer(model, tokenizer, reverse_train, tmp_path, batch_size=1, init_batches=0)
    with pytest.raises(lk.ConfigError, match=r"LorakitCallback\(init_batches=0\).*'corda' is data-driven"):
        trainer.train()
    assert trainer.state.global_step == 0 and inits.init_pending(model, "default")
    _assert_close_all(lk.adapter_state_dict(model), before, atol=0, rtol=0)
    assert "forward" not in model.__dict__  # the callback's forward wrapper does not outlive the refused run


def test_an_init_that_fails_inside_trainer_leaves_no_forward_wrapper_behind(make_model, tokenizer, reverse_train,
                                                                          tmp_path):
    """CorDA takes r components of each weight's SVD: r=40 on 32x32 projections fails inside the init (not in the
    callback's own checks). Was: only the callback's ConfigErrors restored the model's forward, so after this failure
    the model kept the callback's wrapper (a later LorakitCallback or a plain forward ran through it)."""
    model = make_model(lk.LoraConfig(r=40, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="corda"))
    trainer, _, _ = _trainer(model, tokenizer, reverse_train, tmp_path, batch_size=1, init_batches=1)
    with pytest.raises(lk.AdapterError, match=r"init 'corda': r=40 at module .*q_proj.* exceeds min\(out, in\) = 32"):
        trainer.train()
    assert trainer.state.global_step == 0 and "forward" not in model.__dict__


def _base_by_host_name(model) -> dict[str, torch.Tensor]:
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()
            if ".adapters." not in n}


def test_resuming_after_a_base_editing_init_restores_its_record_and_undoes_it_as_the_straight_run(
        make_model, trainer_with_checkpoints, tmp_path):
    """CorDA ran (and edited the base: W_res = W - B0 A0) in the run that wrote checkpoint-1; Trainer's resume loads
    model.safetensors (base and adapter) before the callback runs, so the init does not run again. Was: its record of
    the base edits was lost (only a warning), so restore_base / save_adapter(original_base=True) could not undo them on
    the resumed model. Now the record travels in the checkpoint's model state: the resumed model's record, restored
    base and original-base adapter file equal the straight run's, and the restored base is the untouched one."""
    def run(output_dir, resume=None):
        model = make_model(lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights="corda"))
        return trainer_with_checkpoints(model, output_dir, max_steps=2, save_steps=1, resume=resume)

    straight = run(tmp_path / "a")
    edits = inits.base_edits(straight, "default")
    assert edits
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-1"))
    assert resumed.state_dict().keys() == straight.state_dict().keys()  # no record key outside a Trainer save
    _assert_close_all(resumed.state_dict(), straight.state_dict(), atol=1e-6, rtol=0)
    assert not inits.init_pending(resumed, "default")
    got = inits.base_edits(resumed, "default")
    assert got.keys() == edits.keys()
    for path in edits:
        assert got[path].scaling == edits[path].scaling
        torch.testing.assert_close(got[path].A, edits[path].A, atol=0, rtol=0)
        torch.testing.assert_close(got[path].B, edits[path].B, atol=0, rtol=0)
    lk.save_adapter(straight, tmp_path / "straight_orig", original_base=True)
    lk.save_adapter(resumed, tmp_path / "resumed_orig", original_base=True)
    _assert_close_all(load_file(tmp_path / "resumed_orig" / "adapter_model.safetensors"),
                      load_file(tmp_path / "straight_orig" / "adapter_model.safetensors"), atol=0, rtol=0)
    untouched = _base_by_host_name(lk.unload(make_model()))
    inits.restore_base(straight, "default")
    inits.restore_base(resumed, "default")
    _assert_close_all(_base_by_host_name(resumed), _base_by_host_name(straight), atol=0, rtol=0)
    _assert_close_all(_base_by_host_name(resumed), untouched, atol=1e-6, rtol=0)


def test_resuming_after_loftq_keeps_the_replaced_weights_so_restore_base_gives_the_untouched_ones(
        make_model, trainer_with_checkpoints, tmp_path):
    """LoftQ replaces the base weights by their quantized values (core.inits.BaseSwap, no B A form); its record (the
    original weights) travels in the checkpoint like a low-rank edit, so the resumed run ends as the straight run and
    restore_base puts back the untouched weights bit for bit."""
    def run(output_dir, resume=None):
        model = make_model(lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
        return trainer_with_checkpoints(model, output_dir, max_steps=2, save_steps=1, resume=resume)

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-1"))
    _assert_close_all(resumed.state_dict(), straight.state_dict(), atol=1e-6, rtol=0)
    assert set(inits.base_edits(resumed, "default")) == set(inits.base_edits(straight, "default"))
    assert all(isinstance(e, inits.BaseSwap) for e in inits.base_edits(resumed, "default").values())
    untouched = _base_by_host_name(lk.unload(make_model()))
    inits.restore_base(resumed, "default")
    _assert_close_all(_base_by_host_name(resumed), untouched, atol=0, rtol=0)


def test_resuming_a_base_editing_init_from_a_checkpoint_without_its_record_is_refused(
        make_model, trainer_with_checkpoints, tmp_path):
    """A checkpoint as an older lorakit wrote it (no lorakit_init.* tensors in model.safetensors): the resumed model
    could not undo CorDA's base edits, so resuming is refused with a ConfigError before any step."""
    from safetensors.torch import save_file

    def model():
        return make_model(lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="corda"))

    trainer_with_checkpoints(model(), tmp_path / "a", max_steps=1, save_steps=1)
    weights = tmp_path / "a" / "checkpoint-1" / "model.safetensors"
    tensors = load_file(weights)
    assert any(k.startswith("lorakit_init.default.") for k in tensors)
    save_file({k: v for k, v in tensors.items() if not k.startswith("lorakit_init.")}, weights,
              metadata={"format": "pt"})
    resumed = model()
    with pytest.raises(lk.ConfigError, match=r"resuming at step 1: adapter 'default'.s init 'corda' edited the base "
                                             r"weights.*holds no record.*restore_base"):
        trainer_with_checkpoints(resumed, tmp_path / "b", max_steps=2, save_steps=1,
                                 resume=str(tmp_path / "a" / "checkpoint-1"))
    assert "forward" not in resumed.__dict__


def test_resuming_after_eva_rebuilds_the_ranks_it_chose_and_ends_as_the_straight_run(
        make_model, trainer_with_checkpoints, tmp_path):
    """EVA (r=1, rho=8 on o_proj / down_proj) gives an o_proj rank 2 and drops a down_proj adapter. Was: resuming raised torch's "size mismatch for ...o_proj...lora_A" from
    Trainer's load_state_dict, since the fresh model has the ranks of the config as typed. Now the adapter is rebuilt
    with the checkpoint's post-EVA config before Trainer copies the tensors in, and the resumed run ends where the
    straight one does: same config (rank_pattern, targets), same weights."""
    def run(output_dir, resume=None):
        model = make_model(lk.LoraConfig(r=1, lora_alpha=8, target_modules=["o_proj", "down_proj"],
                                         init_lora_weights="eva"))
        inits.set_init_options(model, "default", rho=8.0)
        return trainer_with_checkpoints(model, output_dir, max_steps=2, save_steps=1, resume=resume)

    straight = run(tmp_path / "a")
    config = straight.lorakit.configs["default"]
    assert config.rank_pattern and len(config.target_modules) < 4  # a rank changed, a layer lost its adapter
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-1"))
    assert resumed.lorakit.configs["default"] == config
    assert not inits.init_pending(resumed, "default")
    assert resumed.state_dict().keys() == straight.state_dict().keys()
    _assert_close_all(resumed.state_dict(), straight.state_dict(), atol=1e-6, rtol=0)


@pytest.mark.slow  # two processes import transformers and build Trainer: ~1 min on a loaded 2-core machine
def test_distributed_trainer_refuses_a_pending_data_driven_init(tmp_path):
    """Under torchrun (2 processes, gloo) each process's Trainer loader gives its own shard, so a data-driven init
    would start the processes from different adapters (and, for EVA, shapes): refused with a ConfigError before the
    first step, naming lorakit.init_adapter as the way, on every rank; the adapter is left as it was."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_training_distributed import torchrun  # the launcher the loop's torchrun tests use

    torchrun(str(Path(__file__).with_name("trainer_dist_worker.py")), str(tmp_path))
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["world_size"] == 2 and record["global_step"] == 0 and record["adapter_unchanged"]
        assert "'corda' is data-driven" in record["error"] and "(2 processes)" in record["error"]
        assert "lorakit.init_adapter(model, 'default', batches)" in record["error"]


def test_resuming_after_eva_points_a_user_built_optimizer_at_the_rebuilt_adapter(make_model, tokenizer, reverse_train,
                                                                                tmp_path):
    """Trainer(optimizers=(make_optimizer(...), None)): the optimizer holds the fresh model's parameters before
    Trainer's resume rebuilds EVA's ranks, then Trainer loads the checkpoint's moments into it. It is pointed at the
    rebuilt parameters first (was: the shape error before; with only the rebuild, a group of the wrong size), and the
    resumed run ends as the straight one."""
    from lorakit.training import TrainConfig, make_optimizer

    def run(output_dir, resume=None):
        model = make_model(lk.LoraConfig(r=1, lora_alpha=8, target_modules=["o_proj", "down_proj"],
                                         init_lora_weights="eva"))
        inits.set_init_options(model, "default", rho=8.0)
        optimizer, _ = make_optimizer(model, "default", TrainConfig(lr=1e-2))
        args = TrainingArguments(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=1, use_cpu=True,
                                 seed=0, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=TokenizedDataset(reverse_train, tokenizer, max_length=64),
                data_collator=CausalLMCollator.from_tokenizer(tokenizer), optimizers=(optimizer, None),
                callbacks=[LorakitCallback("default")]).train(resume_from_checkpoint=resume)
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert held == {id(p) for p in model.parameters() if p.requires_grad}
        return model

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-1"))
    assert resumed.lorakit.configs["default"] == straight.lorakit.configs["default"]
    _assert_close_all(resumed.state_dict(), straight.state_dict(), atol=1e-6, rtol=0)


def test_one_callback_for_two_trainers_records_the_init_in_the_second_models_checkpoints(make_model, tokenizer,
                                                                                      reverse_train, tmp_path):
    """One LorakitCallback instance given to two Trainers (a sweep): the second model's checkpoints carry its CorDA
    record too. Was: the state hooks were registered once, on the first model only, so the second model's
    checkpoint had no ``lorakit_init.*`` tensors and resuming it was refused."""
    from transformers import Trainer

    callback = LorakitCallback("default")
    for run in ("a", "b"):
        model = make_model(lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="corda"))
        args = TrainingArguments(output_dir=str(tmp_path / run), max_steps=1, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=1, use_cpu=True,
                                 seed=0, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=TokenizedDataset(reverse_train, tokenizer, max_length=64),
                data_collator=CausalLMCollator.from_tokenizer(tokenizer), callbacks=[callback]).train()
        saved = load_file(tmp_path / run / "checkpoint-1" / "model.safetensors")
        assert "lorakit_init.default.record" in saved, run
    assert "lorakit_init.default.record" not in model.state_dict()  # outside training: the model's own keys only


class _FailAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("stopped mid-run")


def test_a_train_that_raises_mid_run_leaves_no_init_record_in_the_models_state_dict(make_model, tokenizer,
                                                                                  reverse_train, tmp_path):
    """Was: the record keys rode on every model.state_dict() from on_train_begin until on_train_end, which a train()
    that raises never reaches, so afterwards a strict load into a model of the same config failed on
    ``lorakit_init.*`` keys. Now they appear only inside Trainer's own checkpoint save."""
    config = lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="corda")
    model = make_model(config)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="steps", save_steps=1, use_cpu=True, seed=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenizedDataset(reverse_train, tokenizer, max_length=64),
                      data_collator=CausalLMCollator.from_tokenizer(tokenizer),
                      callbacks=[LorakitCallback("default"), _FailAtStep()])
    with pytest.raises(RuntimeError, match="stopped mid-run"):
        trainer.train()
    assert inits.base_edits(model, "default")  # CorDA ran: the model has a record to carry
    state = model.state_dict()
    assert not [k for k in state if k.startswith("lorakit_init.")]
    other = make_model(config)
    other.load_state_dict(state, strict=True)


def _adapter_shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in lk.adapter_state_dict(model).items()}


def test_resuming_with_another_rank_than_the_checkpoints_corda_adapter_is_refused_naming_the_field(
        make_model, trainer_with_checkpoints, tmp_path):
    """Was: the pending init's name matching the record's (CorDA) let any config difference through, and the adapter
    was silently rebuilt with the checkpoint's r over the user's. CorDA rewrites no config field, so a changed r is
    refused before anything changes: the model keeps its adapter, its pending init and its own forward."""
    def model(r):
        return make_model(lk.LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="corda"))

    trainer_with_checkpoints(model(4), tmp_path / "a", max_steps=1, save_steps=1)
    resumed = model(8)
    shapes = _adapter_shapes(resumed)
    with pytest.raises(lk.ConfigError, match=r"adapter 'default' was trained with another config than this model's "
                                             r"\(r: checkpoint 4, this model 8\); resume with the adapter config"):
        trainer_with_checkpoints(resumed, tmp_path / "b", max_steps=2, save_steps=1,
                                 resume=str(tmp_path / "a" / "checkpoint-1"))
    assert resumed.lorakit.configs["default"].r == 8 and _adapter_shapes(resumed) == shapes
    assert inits.init_pending(resumed, "default") and "forward" not in resumed.__dict__


def _eva_model(make_model, **overrides):
    model = make_model(lk.LoraConfig(**{"r": 1, "lora_alpha": 8, "target_modules": ["o_proj", "down_proj"],
                                        "init_lora_weights": "eva", **overrides}))
    inits.set_init_options(model, "default", rho=8.0)
    return model


def test_resuming_eva_accepts_only_the_fields_eva_rewrites(make_model, trainer_with_checkpoints, tmp_path):
    """EVA rewrites target_modules / rank_pattern / alpha_pattern (src/lorakit/init/eva.py ``_apply``; PEFT's
    ``_load_eva_state_dict``): the checkpoint's values of those replace the typed ones (the rebuild the resume test
    above checks), but a changed lora_alpha is refused, naming it and what EVA rewrites."""
    trainer_with_checkpoints(_eva_model(make_model), tmp_path / "a", max_steps=1, save_steps=1)
    resumed = _eva_model(make_model, lora_alpha=16)
    shapes = _adapter_shapes(resumed)
    with pytest.raises(lk.ConfigError, match=r"\(lora_alpha: checkpoint 8, this model 16\) \(init 'eva' rewrites only "
                                             r"target_modules, rank_pattern, alpha_pattern\)"):
        trainer_with_checkpoints(resumed, tmp_path / "b", max_steps=2, save_steps=1,
                                 resume=str(tmp_path / "a" / "checkpoint-1"))
    assert _adapter_shapes(resumed) == shapes and inits.init_pending(resumed, "default")
    assert "forward" not in resumed.__dict__


def test_resuming_eva_under_a_procedure_is_refused_with_the_resume_advice_and_the_model_left_as_it_was(
        make_model, tokenizer, reverse_train, tmp_path):
    """A procedure's optimizer cannot be re-pointed at rebuilt parameters. Was: the fresh-init message ("run
    lorakit.init_adapter first"), raised after the rebuild, from inside Trainer's load, with the forward wrapper
    left on. Now: a resume message, before the rebuild; and following it (the adapter built with the checkpoint's
    config, read_adapter_config) resumes."""
    from lorakit.training import TrainConfig, make_optimizer
    from lorakit.training.procedures import get_procedure

    dataset = TokenizedDataset(reverse_train, tokenizer, max_length=64)
    collate = CausalLMCollator.from_tokenizer(tokenizer)

    def run(model, output_dir, resume=None):
        config = TrainConfig(lr=1e-2, procedure="loraplus")
        procedure = get_procedure("loraplus").build(config)
        optimizer, _ = make_optimizer(model, "default", config, procedure=procedure)
        args = TrainingArguments(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4,
                                 report_to=[], save_strategy="steps", save_steps=1, use_cpu=True, seed=0,
                                 disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, optimizers=(optimizer, None),
                callbacks=[LorakitCallback("default", procedure=procedure)]).train(resume_from_checkpoint=resume)
        return model

    straight = _eva_model(make_model)
    lk.init_adapter(straight, "default", [collate([dataset[i] for i in range(4 * k, 4 * k + 4)]) for k in range(2)],
                    rho=8.0)
    run(straight, tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-1"

    resumed = _eva_model(make_model)
    shapes = _adapter_shapes(resumed)
    with pytest.raises(lk.ConfigError, match=r"resuming: adapter 'default'.s init 'eva' reshaped it .*procedure "
                                             r"LoraPlus's optimizer.*dataclasses\.replace\(lorakit\."
                                             r"read_adapter_config\(<checkpoint folder>\), inference_mode=False\)"):
        run(resumed, tmp_path / "b", resume=str(checkpoint))
    assert _adapter_shapes(resumed) == shapes and inits.init_pending(resumed, "default")
    assert "forward" not in resumed.__dict__

    advised = make_model(dataclasses.replace(lk.read_adapter_config(checkpoint), inference_mode=False))
    run(advised, tmp_path / "c", resume=str(checkpoint))
    assert advised.lorakit.configs["default"] == straight.lorakit.configs["default"]
    _assert_close_all(advised.state_dict(), straight.state_dict(), atol=1e-6, rtol=0)


def _reshard_apart(checkpoint, record_last: bool) -> list[str]:
    """Rewrite a checkpoint's model.safetensors as a sharded checkpoint (the form save_pretrained gives a model above
    its max_shard_size, 50GB under Trainer): each init-record tensor and each adapter tensor in a shard of its own,
    apart from the others, the frozen base's tensors together in one shard (transformers' ``load_sharded_checkpoint``
    runs ``gc.collect()`` after every shard, seconds each in a large test process). Returns the shard files with the
    records' last (or first)."""
    import json

    from safetensors.torch import save_file

    tensors = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    base = sorted(k for k in tensors if "lora_" not in k and not k.startswith("lorakit_init."))
    apart = sorted((k for k in tensors if k not in base), key=lambda k: k.startswith("lorakit_init.") == record_last)
    assert base and any("lora_" in k for k in apart) and any(k.startswith("lorakit_init.") for k in apart)
    groups = [[k] for k in apart]
    groups.insert(0 if record_last else len(groups), base)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, keys in zip(names, groups):
        save_file({k: tensors[k].contiguous() for k in keys}, checkpoint / name, metadata={"format": "pt"})
    weight_map = {k: name for name, keys in zip(names, groups) for k in keys}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return names


# ~20 s each: records loading last with EVA (the order that failed before) runs in CI, the other three under -m slow
@pytest.mark.parametrize("init, record_last", [
    ("eva", True),
    pytest.param("eva", False, marks=pytest.mark.slow),
    pytest.param("corda", True, marks=pytest.mark.slow),
    pytest.param("corda", False, marks=pytest.mark.slow),
])
def test_resuming_a_sharded_checkpoint_restores_the_init_record_whatever_order_the_shards_load_in(
        init, record_last, make_model, trainer_with_checkpoints, tmp_path, monkeypatch):
    """Trainer loads a sharded checkpoint shard by shard (transformers/trainer_utils.py ``load_sharded_checkpoint``:
    ``list(set(index["weight_map"].values()))``, an order that varies from process to process). Was: a record split
    from its edit tensors failed ("records a base edit ... but the state holds no"), and EVA's adapter tensors loaded
    before its record met the unreshaped adapter (torch's size mismatch). The shard order is pinned here, record
    shards last or first, by shadowing ``set`` in that module; the resumed run ends as the straight run."""
    import builtins

    import transformers.trainer_utils

    def model():
        if init == "eva":
            return _eva_model(make_model)
        return make_model(lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights="corda"))

    straight = trainer_with_checkpoints(model(), tmp_path / "a", max_steps=2, save_steps=1)
    order = _reshard_apart(tmp_path / "a" / "checkpoint-1", record_last)
    def pinned_set(items=()):
        items = list(items)
        if items and all(i in order for i in items):  # the shard list: in the pinned order (deduplicated)
            return sorted(dict.fromkeys(items), key=order.index)
        return builtins.set(items)

    monkeypatch.setattr(transformers.trainer_utils, "set", pinned_set, raising=False)
    resumed = trainer_with_checkpoints(model(), tmp_path / "b", max_steps=2, save_steps=1,
                                       resume=str(tmp_path / "a" / "checkpoint-1"))
    assert resumed.lorakit.configs["default"] == straight.lorakit.configs["default"]
    assert not inits.init_pending(resumed, "default")
    _assert_close_all(resumed.state_dict(), straight.state_dict(), atol=1e-6, rtol=0)
    got, want = inits.base_edits(resumed, "default"), inits.base_edits(straight, "default")
    assert got.keys() == want.keys() and (init == "eva" or want)
    for path in want:
        torch.testing.assert_close(got[path].B @ got[path].A, want[path].B @ want[path].A, atol=0, rtol=0)
