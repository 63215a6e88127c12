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


def test_resuming_on_another_base_is_refused(tmp_path, capsys, monkeypatch):
    """A LoRAM checkpoint resumed with another --loram-criterion (or --seed of the random criterion) got a base
    pruned to the same shapes but keeping other units, and trained on silently; a QLoRA checkpoint resumed without
    --quantize continued on the full-precision base. The run folder's base.json records the base's flags."""
    run = tmp_path / "run"
    small = ["--steps", "2", "--save-every", "1", "--batch-size", "2", "--train-examples", "8", "--eval-examples",
             "2", "--r", "2", "--quiet", "--num-threads", "1", "--output", str(run)]
    assert main(["train", "--loram-ratio", "0.5", *small]) == 0
    capsys.readouterr()
    import lorakit.hub

    def no_load(*args, **kwargs):
        raise AssertionError("a base model was loaded before the checkpoint's base was checked")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)
    checkpoint = str(run / "checkpoint-1")
    for flags, says in ((["--loram-criterion", "magnitude"], "--loram-criterion: checkpoint 'random', this run "
                                                             "'magnitude'"),
                        (["--seed", "1"], "--seed: checkpoint 0, this run 1")):
        assert main(["train", "--loram-ratio", "0.5", *flags, *small, "--resume-from", checkpoint]) == 2
        assert says in capsys.readouterr().err
    assert main(["train", *small, "--resume-from", checkpoint]) == 2
    assert "--loram-ratio: checkpoint 0.5, this run None" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["train"], ["eval", "--data", "reverse"], ["generate", "--prompt", "a"],
                                     ["merge", "--adapter", "adapter", "--output", "merged"]])
@pytest.mark.parametrize("flag", [["--compute-dtype", "bfloat16"], ["--no-double-quant"]])
def test_4bit_flags_without_quantize_are_refused(no_model_load, capsys, monkeypatch, tmp_path, command, flag):
    """--compute-dtype bfloat16 without --quantize trained / evaluated a full-precision float32 base silently."""
    import json

    import torch
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 256)},
              str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert main([*command, *flag]) == 2
    assert "without --quantize: these flags set up the 4-bit base" in capsys.readouterr().err


def test_merging_a_qlora_adapter_without_its_4bit_base_is_refused_and_eval_warns(tmp_path, capsys):
    """A run trained with --quantize nf4 (its base.json records it): `lorakit merge` without --quantize merged ΔW
    into the full-precision weights, a model other than the one trained, with no trace. Now refused before the model
    loads, naming base.json and the flag; with --quantize nf4 it merges. generate / eval on the other base warn."""
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "run"
    assert main(["train", "--quantize", "nf4", "--steps", "1", "--batch-size", "2", "--train-examples", "4",
                 "--eval-examples", "1", "--r", "2", "--quiet", "--num-threads", "1", "--output", str(run)]) == 0
    capsys.readouterr()
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "--quantize: trained 'nf4', this command None" in err and str(run / "base.json") in err, err
    assert "--quantize nf4" in err and not (tmp_path / "merged").exists()
    assert main(["generate", "--adapter", str(run / "adapter"), "--prompt", "ab", "--max-new-tokens", "1"]) == 0
    assert "warning: " in capsys.readouterr().err
    assert main(["merge", "--quantize", "nf4", "--adapter", str(run / "adapter"), "--output",
                 str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_loram_run_refused_at_the_length_check_writes_no_pruned_base(tmp_path, capsys):
    """--max-length beyond the model's positions fails before training: the output folder gets no pruned_base
    (it was written before the check, so the failed run left OUTPUT non-empty and a rerun was refused)."""
    run = tmp_path / "run"
    code = main(["train", "--loram-ratio", "0.5", "--max-length", "4096", "--steps", "1", "--train-examples", "4",
                 "--eval-examples", "2", "--quiet", "--num-threads", "1", "--output", str(run)])
    assert code == 2
    assert "exceeds the model's 256 positions" in capsys.readouterr().err
    assert not (run / "pruned_base").exists()
    assert not run.exists() or not any(run.iterdir())
