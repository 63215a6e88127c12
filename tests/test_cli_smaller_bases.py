"""`lorakit train` with the smaller-base flags (QLoRA, LoRAPrune, LoRAM) refuses what cannot work before any model
loads (README: "Every setting that needs no model ... is checked before the model is loaded"), with the flag named."""

from __future__ import annotations

import pytest

from lorakit.cli import main


@pytest.fixture
def no_model_load(monkeypatch):
    import lorakit.hub

    def no_load(*args, **kwargs):
        raise AssertionError("a base model was loaded before the flags were checked")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)


@pytest.mark.parametrize("flags,says", [
    (["--loram-ratio", "1"], "--loram-ratio 1.0: give the fraction removed, in (0, 1)"),
    (["--loram-ratio", "nan"], "--loram-ratio nan: give the fraction removed"),
    (["--loram-ratio", "0"], "--loram-ratio 0.0: give the fraction removed"),
    (["--loram-ratio", "0.5", "--loram-criterion", "magnitude", "--task-type", "seq-cls"], "seq-cls"),
    (["--loram-ratio", "0.5", "--procedure", "loraprune"], "choose one"),
    (["--procedure", "loraprune", "--method", "nola"], "this one has method 'nola'"),
    (["--procedure", "loraprune", "--method", "mixlora"], "this one has method 'mixlora'"),
    (["--procedure", "loraprune", "--use-dora"], "LoRAPrune needs a plain LoRA adapter"),
    (["--procedure", "loraprune", "--protected-blocks", "0"], "--protected-blocks 0 keeps those blocks at full width"),
], ids=["ratio1", "nan", "ratio0", "seq-cls", "loraprune+loram", "nola", "mixlora", "dora", "protected"])
def test_refused_before_the_model_loads(no_model_load, capsys, tmp_path, flags, says):
    code = main(["train", *flags, "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and says in err, err
    assert not (tmp_path / "run").exists()
