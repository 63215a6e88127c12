"""``lorakit quantize``: RTN and CBQ from the command line, the quantized model written atomically and loadable."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.cli import main
from lorakit.quantize import perplexity, task_token_rows


def test_quantize_rtn_writes_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "w4"
    assert main(["quantize", "--method", "rtn", "--bits", "4", "--eval-rows", "2", "--seq-len", "32",
                 "--num-threads", "1", "--output", str(out)]) == 0
    assert "rtn W4A16 (42 linear layers): perplexity" in capsys.readouterr().out
    summary = json.loads((out / "quantization.json").read_text())
    assert summary["method"] == "rtn" and summary["perplexity_after"] > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[0].mlp.down_proj.weight
    assert len(w[0].unique()) <= 16  # a 4-bit grid per output channel
    # the written model is the one measured: its perplexity in plain transformers is the one lorakit printed
    rows = task_token_rows(AutoTokenizer.from_pretrained(out), "test", 2, 32)
    assert perplexity(model, rows) == pytest.approx(summary["perplexity_after"], rel=1e-5)


def test_quantize_cbq_runs_and_options_are_checked(tmp_path, capsys):
    assert main(["quantize", "--method", "cbq", "--bits", "2", "--steps", "1", "--calib-rows", "2",
                 "--eval-rows", "1", "--seq-len", "16", "--num-threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "window 5/5 blocks [4, 5]" in out and "cbq W2A16" in out
    assert main(["quantize", "--method", "rtn", "--steps", "3"]) == 2
    assert "--method rtn takes no CBQ options" in capsys.readouterr().err


def test_row_counts_and_lengths_are_checked(capsys, monkeypatch):
    """--calib-rows 0 ended in a reshape traceback, and --seq-len 1 printed "perplexity 1.000 -> 1.000": with one
    token per row no next token is predicted, and exp(0 / max(0, 1)) = 1 came out as a score."""
    import lorakit.hub

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the flags were checked")

    with monkeypatch.context() as m:
        m.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)
        for flags, says in ((["--calib-rows", "0"], "--calib-rows must be at least 1, got 0."),
                            (["--eval-rows", "-1"], "--eval-rows must be at least 1, got -1."),
                            (["--seq-len", "1"], "--seq-len must be at least 2, got 1.")):
            assert main(["quantize", *flags]) == 2
            assert says in capsys.readouterr().err
    assert main(["quantize", "--method", "rtn", "--seq-len", "100000", "--num-threads", "1"]) == 2
    assert "--seq-len 100000 exceeds the model's 256 positions" in capsys.readouterr().err


def test_perplexity_and_cbq_refuse_empty_rows():
    import pytest
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.core.errors import LorakitError
    from lorakit.quantize import perplexity, quantize_weights

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(LorakitError, match=r"perplexity rows has shape \(4, 1\)"):
        perplexity(model, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(LorakitError, match="CBQ calibration rows"):
        quantize_weights(model, "cbq", torch.zeros(0, 8, dtype=torch.long), steps=1)


def test_group_size_none_which_its_errors_suggest_is_a_value_the_flag_takes(capsys):
    """Was: `--group-size 0` answered "must be a positive integer or None (per output channel)" and a group size that
    does not divide a layer "... or --group-size None", but the flag was type=int: `--group-size None` was argparse's
    "invalid int value: 'None'". It takes none/None now, as the method flags do (one scale per output channel)."""
    assert main(["quantize", "--method", "rtn", "--group-size", "0"]) == 2
    assert "--group-size must be a positive integer or None (per output channel), got 0." in capsys.readouterr().err
    for spelled in ("None", "none"):
        assert main(["quantize", "--method", "rtn", "--group-size", spelled, "--eval-rows", "1", "--seq-len", "8",
                     "--num-threads", "1"]) == 0
        assert "rtn W4A16 (42 linear layers): perplexity" in capsys.readouterr().out
    assert main(["quantize", "--method", "rtn", "--group-size", "7", "--eval-rows", "1", "--seq-len", "8",
                 "--num-threads", "1"]) == 2
    assert "or --group-size None (one scale per output channel)" in capsys.readouterr().err
    import pytest
    with pytest.raises(SystemExit):
        main(["quantize", "--group-size", "eight"])
    assert "argument --group-size: must be an integer or none, got 'eight'" in capsys.readouterr().err


def test_a_group_size_that_divides_no_layer_is_refused_before_any_perplexity(capsys, monkeypatch):
    """Was: found only when the first layer was quantized, after the model loaded and the perplexity before ran."""
    from transformers import AutoConfig

    import lorakit.quantize
    from lorakit.assets import BASE_MODEL_PATH

    hidden = AutoConfig.from_pretrained(BASE_MODEL_PATH).hidden_size  # q_proj's in_features
    assert hidden % 7
    measured = []
    real = lorakit.quantize.perplexity
    monkeypatch.setattr(lorakit.quantize, "perplexity", lambda *a, **k: measured.append(1) or real(*a, **k))
    for method in ("rtn", "cbq"):
        assert main(["quantize", "--method", method, "--group-size", "7", "--eval-rows", "1", "--seq-len", "8",
                     "--num-threads", "1"]) == 2
        err = capsys.readouterr().err
        assert f"does not divide the {hidden} input columns of block 0 self_attn.q_proj" in err, err
        assert measured == []


def test_a_cut_off_weights_file_is_a_one_line_error(tmp_path, capsys):
    """A model folder whose model.safetensors is cut off (a copy or download stopped midway): transformers raises
    safetensors' SafetensorError, which the loader did not catch — a traceback from quantize (and train, eval,
    merge, which share the loader). Now: ``cannot load model`` with safetensors' reason, exit 2, nothing written."""
    import shutil

    from lorakit.assets import SMALL_BASE_MODEL_PATH

    model = tmp_path / "model"
    shutil.copytree(SMALL_BASE_MODEL_PATH, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["quantize", "--method", "rtn", "--model", str(model), "--eval-rows", "1", "--seq-len", "16",
                 "--num-threads", "1", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        f"lorakit quantize: error: cannot load model {str(model)!r}: Error while deserializing header"), err
    assert not (tmp_path / "out").exists()


def test_a_4bit_model_folder_is_refused_before_any_perplexity(tmp_path, capsys, monkeypatch):
    """``lorakit quantize --model`` a 4-bit folder (``quantize_model`` + ``save_pretrained``, which loads back in 4
    bit) rewrote its packed codes as weights; now it is refused, naming the layer, before the perplexity runs."""
    import pytest

    pytest.importorskip("bitsandbytes")
    import lorakit.quantize
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.quantize import quantize_model

    model, tokenizer = load_model_and_tokenizer(None)
    quantize_model(model, "nf4").save_pretrained(tmp_path / "q4")
    tokenizer.save_pretrained(tmp_path / "q4")

    def no_perplexity(*args, **kwargs):
        raise AssertionError("the perplexity ran before the model was checked")

    monkeypatch.setattr(lorakit.quantize, "perplexity", no_perplexity)
    for method in ("rtn", "cbq"):
        assert main(["quantize", "--method", method, "--model", str(tmp_path / "q4"), "--num-threads", "1"]) == 2
        assert "is a Linear4bit holding torch.uint8 codes: the model is quantized already" in capsys.readouterr().err
