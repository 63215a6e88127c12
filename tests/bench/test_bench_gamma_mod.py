"""``lorakit bench gamma_mod``: rows selected by --only, the official arank_mod block rule, unknown rows named."""

import json

import pytest

from lorakit.bench.cli import main
from lorakit.bench.gamma_mod import arank_mod_layers


def test_arank_mod_layers_follow_the_official_rule():
    # llava_llama_mod.py lines 554-558: every block but 0, 1, 2 and the last (LLaVA's 32 blocks -> 28 MoD blocks)
    assert arank_mod_layers(32) == list(range(3, 31))
    assert arank_mod_layers(6) == [3, 4]


def test_bench_gamma_mod_quick_official_blocks_row(tmp_path):
    assert main(["gamma_mod", "--quick", "--only", "gamma_mod_arank_mod", "--output", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gamma_mod.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["gamma_mod_arank_mod"]
    assert rows[0]["mod_layers"] == [3, 4] and set(rows[0]["keep"]) == {"3", "4"}  # JSON keys
    # training skips half the routable tokens; at inference the official r > 0.005 rule keeps what an untrained
    # router does not reject (here everything: the router's 4 hidden·tokens FLOPs make the ratio just above 1)
    assert 0 < rows[0]["train_flops_ratio"] < 1 and 0 < rows[0]["topk_inference"]["flops_ratio"] < 1
    assert 0 < rows[0]["flops_ratio"] < 1.01 and all(0 < f <= 1 for f in rows[0]["keep"].values())


def test_bench_gamma_mod_names_an_unknown_row(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # a usage error, before any model (tests/bench/test_bench_cli.py)
        main(["gamma_mod", "--quick", "--only", "gamma_mod_arank", "--output", str(tmp_path)])
    assert e.value.code == 2 and "Did you mean: gamma_mod_arank_mod" in capsys.readouterr().err
