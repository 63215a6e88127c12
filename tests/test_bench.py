"""``lorakit bench methods|perf --quick``: the smoke profiles CI affords, writing JSON, markdown and plots."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch

import lorakit as lk
from lorakit.bench.cli import main


def test_bench_methods_quick_covers_the_registry(tmp_path):
    """Every registered method and variant through the bench, two steps each (the quick profile's three took a
    quarter longer for no more coverage: the second step already runs each method's optimizer and schedule again)."""
    torch.set_num_threads(1)
    assert main(["methods", "--quick", "--steps", "2", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "methods.json").read_text())
    assert result["profile"]["steps"] == 2 and all(r["s_per_step"] > 0 for r in result["runs"] if "skipped" not in r)
    seen = {r["method"] for r in result["runs"]}
    assert seen == {m.name for m in lk.list_methods()}  # every method trained or skipped with a reason
    assert all(0.0 <= r["after"] <= 1.0 for r in result["runs"] if "skipped" not in r)
    assert (tmp_path / "methods.md").read_text().count("| lora |") >= 1
    assert (tmp_path / "methods_exact_match.png").stat().st_size > 1000


def test_bench_perf_quick_reports_ratios(tmp_path):
    assert main(["perf", "--quick", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "perf.json").read_text())
    rows = {r["row"] for r in result["rows"]}
    assert {"forward, one adapter", "training step"} <= rows
    assert any(r.startswith("mixed batch") for r in rows)
    forward = next(r for r in result["rows"] if r["row"] == "forward, one adapter")
    assert forward["max_abs_diff_vs_peft"] <= 1e-5 and forward["lorakit/peft"]["min"] > 0


def test_bench_mixtures_quick_matches_budgets_and_composes(tmp_path):
    torch.set_num_threads(1)
    assert main(["mixtures", "--quick", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "mixtures.json").read_text())
    budget = {r["row"]: r for r in result["budget"]["table"]}
    assert len(budget) == 6 and {r["method"] for r in result["budget"]["runs"]} == {
        "lora", "mixlora", "mole", "mola", "smora"}
    lora8, lora16 = budget["lora r=8 (= active)"], budget["lora r=16 (= trainable)"]
    assert lora16["trainable_params"] == 2 * lora8["trainable_params"]
    for label, row in budget.items():  # every mixture sits at about LoRA r=16's trainable size (routers on top)
        if not label.startswith("lora"):
            assert 0.9 <= row["trainable_params"] / lora16["trainable_params"] <= 1.5, label
    compose = {r["row"]: r for r in result["compose"]["table"]}
    tasks = result["profile"]["tasks"].split(",")
    assert {f"adapter '{t}' alone" for t in tasks} | {"oracle (own adapter per task)", "linear merge (mean)",
                                                       "task arithmetic (sum)"} <= set(compose)
    assert any(k.startswith("meteora") for k in compose) and any(k.startswith("x-lora") for k in compose)
    assert any(k.startswith("mixda two stages") for k in compose)
    meteora = compose["meteora gate top-2 (task-supervised)"]
    assert 0.0 <= meteora["routed_to_own_task"] <= 1.0  # its gate has one expert per task adapter
    oracle = compose["oracle (own adapter per task)"]
    for t in tasks:  # the oracle serves each task with its own adapter
        assert oracle["per_task"][t] == compose[f"adapter '{t}' alone"]["per_task"][t]
    assert "## Equal budgets" in (tmp_path / "mixtures.md").read_text()


def test_bench_variants_quick_dylora_ranks(tmp_path):
    torch.set_num_threads(1)
    assert main(["variants", "--quick", "--methods", "lora", "dylora", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "variants.json").read_text())
    assert {r["method"] for r in result["runs"]} == {"lora", "dylora"}
    assert sorted({r["rank"] for r in result["dylora_ranks"]}) == [1, 2] == sorted({r["rank"] for r in result["lora_ranks"]})
    assert "step time × LoRA" in (tmp_path / "variants.md").read_text()
    assert (tmp_path / "variants_dylora_ranks.png").stat().st_size > 1000


def test_bench_init_quick_compares_inits_and_peft_cost(tmp_path):
    torch.set_num_threads(1)
    assert main(["init", "--quick", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "init.json").read_text())
    table = {r["contender"]: r for r in result["convergence"]["table"]}
    assert set(table) == {"lora", "lora_ga"} and table["lora_ga"]["baseline"] == "lora"
    assert table["lora"]["trainable_params"] == table["lora_ga"]["trainable_params"]  # equal rank
    cost = result["cost"]["rows"][0]
    assert cost["init"] == "pissa" and cost["time_ratio"] > 0 and cost["lorakit_s"] > 0
    assert (tmp_path / "init.png").stat().st_size > 1000 and "| lora_ga | lora |" in (tmp_path / "init.md").read_text()


def test_bench_init_quick_loftq_against_qlora_on_the_same_nf4_base(tmp_path):
    """LoftQ is compared with QLoRA (LoRA's default init on the NF4 base, without double quantization: LoftQ's own
    quantizer), as the paper does (arXiv:2310.08659 §4: "QLoRA" rows): at loftq_iter = 1 both bases are q_N(W), so
    the rows differ only in the adapter's start; a full-precision LoRA baseline would mix in the quantization."""
    torch.set_num_threads(1)
    assert main(["init", "--quick", "--only", "convergence", "--methods", "qlora", "loftq", "--output",
                 str(tmp_path)]) == 0
    result = json.loads((tmp_path / "init.json").read_text())
    table = {r["contender"]: r for r in result["convergence"]["table"]}
    assert set(table) == {"qlora", "loftq"} and table["loftq"]["baseline"] == "qlora"
    assert table["qlora"]["trainable_params"] == table["loftq"]["trainable_params"]  # equal rank
    assert table["loftq"]["delta_loss_all_steps"] is not None  # paired with the QLoRA run of its seed
    assert "| loftq | qlora |" in (tmp_path / "init.md").read_text()


@pytest.mark.slow  # launches 2 processes that load the bundled model twice each: minutes on a small machine
def test_bench_perf_ddp_row_times_two_processes_against_one(tmp_path):
    assert main(["perf", "--quick", "--only", "ddp", "--device", "cpu", "--output", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "perf.json").read_text())["rows"]
    assert row["row"].startswith("DDP 2 processes") and "error" not in row
    assert row["times"]["ddp_2"]["repeats"] == row["times"]["single"]["repeats"] == 2
    assert row["ddp2/single"]["min"] > 0


@pytest.mark.slow  # ~1 min: eight trainings + interleaved timing
def test_bench_reparam_quick_rows_plot_and_ratios(tmp_path):
    torch.set_num_threads(1)
    assert main(["reparam", "--quick", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "reparam.json").read_text())
    rows = {r["method"]: r for r in result["table"]}
    assert set(rows) == {"lora_r1", "lora_r2", "mos", "lamda"}
    assert rows["mos"]["trainable_params"] == rows["lora_r1"]["trainable_params"]  # pools of e = 1: LoRA r=1's size
    assert rows["lamda"]["trainable_params_end"] < rows["lamda"]["trainable_params"]  # B frozen by the end
    assert all(rows[m]["step_vs_lora"] > 0 and rows[m]["memory_vs_lora"] > 0 for m in ("mos", "lamda"))
    assert "step time × LoRA" in (tmp_path / "reparam.md").read_text()
    assert (tmp_path / "reparam_params.png").stat().st_size > 1000


def test_bench_init_contender_with_its_own_lr_and_resume_keeps_matching_runs():
    from lorakit.bench import inits

    assert inits.parse_contender("pissa@2e-4", 2e-3) == ("pissa", 2e-4, "lora@2e-4")
    assert inits.parse_contender("lora_sb", 2e-3) == ("lora_sb", 2e-3, "lora_xs")
    with pytest.raises(ValueError, match="pisa.*NAME@LR"):
        inits.parse_contender("pisa", 2e-3)
    with pytest.raises(ValueError, match="not a learning rate"):
        inits.parse_contender("pissa@fast", 2e-3)
    run = {"contender": "lora", "baseline": "lora", "seed": 0, "losses": [1.0] * 8, "eval": [(8, 0.5)],
           "trainable_params": 10}
    previous = {"profile": asdict(inits.QUICK), "convergence": {"runs": [run, {"contender": "x", "seed": 0,
                                                                              "skipped": "no"}]}}
    assert inits.reusable_runs(previous, inits.QUICK) == [run]  # finished runs only
    assert inits.reusable_runs(previous, replace(inits.QUICK, steps=5)) == []  # other settings: rerun everything


def test_bench_methods_trains_gamma_mod_at_its_faithful_default():
    """γ-MoD's registered variant routes block 1 (sized for the 2-block contract models); bench methods trains its
    defaults instead, at the bench's r: on the bundled 6-block base ARank converts the blocks of the official
    ``arank_mod`` rule, 3 and 4 (Gamma-MOD ``llava_llama_mod.py`` l. 554-558: all but the first three and the last).
    Methods without bench variants bench their registered variants."""
    from lorakit.bench.gamma_mod import arank_mod_layers
    from lorakit.bench.methods import _config_for
    from lorakit.core.model import adapter_state
    from lorakit.data import load_examples
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.training import TrainConfig, train

    torch.set_num_threads(1)
    method = lk.get_method("gamma_mod")
    assert method.variants["gamma_mod"]["mod_layers"] == [1]
    config = _config_for(method, next(iter(method.benchmark_variants())), 8)
    assert config.mod_layers is None and config.r == 8
    base, tokenizer = load_model_and_tokenizer(None)
    model = lk.add_adapter(base, config)
    train(model, tokenizer, load_examples("reverse", "train", n=4, seed=0),
          TrainConfig(steps=1, batch_size=2, init_batches=1, max_length=64), progress=False)
    assert adapter_state(model).configs["default"].mod_layers == arank_mod_layers(base.config.num_hidden_layers) == [3, 4]
    assert all(m.benchmark_variants() is m.variants for m in lk.list_methods() if m.bench_variants is None)
