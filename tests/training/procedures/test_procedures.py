"""The procedure registry and the loop's use of it: hooks in order, any optimizer, state in checkpoints
(exact resume), gradual freezing through ``Delta.frozen_names``, and ``lorakit train --procedure``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pytest
import torch

from lorakit.cli import main
from lorakit.methods.lora import LoraLinear
from lorakit.training import Procedure, ProcedureConfig, TrainConfig, list_procedures, register_procedure, train
from lorakit.training.procedures import base


class Stop(Exception):
    pass


@dataclass
class RecordingConfig(ProcedureConfig):
    """``freeze_a_after``: from this step on, every lora_A is frozen (gradual freezing)."""

    momentum: float = 0.9
    freeze_a_after: int = 0


class Recording(Procedure):
    """SGD with momentum, gradients halved, a penalty on lora_A, a step counter kept as state."""

    frozen_a = False

    def __init__(self, config, train_config):
        super().__init__(config, train_config)
        self.count = torch.zeros((), dtype=torch.long)
        self.calls: list[str] = []
        Recording.frozen_a = False

    def make_optimizer(self, groups, train_config):
        return torch.optim.SGD(groups, lr=train_config.lr, momentum=self.config.momentum)

    def extra_loss(self, model, adapter_name):
        self.calls.append("extra_loss")
        return 0.1 * sum((p ** 2).sum() for n, p in model.named_parameters() if "lora_A" in n)

    def on_gradients(self, model, adapter_name, step):
        self.calls.append("on_gradients")
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(0.5)

    def on_step(self, model, adapter_name, step, total_steps):
        self.calls.append("on_step")
        self.count += 1
        Recording.frozen_a = bool(self.config.freeze_a_after) and step >= self.config.freeze_a_after

    def state_dict(self):
        return {"count": self.count.clone()}

    def load_state_dict(self, tensors):
        self.count = tensors["count"].clone()


@pytest.fixture
def recording(monkeypatch) -> Iterator[list[Recording]]:
    """Registers "test_recording" for one test; yields the instances the loop built."""
    built: list[Recording] = []
    monkeypatch.setattr(Recording, "__init__", _remember(Recording.__init__, built))
    monkeypatch.setattr(LoraLinear, "frozen_names", lambda self: ("lora_A.weight",) if Recording.frozen_a else ())
    register_procedure("test_recording", Recording, config=RecordingConfig, description="test only")
    try:
        yield built
    finally:
        base._PROCEDURES.pop("test_recording", None)


def _remember(init, built):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)
    return wrapped


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_hooks_run_in_order_and_state_resumes_exactly(recording, make_model, tokenizer, reverse_train, tmp_path):
    def config(out, **kw):
        return TrainConfig(steps=4, batch_size=3, lr=5e-2, save_every=2, seed=3, output_dir=str(out),
                           procedure="test_recording", procedure_args={"momentum": 0.8}, **kw)

    straight = make_model(lora_dropout=0.1)
    result = train(straight, tokenizer, reverse_train, config(tmp_path / "a"), progress=False)
    assert recording[0].calls[:3] == ["extra_loss", "on_gradients", "on_step"]
    assert int(recording[0].count) == 4

    def crash(record):
        if record.get("step") == 3:
            raise Stop
    with pytest.raises(Stop):
        train(make_model(lora_dropout=0.1), tokenizer, reverse_train, config(tmp_path / "b", log_every=1),
              progress=False, on_log=[crash])
    resumed = make_model(lora_dropout=0.1)
    again = train(resumed, tokenizer, reverse_train, config(tmp_path / "b", resume_from=str(tmp_path / "b" /
                                                                                             "checkpoint-2")),
                  progress=False)
    assert again.losses == result.losses
    assert int(recording[-1].count) == 4  # 2 from the checkpoint + 2 run here
    a, b = _adapter(straight), _adapter(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # momentum buffers came back too


def test_on_step_can_freeze_parameters_gradually(recording, make_model, tokenizer, reverse_train):
    model = make_model(init_lora_weights="gaussian")
    snapshots = []
    config = TrainConfig(steps=4, batch_size=3, lr=5e-2, log_every=1, procedure="test_recording",
                         procedure_args={"freeze_a_after": 2})
    train(model, tokenizer, reverse_train, config, progress=False, on_log=[lambda r: snapshots.append(_adapter(model))])
    a_keys = [k for k in snapshots[0] if "lora_A" in k]
    b_keys = [k for k in snapshots[0] if "lora_B" in k]
    assert any(not torch.equal(snapshots[0][k], snapshots[1][k]) for k in a_keys)  # A trained in step 2
    # From step 3 on A is frozen: no gradient, no change (SGD momentum skips parameters without a gradient).
    assert all(torch.equal(snapshots[1][k], snapshots[3][k]) for k in a_keys)
    assert any(not torch.equal(snapshots[1][k], snapshots[3][k]) for k in b_keys)


def test_every_procedure_is_registered_with_docs():
    procedures = list_procedures()
    assert "loraplus" in {p.name for p in procedures}
    for p in procedures:
        assert p.description and p.config_cls.__doc__ and p.cls.__module__.startswith("lorakit.training.procedures")


def test_cli_lists_and_uses_procedure_options(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--procedure", "loraplus", "--help"])
    out = capsys.readouterr().out
    assert "--procedure" in out and "--loraplus-lr-ratio" in out and "--loraplus-lr-embedding" in out
    assert main(["train", "--procedure", "loraplsu"]) == 2
    assert "did you mean" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("procedure,args", [
    ("lisa", {"lisa_activated_layers": 1, "lisa_interval_steps": 2, "train_adapter": False}),
    ("galore", {"rank": 2, "update_proj_gap": 2, "train_adapter": False}),
])
def test_base_weights_a_procedure_trains_in_full_are_saved_with_the_adapter(procedure, args, make_model, tokenizer,
                                                                             reverse_train, tmp_path):
    """Was: LISA and GaLore trained base weights in full, the run's evaluation scored that model, and the output
    held only the adapter (here still B = 0, since train_adapter=False): `lorakit eval` on the run evaluated the
    untouched base. The trained tensors now go to trainable_params.safetensors (as LongLoRA's), and a fresh base
    with the adapter and that file is the trained model."""
    import lorakit as lk
    from lorakit.training.procedures.longlora import TRAINABLE_PARAMS_FILE, load_trainable_params

    model = make_model()
    train(model, tokenizer, reverse_train[:16], TrainConfig(steps=4, batch_size=4, lr=1e-2, procedure=procedure,
                                                             procedure_args=args, output_dir=str(tmp_path),
                                                             device="cpu"), progress=False)
    assert (tmp_path / TRAINABLE_PARAMS_FILE).is_file()
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    fresh = make_model()
    with torch.no_grad():
        untouched = fresh(input_ids=ids).logits
        lk.delete_adapter(fresh, "default")
        lk.load_adapter(fresh, str(tmp_path / "adapter"))
        load_trainable_params(fresh, tmp_path)
        model.eval()
        trained = model(input_ids=ids).logits
        assert (trained - untouched).abs().max() > 1e-3  # the run changed the model
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, trained, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("procedure,args", [
    ("lisa", {"lisa_activated_layers": 1, "lisa_interval_steps": 1, "train_adapter": False}),
    ("galore", {"rank": 2, "update_proj_gap": 1, "train_adapter": False}),
])
def test_a_checkpoint_is_evaluated_with_the_base_weights_of_its_own_step(procedure, args, make_model, tokenizer,
                                                                         reverse_train, tmp_path):
    """Was: `lorakit eval --adapter RUN/checkpoint-1` of a LISA / GaLore run loaded RUN/trainable_params.safetensors,
    the base weights of the run's end (step 2), with the adapter of step 1 (or the untouched base while the run had
    not ended): a model that never existed. Now a checkpoint brings its own (``param.<name>`` of its trainer
    state): a fresh base with checkpoint-1 is the model of a run stopped after 1 step (same seed and constant lr,
    so its first step is the same step)."""
    import lorakit as lk
    from lorakit.cli import _load_trained_base_params

    def run(steps, out):
        model = make_model()
        train(model, tokenizer, reverse_train[:16], TrainConfig(
            steps=steps, batch_size=4, lr=1e-2, lr_schedule="constant", procedure=procedure, procedure_args=args,
            save_every=1, output_dir=str(out), device="cpu"), progress=False)
        return model.eval()

    run(2, tmp_path / "two")
    one = run(1, tmp_path / "one")
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    fresh = make_model()
    with torch.no_grad():
        want = one(input_ids=ids).logits
        assert (want - fresh(input_ids=ids).logits).abs().max() > 1e-3  # the step changed the model
        lk.delete_adapter(fresh, "default")
        lk.load_adapter(fresh, str(tmp_path / "two" / "checkpoint-1"))
        _load_trained_base_params(fresh, tmp_path / "two" / "checkpoint-1")
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
