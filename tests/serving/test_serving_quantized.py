"""``lorakit serve --quantize nf4``: the server runs on the bitsandbytes 4-bit base that ``lorakit train --quantize``
trains QLoRA adapters on (it used to always serve the full-precision base). Run for real: the CLI server in a
subprocess, the ``openai`` client; greedy text equals offline generation on the same 4-bit base with the adapter
attached the ordinary way (``lorakit.serving.generate``), and differs from the full-precision base's."""

from __future__ import annotations

import os

import pytest
import torch

from lorakit.core.errors import ConfigError
from lorakit.hub import load_model_and_tokenizer
from lorakit.quantize import QuantizeConfig
from lorakit.serving import generate as bank_generate
from lorakit.serving import load_adapters

pytest.importorskip("bitsandbytes")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

KEY = "sk-test"
PROMPTS = ["The quick brown fox", "Once upon a time", "1 2 3 4"]


def _greedy(model, tok, prompt, adapter, n):
    ids = tok(prompt)["input_ids"]
    out = bank_generate(model, torch.tensor([ids]), [adapter], max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    return tok.decode(out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out, skip_special_tokens=True)


def test_cli_serve_quantize_serves_on_the_4bit_base(tmp_path, sh):
    flags = ["--quantize", "nf4", "--compute-dtype", "bfloat16", "--no-double-quant"]  # train's flags, all of them
    config = QuantizeConfig(quant_type="nf4", compute_dtype="bfloat16", double_quant=False)
    root = tmp_path / "adapters"
    sh.make_adapter(root / "ad0", seed=3, factory=lambda: load_model_and_tokenizer()[0], r=8,
                    target_modules=["q_proj", "v_proj", "down_proj"])
    q4, tok = load_model_and_tokenizer(quantize=config)
    full, _ = load_model_and_tokenizer()
    load_adapters(q4, {"ad0": root / "ad0"})
    load_adapters(full, {"ad0": root / "ad0"})
    jobs = [(p, m) for p in PROMPTS for m in ("bundled", "ad0")]
    want = {job: _greedy(q4, tok, job[0], None if job[1] == "bundled" else job[1], 8) for job in jobs}
    fp = {job: _greedy(full, tok, job[0], None if job[1] == "bundled" else job[1], 8) for job in jobs}
    assert want != fp  # else this test could not tell the 4-bit base from the full-precision one
    proc, url = sh.start_cli_server(["--adapters", str(root), "--kv-cache-mb", "8", *flags], tmp_path / "stderr.txt",
                                    env={**os.environ, "LORAKIT_API_KEY": KEY})
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        for prompt, model in jobs:
            r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            assert r.choices[0].text == want[prompt, model], (prompt, model)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_serve_quantize_flags_are_checked_before_the_model_loads(capsys):
    from lorakit.cli import main

    assert main(["serve", "--compute-dtype", "bfloat16"]) == 2
    assert "--compute-dtype without --quantize" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--quantize", "nf5"])
    assert "invalid choice: 'nf5'" in capsys.readouterr().err


def test_serve_refuses_cuda_graphs_on_a_4bit_cuda_base_before_loading():
    from lorakit.serving.server import serve

    with pytest.raises(ConfigError, match="cuda_graphs with a 4-bit base") as e:
        serve(quantize="nf4", device="cuda", cuda_graphs=True, adapters=["/nonexistent"])
    assert e.value.field == "cuda_graphs"
