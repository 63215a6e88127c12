"""Break tests of `lorakit train --method / --procedure` as a new user meets them: a combination that cannot work
fails with a clear message naming the flags (before the model loads where the flags alone tell), and a run that
fails before its first checkpoint leaves no half-written --output folder behind."""

from __future__ import annotations

import pytest

from lorakit.cli import main

SMALL = ["--steps", "2", "--batch-size", "2", "--train-examples", "4", "--eval-examples", "2", "--quiet"]


def _status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("procedure", ["galore", "lisa"])
def test_a_procedure_training_base_weights_refuses_a_4bit_base_before_the_model_loads(procedure, tmp_path, capsys,
                                                                                      monkeypatch):
    """Was: the model loaded in 4 bit, base.json and metrics.jsonl were written, and the loop died with torch's bare
    "RuntimeError: only Tensors of floating point dtype can require gradients" (a traceback)."""
    import lorakit.hub

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer",
                        lambda *a, **k: pytest.fail("the base model loaded before the flags were checked"))
    out = tmp_path / "run"
    assert _status(["train", "--procedure", procedure, "--quantize", "nf4", *SMALL, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--procedure {procedure} trains base weights in full" in err and "--quantize nf4" in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_a_procedure_training_base_weights_names_a_quantized_weight_in_the_python_api():
    """The same pair through the Python API (no command line to check first): a ConfigError naming the packed
    weight, where torch's RuntimeError named none."""
    pytest.importorskip("bitsandbytes")
    import lorakit as lk
    from lorakit.core.errors import ConfigError
    from lorakit.data.tasks import get_task
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.quantize import QuantizeConfig
    from lorakit.training import TrainConfig, train

    model, tokenizer = load_model_and_tokenizer("bundled-small", quantize=QuantizeConfig(quant_type="nf4"))
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    examples = get_task("reverse").generate("train", 4, 0)
    for procedure in ("galore", "lisa"):
        with pytest.raises(ConfigError, match=r"trains base weights in full, and model\.layers\.\d+\.\S+\.weight is "
                                              r"stored as torch\.uint8"):
            train(model, tokenizer, examples, TrainConfig(steps=1, batch_size=2, procedure=procedure,
                                                          procedure_args={"lisa": {"lisa_activated_layers": 1}}
                                                          .get(procedure, {}), device="cpu"), progress=False)


def test_a_run_failing_as_it_sets_up_leaves_no_output_folder_and_the_corrected_command_runs(tmp_path, capsys):
    """Was: --lisa-activated-layers larger than the model failed inside the loop after base.json and the step-0
    metrics were written; rerunning the corrected command then said "--output ... already exists and is not empty;
    pass --overwrite"."""
    out = tmp_path / "run"
    argv = ["train", "--procedure", "lisa", "--lisa-interval-steps", "1", *SMALL, "--output", str(out)]
    assert _status([*argv, "--lisa-activated-layers", "100"]) == 2
    assert "--lisa-activated-layers 100 exceeds the model's" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()  # a folder the user made (empty) stays, emptied
    assert _status([*argv, "--lisa-activated-layers", "100"]) == 2
    assert out.is_dir() and not any(out.iterdir())
    assert _status([*argv, "--lisa-activated-layers", "1"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_failed_resume_into_a_used_folder_keeps_what_was_there(tmp_path, capsys):
    """Only a folder the failed run found empty is cleared: an earlier run's files (here its checkpoint, resumed
    with a procedure option it cannot take) stay."""
    out = tmp_path / "run"
    assert _status(["train", *SMALL, "--save-every", "1", "--output", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    status = _status(["train", *SMALL, "--steps", "3", "--procedure", "lisa", "--lisa-activated-layers", "100",
                      "--resume-from", str(out / "checkpoint-1"), "--output", str(out)])
    assert status != 0 and sorted(p.name for p in out.iterdir()) == before


def test_a_lisa_run_keeps_its_trained_blocks_for_eval_and_export_says_a_peft_lora_cannot_hold_them(tmp_path, capsys):
    """Was: `lorakit train --procedure lisa` wrote the adapter alone; `lorakit eval` on the run then scored the
    untouched base (here: an adapter with B = 0, --no-train-adapter), not the model the run trained and reported."""
    run = tmp_path / "run"
    assert _status(["train", "--procedure", "lisa", "--no-train-adapter", "--lisa-activated-layers", "1", *SMALL,
                    "--output", str(run)]) == 0
    assert (run / "trainable_params.safetensors").is_file()
    capsys.readouterr()
    assert _status(["eval", "--adapter", str(run), "--data", "reverse", "--eval-examples", "2", "--quiet"]) == 0
    assert f"base tensors trained with the adapter from {run / 'trainable_params.safetensors'}" in capsys.readouterr().err
    assert _status(["export", str(run), "--output", str(tmp_path / "peft")]) == 0
    err = capsys.readouterr().err
    assert "the run also trained base tensors" in err and "`lorakit merge` writes the whole trained model" in err, err
