"""``lorakit quantize``: RTN and CBQ from the command line, the quantized model written atomically and loadable."""

import json

from transformers import AutoModelForCausalLM

from lorakit.cli import main


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


def test_quantize_cbq_runs_and_options_are_checked(tmp_path, capsys):
    assert main(["quantize", "--method", "cbq", "--bits", "2", "--steps", "1", "--calib-rows", "2",
                 "--eval-rows", "1", "--seq-len", "16", "--num-threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "window 5/5 blocks [4, 5]" in out and "cbq W2A16" in out
    assert main(["quantize", "--method", "rtn", "--steps", "3"]) == 2
    assert "--method rtn takes no CBQ options" in capsys.readouterr().err
