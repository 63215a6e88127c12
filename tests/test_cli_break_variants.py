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
    schedule = {"galore": ["--update-proj-gap", "1"], "lisa": ["--lisa-interval-steps", "1"]}[procedure]
    assert _status(["train", "--procedure", procedure, *schedule, "--quantize", "nf4", *SMALL, "--output",
                    str(out)]) == 2
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
    status = _status(["train", *SMALL, "--steps", "3", "--procedure", "lisa", "--lisa-interval-steps", "1",
                      "--lisa-activated-layers", "100",
                      "--resume-from", str(out / "checkpoint-1"), "--output", str(out)])
    assert status != 0 and sorted(p.name for p in out.iterdir()) == before


def test_a_lisa_run_keeps_its_trained_blocks_for_eval_and_export_says_a_peft_lora_cannot_hold_them(tmp_path, capsys):
    """Was: `lorakit train --procedure lisa` wrote the adapter alone; `lorakit eval` on the run then scored the
    untouched base (here: an adapter with B = 0, --no-train-adapter), not the model the run trained and reported."""
    run = tmp_path / "run"
    assert _status(["train", "--procedure", "lisa", "--lisa-interval-steps", "1", "--no-train-adapter",
                    "--lisa-activated-layers", "1", *SMALL, "--output", str(run)]) == 0
    assert (run / "trainable_params.safetensors").is_file()
    capsys.readouterr()
    assert _status(["eval", "--adapter", str(run), "--data", "reverse", "--eval-examples", "2", "--quiet"]) == 0
    assert f"base tensors trained with the adapter from {run / 'trainable_params.safetensors'}" in capsys.readouterr().err
    assert _status(["export", str(run), "--output", str(tmp_path / "peft")]) == 0
    err = capsys.readouterr().err
    assert "the run also trained base tensors" in err and "`lorakit merge` writes the whole trained model" in err, err


def _failing_lisa(out) -> list[str]:
    return ["train", "--procedure", "lisa", "--lisa-interval-steps", "1", "--lisa-activated-layers", "100", *SMALL,
            "--output", str(out)]


def test_a_failed_run_removes_only_what_it_wrote_not_a_file_put_in_its_folder_meanwhile(tmp_path, capsys,
                                                                                         monkeypatch):
    """Was: the failed run's cleanup was shutil.rmtree(--output), so a file another process or the user wrote into
    the (fresh) folder while the run set up was deleted with it. Now only the run's own setup files go; the other
    file stays, and so does the folder holding it. The other writer is simulated by writing the file just before
    the real run starts (after the folder was found empty)."""
    import lorakit.cli

    out = tmp_path / "run"
    real = lorakit.cli._train_run

    def with_a_neighbour(args, *rest):
        out.mkdir(parents=True, exist_ok=True)
        (out / "notes.txt").write_text("mine")
        return real(args, *rest)

    monkeypatch.setattr(lorakit.cli, "_train_run", with_a_neighbour)
    assert _status(_failing_lisa(out)) == 2
    assert "exceeds the model's" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_a_failed_run_into_the_current_folder_or_a_symlink_keeps_that_folder_itself(tmp_path, capsys, monkeypatch):
    """Was: `--output .` (or the cwd's absolute path) in an empty folder was removed with rmtree and made again: a
    new inode with default permissions, and the shell's cwd a deleted folder; an --output that is a symlink to an
    empty folder kept the run's base.json and metrics.jsonl (rmtree refuses a symlink, errors ignored), so the
    corrected command was refused. Now the run's files go and the folder stays the same folder."""
    here = tmp_path / "here"
    here.mkdir()
    here.chmod(0o750)
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    assert _status(_failing_lisa(".")) == 2
    assert here.stat().st_ino == inode and here.stat().st_mode & 0o777 == 0o750 and not any(here.iterdir())
    assert _status(_failing_lisa(here)) == 2
    assert here.stat().st_ino == inode and not any(here.iterdir())
    link = tmp_path / "link"
    link.symlink_to(here, target_is_directory=True)
    assert _status(_failing_lisa(link)) == 2
    assert link.is_symlink() and not any(here.iterdir())
    capsys.readouterr()


def test_a_failed_run_removes_the_parent_folders_it_created(tmp_path, capsys):
    """`--output new/a/run` made new/ and new/a/ too; a failed setup removes them (empty), not only run/."""
    assert _status(_failing_lisa(tmp_path / "new" / "a" / "run")) == 2
    assert list(tmp_path.iterdir()) == []
    capsys.readouterr()


def test_a_run_that_would_replace_its_own_input_is_refused_before_the_model_loads(tmp_path, capsys):
    """Was: `lorakit train --method xlora --adapter-paths runs/a/adapter ... --output runs/a --overwrite` read the
    source LoRA, then replaced runs/a/adapter with the X-LoRA adapter: the input was lost. Refused now, naming it,
    with the source left byte for byte; an input the run does not replace (a data file kept in the run folder)
    stays allowed."""
    import json

    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        assert _status(["train", *SMALL, "--output", str(run)]) == 0
    source = {p: p.read_bytes() for p in (a / "adapter").iterdir()}
    capsys.readouterr()
    argv = ["train", "--method", "xlora", "--adapter-paths", str(a / "adapter"), str(b / "adapter"), *SMALL,
            "--output", str(a), "--overwrite"]
    assert _status(argv) == 2
    err = capsys.readouterr().err
    assert f"--output {a} holds the input {a / 'adapter'} in adapter, which this run replaces" in err, err
    assert {p: p.read_bytes() for p in (a / "adapter").iterdir()} == source
    rows = [{"prompt": f"say {w}", "completion": w} for w in ("yes", "no", "maybe", "ok")]
    (b / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _status(["train", *SMALL, "--data", str(b / "rows.jsonl"), "--output", str(b), "--overwrite"]) == 0
