"""Commands that take an adapter load the base it records (adapter_config.json's ``base_model_name_or_path``, what
PEFT's AutoPeftModel loads) when --model is left out: an adapter trained on ``bundled-small`` failed every one of
them with "28 tensors missing" on the default bundled model."""

from __future__ import annotations

import json
import shutil

import pytest

from lorakit.cli import main


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A run trained the way a new user does it: `lorakit train --model bundled-small` (one step)."""
    run = tmp_path_factory.mktemp("small") / "run"
    assert main(["train", "--model", "bundled-small", "--data", "reverse", "--steps", "1", "--batch-size", "2",
                 "--train-examples", "4", "--eval-examples", "2", "--r", "2", "--quiet", "--num-threads", "1",
                 "--output", str(run)]) == 0
    return run / "adapter"


@pytest.mark.parametrize("command", [
    ["eval", "--data", "reverse", "--eval-examples", "2", "--quiet", "--adapter", "{a}"],
    ["generate", "--prompt", "abc", "--max-new-tokens", "2", "--adapter", "{a}"],
    ["export", "{a}", "--output", "{out}"],
    ["merge", "--adapter", "{a}", "--output", "{out}"],
    ["merge-adapters", "{a}", "{a}", "--weights", "0.5", "0.5", "--output", "{out}"],
], ids=lambda c: c[0])
def test_without_model_the_adapters_recorded_base_is_used_and_named(small_run, tmp_path, capsys, command):
    capsys.readouterr()
    argv = [a.format(a=small_run, out=tmp_path / "out") for a in command]
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"base model: bundled-small (recorded in {small_run}/adapter_config.json" in err
    if command[0] == "merge":  # the merged model has the small base's shape (hidden 192), not the bundled one's
        from lorakit.assets import BUNDLED_MODELS

        merged = json.loads((tmp_path / "out" / "config.json").read_text())
        small = json.loads((BUNDLED_MODELS["bundled-small"] / "config.json").read_text())
        assert merged["hidden_size"] == small["hidden_size"] == 192


def test_recorded_base_not_here_is_said_and_names_model(small_run, tmp_path, capsys):
    adapter = tmp_path / "elsewhere"
    shutil.copytree(small_run, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/not-cached-model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["eval", "--data", "reverse", "--adapter", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert "was trained on 'some-org/not-cached-model', which cannot be loaded here" in err
    assert "Pass --model" in err


def test_another_model_that_does_not_fit_names_the_recorded_base(small_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--data", "reverse", "--model", "bundled", "--adapter", str(small_run)]) == 2
    err = capsys.readouterr().err
    assert f"warning: {small_run} was trained on 'bundled-small'" in err
    assert "was trained on 'bundled-small', not on 'bundled'" in err and "--model bundled-small" in err


@pytest.fixture
def mixed_root(small_run, tmp_path):
    """A folder of adapters: one on bundled-small, one recording the bundled base."""
    root = tmp_path / "adapters"
    shutil.copytree(small_run, root / "small")
    shutil.copytree(small_run, root / "big")
    config = json.loads((root / "big" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "bundled"
    (root / "big" / "adapter_config.json").write_text(json.dumps(config))
    return root


def test_serve_refuses_adapters_of_different_bases_without_model(mixed_root, capsys, monkeypatch):
    import lorakit.hub

    def no_load(*args, **kwargs):
        raise AssertionError("the server loaded a base model for adapters of two bases")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)
    capsys.readouterr()
    assert main(["serve", "--adapters", str(mixed_root)]) == 2
    err = capsys.readouterr().err
    assert "the adapters were trained on different base models" in err and "'bundled-small'" in err
    assert "pass --model" in err


def test_merge_adapters_refuses_sources_of_different_bases_without_model(mixed_root, tmp_path, capsys):
    capsys.readouterr()
    assert main(["merge-adapters", str(mixed_root / "small"), str(mixed_root / "big"), "--output",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the sources were trained on different base models" in err and "pass --model" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["eval", "generate", "merge", "export", "serve", "merge-adapters"])
def test_help_says_the_default_is_the_adapters_base(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "base, else the bundled model" in " ".join(capsys.readouterr().out.split())
