"""Every registered procedure's options become ``lorakit train --procedure NAME`` flags (no clash with the
method's flags, e.g. GaLore's ``optim_target_modules`` beside LoRA's ``target_modules``)."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit.cli import main
from lorakit.training import list_procedures


@pytest.mark.parametrize("info", list_procedures(), ids=lambda p: p.name)
def test_procedure_options_are_cli_flags(info, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--procedure", info.name, "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(info.config_cls):
        assert "--" + f.name.replace("_", "-") in out, f.name


def test_resume_refuses_another_procedure_or_other_options(tmp_path, capsys):
    """A checkpoint records its procedure and options; resuming with others is refused by name, before any model
    loads (it was accepted silently, or refused for a misleading reason; found by a new-user break test)."""
    common = ["--data", "reverse", "--train-examples", "16", "--eval-examples", "2", "--batch-size", "2", "--quiet"]
    assert main(["train", "--steps", "2", "--save-every", "1", "--output", str(tmp_path / "plain"), *common]) == 0
    checkpoint = str(tmp_path / "plain" / "checkpoint-1")
    capsys.readouterr()
    assert main(["train", "--procedure", "ggpo", "--steps", "2", "--resume-from", checkpoint,
                 "--output", str(tmp_path / "b"), *common]) == 2
    assert "trained with no --procedure, this run has --procedure ggpo" in capsys.readouterr().err
    assert main(["train", "--procedure", "ggpo", "--steps", "2", "--save-every", "1",
                 "--output", str(tmp_path / "g"), *common]) == 0
    capsys.readouterr()
    assert main(["train", "--procedure", "ggpo", "--ggpo-sigma", "0.5", "--steps", "2", "--output", str(tmp_path / "c"),
                 "--resume-from", str(tmp_path / "g" / "checkpoint-1"), *common]) == 2
    assert "--ggpo-sigma: checkpoint None, this run 0.5" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [
    (["--save-every", "5"], ["--save-every 5", "--steps 2", "no checkpoint"]),
    (["--eval-every", "3"], ["--eval-every 3", "--steps 2", "no evaluation"]),
    (["--procedure", "lisa", "--lisa-interval-steps", "2"], ["--lisa-interval-steps 2", "--steps 2", "redraw"]),
    (["--procedure", "galore", "--update-proj-gap", "9"], ["--update-proj-gap 9", "--steps 2", "never refreshed"]),
])
def test_train_refuses_a_schedule_past_the_last_step(flags, words, tmp_path, capsys):
    """A checkpoint / evaluation / procedure interval the run ends before is refused naming both flags, before any
    model loads or folder is written (it ran silently without ever checkpointing, evaluating or redrawing)."""
    out = tmp_path / "run"
    assert main(["train", "--data", "reverse", "--steps", "2", "--output", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()
