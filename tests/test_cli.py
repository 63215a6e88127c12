"""The ``lorakit`` command line: every command on the bundled model, and the errors users hit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(["train", "--data", "reverse", "--steps", "4", "--batch-size", "4", "--train-examples", "16",
               "--eval-examples", "4", "--output", str(out), "--quiet", "--r", "4", "--save-every", "2"])
    assert rc == 0
    return out


def test_train_writes_adapter_and_summary(trained, capsys):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["method"] == "lora" and 0.0 <= summary["after"]["exact_match"] <= 1.0
    assert (trained / "adapter" / "adapter_config.json").is_file()
    assert (trained / "adapter" / "adapter_model.safetensors").is_file()
    assert (trained / "checkpoint-2").is_dir()


def test_eval_generate_inspect(trained, capsys):
    assert main(["eval", "--adapter", str(trained / "adapter"), "--data", "reverse", "--eval-examples", "3"]) == 0
    assert "exact match" in capsys.readouterr().out
    assert main(["generate", "--adapter", str(trained / "adapter"), "--prompt", "reverse: a b c =>",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("reverse: a b c =>")
    assert main(["inspect", str(trained / "adapter")]) == 0
    text = capsys.readouterr().out
    assert "method:    lora" in text and "r: 4" in text


def test_merge_and_export(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert main(["merge", "--adapter", str(trained / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert main(["export", str(trained / "adapter"), "--output", str(tmp_path / "exported")]) == 0
    assert json.loads((tmp_path / "exported" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_merge_and_export_take_a_run_folder_as_inspect_does(trained, tmp_path, capsys):
    """`lorakit merge --adapter RUN` / `lorakit export RUN` (a `train --output` folder) use RUN/adapter, the adapter
    the run ended with, as `lorakit inspect RUN` does (one resolver), and say so; the files they write are the ones
    the adapter folder itself gives, byte for byte."""
    from safetensors.torch import load_file

    for cmd, doing, name in ((["merge", "--adapter"], "merging", "model.safetensors"),
                             (["export"], "exporting", "adapter_model.safetensors")):
        assert main([*cmd, str(trained / "adapter"), "--output", str(tmp_path / f"{doing}_adapter")]) == 0
        capsys.readouterr()
        assert main([*cmd, str(trained), "--output", str(tmp_path / f"{doing}_run")]) == 0
        assert capsys.readouterr().out.startswith(
            f"{trained} is a training run folder; {doing} its adapter {trained / 'adapter'}\n")
        want, got = (load_file(tmp_path / f"{doing}_{k}" / name) for k in ("adapter", "run"))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), doing
    # the output may not hold the run it reads (it would replace the adapter with the folder)
    assert main(["merge", "--adapter", str(trained), "--output", str(trained), "--overwrite"]) == 2
    assert f"holds the input {trained / 'adapter'}" in capsys.readouterr().err
    assert (trained / "adapter" / "adapter_config.json").is_file()


def test_eval_generate_and_merge_adapters_take_a_run_folder_as_inspect_does(trained, capsys):
    """`lorakit eval --adapter RUN` / `generate --adapter RUN` / `merge-adapters RUN ...` (a `train --output` folder)
    use RUN/adapter through the same resolver as inspect/merge/export (was: refused with 'did you mean
    RUN/adapter?'); their output is the one RUN/adapter gives, after the note (on stderr for generate, whose stdout is the completions)."""
    from safetensors.torch import load_file

    evaluate = ["eval", "--data", "reverse", "--eval-examples", "3", "--adapter"]
    generate = ["generate", "--prompt", "reverse: a b c =>", "--max-new-tokens", "8", "--adapter"]
    for cmd, doing in ((evaluate, "evaluating"), (generate, "generating with")):
        assert main([*cmd, str(trained / "adapter")]) == 0
        want = capsys.readouterr()
        assert main([*cmd, str(trained)]) == 0
        got = capsys.readouterr()
        note = f"{trained} is a training run folder; {doing} its adapter {trained / 'adapter'}\n"
        if cmd is generate:
            assert got.out == want.out and got.err.startswith(note) and note not in want.err, (got, want)
        else:
            assert got.out == note + want.out, (got.out, want.out)
    outputs = {}
    for given in (trained, trained / "adapter"):
        out = trained.parent / f"merged_{given.name}"
        assert main(["merge-adapters", str(given), str(trained / "checkpoint-2"), "--output", str(out)]) == 0
        note = f"{trained} is a training run folder; merging its adapter {trained / 'adapter'}\n"
        assert capsys.readouterr().out == (note if given == trained else "") + f"merged 2 adapters (linear) into {out}\n"
        outputs[given] = (load_file(out / "adapter_model.safetensors"), (out / "adapter_config.json").read_text())
    (want, want_config), (got, got_config) = outputs[trained / "adapter"], outputs[trained]
    assert want_config == got_config
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_train_on_jsonl_formats(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"copy: {w} =>", "completion": f" {w}", "task": "copy"} for w in ["a b", "c d", "e f", "g h"]]
    rows += [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "task": "chat"},
             {"text": "plain text line", "task": "text"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc = main(["train", "--data", str(data), "--steps", "2", "--batch-size", "2", "--output", str(tmp_path / "o"),
               "--quiet", "--r", "2"])
    assert rc == 0


def test_methods_and_tasks_list_the_registry(capsys):
    import lorakit
    from lorakit.data import TASKS

    main(["methods"])
    out = capsys.readouterr().out
    assert all(m.name in out for m in lorakit.list_methods())
    main(["tasks"])
    out = capsys.readouterr().out
    assert all(t in out for t in TASKS)


@pytest.mark.parametrize("argv,message", [
    (["train", "--method", "lorra"], "unknown method 'lorra'. Did you mean: lora"),
    (["train", "--data", "revers", "--steps", "1"], "revers"),
    (["train", "--data", "missing.jsonl", "--steps", "1"], "missing.jsonl"),
    (["inspect", "/nonexistent/adapter"], "does not exist"),
    (["inspect", __file__], "is a file, not an adapter folder"),
    (["eval", "--adapter", __file__, "--data", "reverse"], "is a file, not an adapter folder"),
    (["train", "--data", str(Path(__file__).parent), "--steps", "1"], "is a folder; give a JSONL file"),
    (["eval", "--data", "reverse", "--model", "/nonexistent/model"], "cannot load model"),
])
def test_errors_are_clear(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # train's default --output runs/lorakit: one left in the cwd is named first
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_malformed_jsonl_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": 3}\n')
    assert main(["train", "--data", str(bad), "--steps", "1", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err


def test_console_script_runs():
    exe = Path(sys.executable).parent / "lorakit"
    result = subprocess.run([str(exe), "methods"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "lora" in result.stdout


def test_version_flag_prints_the_installed_version(capsys):
    """`lorakit --version` prints the version pip installed (was: "unrecognized arguments", status 2)."""
    from importlib.metadata import version

    from lorakit.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorakit {version('lorakit')}"


def test_train_keeps_a_methods_own_default_targets(tmp_path, capsys):
    """``--method mixlora`` trains MixLoRA's experts on the FFN blocks (its default targets), not a plain LoRA on
    all linear layers, and reports how its router spread the tokens."""
    from lorakit.cli import main as cli_main

    out = tmp_path / "mix"
    assert cli_main(["train", "--method", "mixlora", "--steps", "2", "--batch-size", "4", "--train-examples", "8",
                     "--eval-examples", "2", "--output", str(out), "--quiet"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "mlp" in config["target_modules"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["router"]["layers"] == 6 and "router over 6 layers" in capsys.readouterr().out


def test_asking_more_file_examples_than_the_file_holds_is_said(tmp_path, capsys, monkeypatch):
    """`--train-examples 50` / `--eval-examples 30` on files of 6 / 3 lines: the run uses what there is and says so,
    naming the numbers, before any model loads (was: silence)."""
    import lorakit.hub

    def no_load(*args, **kwargs):
        raise RuntimeError("stop: model load")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"p{i} ", "completion": f"c{i}"}) + "\n" for i in range(6)))
    test.write_text("".join(json.dumps({"prompt": f"q{i} ", "completion": f"d{i}"}) + "\n" for i in range(3)))
    with pytest.raises(RuntimeError, match="stop: model load"):
        main(["train", "--data", str(train), "--eval-data", str(test), "--train-examples", "50", "--eval-examples",
              "30", "--steps", "1", "--quiet", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"--train-examples 50 asks for 50 examples, but {train} holds only 6; using those 6" in err
    assert f"--eval-examples 30 asks for 30 examples, but {test} holds only 3; using those 3" in err
