"""`lorakit federate` and `lorakit bench federated` from the command line."""

from __future__ import annotations

import json

import pytest

import lorakit as lk
from lorakit.cli import main


def test_federate_refuses_heterogeneous_ranks_for_averaging_strategies(tmp_path, capsys):
    code = main(["federate", "--strategy", "lora_fair", "--client-ranks", "8,4", "--output", str(tmp_path / "o")])
    assert code == 2
    assert "flora" in capsys.readouterr().err


def test_federate_client_ranks_errors_name_the_flag_and_unused_ranks(tmp_path, capsys):
    assert main(["federate", "--client-ranks", "4,x", "--output", str(tmp_path / "a")]) == 2
    assert "--client-ranks '4,x'" in capsys.readouterr().err
    # more ranks than clients: some would never be used
    assert main(["federate", "--strategy", "fedit", "--clients", "2", "--client-ranks", "4,2,8",
                 "--output", str(tmp_path / "b")]) == 2
    assert "3 ranks for 2 clients" in capsys.readouterr().err


def test_federate_refuses_unknown_stragglers(tmp_path, capsys):
    assert main(["federate", "--clients", "2", "--stragglers", "5", "--output", str(tmp_path / "o")]) == 2
    assert "stragglers" in capsys.readouterr().err


def test_federate_refuses_no_eval_examples_up_front(tmp_path, capsys):
    """Was: the whole run trained, then a KeyError 'eval_loss' traceback at the report (no examples were scored)."""
    from lorakit.core.errors import ConfigError
    from lorakit.federated.base import FederatedConfig

    assert main(["federate", "--eval-examples", "0", "--output", str(tmp_path / "o")]) == 2
    assert "--eval-examples must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="eval_examples must be >= 1"):
        FederatedConfig(eval_examples=0)
    FederatedConfig(eval_examples=0, evaluate=False)  # nothing is scored: no examples needed


def test_federate_refuses_fewer_examples_than_clients_up_front(tmp_path, capsys):
    """Was: the server loaded the model, then every client failed in ``partition`` (each client needs one example:
    its contract, ``partition.py``). Built-in tasks give ``train_examples`` per task, so the config tells."""
    from lorakit.core.errors import ConfigError
    from lorakit.federated.base import FederatedConfig

    assert main(["federate", "--clients", "5", "--data", "reverse,sort", "--train-examples", "2",
                 "--output", str(tmp_path / "o")]) == 2
    assert "--train-examples 2 per task × 2 task(s) cannot be split over 5 clients" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="cannot be split over 5 clients"):
        FederatedConfig(clients=5, data="reverse", train_examples=4)
    FederatedConfig(clients=4, data="reverse,sort", train_examples=2)  # 4 examples for 4 clients: fits


@pytest.mark.slow
def test_federate_runs_flower_simulation(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["federate", "--model", tiny_model_dir, "--strategy", "flora", "--client-ranks", "2,4", "--clients", "2",
                 "--rounds", "2", "--local-steps", "2", "--data", "reverse,sort", "--train-examples", "16",
                 "--eval-examples", "4", "--target-modules", "q_proj,o_proj", "--output", str(out), "--quiet"])
    assert code == 0
    result = json.loads((out / "federated.json").read_text())
    assert [r["accepted"] for r in result["rounds"]] == [2, 2]
    assert "round 2: 2/2 updates accepted" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_federated_quick(tmp_path):
    from lorakit.bench.cli import main as bench_main

    assert bench_main(["federated", "--quick", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "federated.json").read_text())
    assert result["aggregation"]["flora_relative_error"] < 1e-5 < result["aggregation"]["fedit_relative_error"]
    assert {(r["strategy"], r["dp"]) for r in result["runs"]} >= {("ffa", True), ("fedit", True), ("flora", False)}
    assert all(r["epsilon"] > 0 for r in result["runs"] if r["dp"])
    assert (tmp_path / "federated.png").is_file()


@pytest.mark.parametrize("argv,says", [
    # Flower would wait for 9 nodes that never come; the simulation silently sampled 2
    (["--clients", "2", "--min-clients", "9"], "--min-clients 9 is more than --clients 2"),
    # (ε, δ)-DP needs δ in (0, 1) (Dwork & Roth, Def. 2.4; δ is a probability): 1.5 reported ε = -7.4
    (["--dp-noise-multiplier", "1", "--dp-delta", "1.5"], "--dp-delta must be in (0, 1), got 1.5"),
    (["--dp-noise-multiplier", "1", "--dp-delta", "0"], "--dp-delta must be in (0, 1), got 0.0"),
    # Dirichlet(α) needs α > 0: was an IndexError 'pop from empty list' after the model loaded
    (["--partition", "skew", "--skew-alpha", "0"], "--skew-alpha must be > 0 and finite, got 0.0"),
    # model-free settings: refused before Flower / Ray start (was: after about a minute of start-up)
    (["--lora-alpha", "0"], "--lora-alpha must be > 0 and finite, got 0.0"),
    (["--lr", "0"], "--lr must be > 0 and finite, got 0.0"),
    # infinite values. Was: DP noise σ = inf (or σ·C with --dp-max-grad-norm inf) made every client's update NaN, all
    # rejected in every round (and no ε reported); --lr inf failed in every client (TrainConfig); LoRA-FAIR's
    # --fair-lr / --fair-lambda inf made the server's ΔB, so the global adapter and eval loss, NaN; a straggler's
    # sleep(inf) was an OverflowError in the client
    (["--dp-noise-multiplier", "inf"], "--dp-noise-multiplier must be >= 0 and finite, got inf"),
    (["--dp-noise-multiplier", "1", "--dp-max-grad-norm", "inf"], "--dp-max-grad-norm must be > 0 and finite, got inf"),
    (["--lr", "inf"], "--lr must be > 0 and finite, got inf"),
    (["--strategy", "lora_fair", "--fair-lr", "inf"], "--fair-lr must be > 0 and finite, got inf"),
    (["--strategy", "lora_fair", "--fair-lambda", "inf"], "--fair-lambda must be >= 0 and finite"),
    (["--stragglers", "1", "--straggler-delay", "inf"], "--straggler-delay must be >= 0 and finite, got inf"),
    (["--dp-noise-multiplier", "nan"], "--dp-noise-multiplier must be >= 0 and finite, got nan"),
])
def test_federate_refuses_bad_settings_before_starting(argv, says, tmp_path, capsys, monkeypatch):
    import lorakit.federated.simulate

    monkeypatch.setattr(lorakit.federated.simulate, "federate", lambda *a, **k: pytest.fail("the run started"))
    assert main(["federate", *argv, "--output", str(tmp_path / "o")]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("field,value", [("fair_lambda", -1.0), ("fair_lr", 0.0), ("fair_steps", 0)])
def test_lora_fair_settings_are_checked(field, value):
    """LoRA-FAIR's λ ≥ 0 (a penalty weight, arXiv:2411.14961 eq. 7), a positive step size and at least one step:
    fair_steps=0 or fair_lr=0 silently ran FedIT, a negative λ rewarded a large ΔB."""
    from lorakit.core.errors import ConfigError
    from lorakit.federated.base import FederatedConfig

    with pytest.raises(ConfigError, match=rf"FederatedConfig.{field} must be"):
        FederatedConfig(strategy="lora_fair", **{field: value})


def test_a_data_file_is_not_both_trained_on_and_evaluated(tmp_path):
    """Was: ``--data FILE`` gave the server its first ``eval_examples`` lines to score, which the clients trained on
    (a file has no test split: every one of the scored examples was a training example). Now the file's last tenth
    is held out as ``lorakit train`` holds it out, or ``eval_data`` names the evaluation file."""
    from lorakit.data import load_examples
    from lorakit.federated.base import FederatedConfig
    from lorakit.federated.client import eval_examples, train_examples

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i} =>", "completion": f" c{i}"}) + "\n" for i in range(40)))
    config = FederatedConfig(clients=2, data=str(path), train_examples=30, eval_examples=8)
    trained = [ex.prompt for k in range(2) for ex in train_examples(config, k)]
    scored = [ex.prompt for ex in eval_examples(config)]
    assert sorted(trained) == sorted(f"p{i} =>" for i in range(27)) and scored == [f"p{i} =>" for i in (27, 28, 29)]
    other = tmp_path / "test.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"q{i} =>", "completion": f" d{i}"}) + "\n" for i in range(5)))
    config = FederatedConfig(clients=2, data=str(path), eval_data=str(other), train_examples=30, eval_examples=4)
    assert len([ex for k in range(2) for ex in train_examples(config, k)]) == 30  # nothing held out
    assert [ex.prompt for ex in eval_examples(config)] == [ex.prompt for ex in load_examples(str(other), n=4)]
    # a file is used whole unless train_examples caps it (was: silently its first 64 lines, the per-task default)
    config = FederatedConfig(clients=2, data=str(path))
    assert len([ex for k in range(2) for ex in train_examples(config, k)]) == 36 and len(eval_examples(config)) == 4
    # built-in tasks keep their test split
    config = FederatedConfig(clients=2, data="reverse", eval_data="sort", train_examples=8, eval_examples=3)
    assert {ex.task for ex in eval_examples(config)} == {"sort"}


@pytest.mark.parametrize("text,expected", [
    ("q_proj,v_proj", ["q_proj", "v_proj"]), ("all-linear", "all-linear"), (r".*\.(q|v)_proj", r".*\.(q|v)_proj"),
    (r".*layers\.[0-9]{1,2}\.self_attn\.q_proj", r".*layers\.[0-9]{1,2}\.self_attn\.q_proj"), ("q_proj", ["q_proj"]),
])
def test_federate_target_modules_take_all_linear_and_a_regex(text, expected, tmp_path, monkeypatch):
    """Was: ``lorakit federate --target-modules all-linear`` (or a regex) became the one-name list ['all-linear'],
    which matches no module (TargetError in the ServerApp, the simulation ended without a result); ``lorakit train``
    and the docs take both. The Flower run config's ``target-modules`` is read the same way."""
    import lorakit.federated.simulate
    from lorakit.federated.apps import config_from_run_config

    seen = []
    monkeypatch.setattr(lorakit.federated.simulate, "federate",
                        lambda config, **k: seen.append(config) or {"rounds": [], "evaluation": []})
    assert main(["federate", "--target-modules", text, "--output", str(tmp_path / "o")]) == 0
    assert seen[0].target_modules == expected
    assert config_from_run_config({"target-modules": text}).target_modules == expected
    # one TOML number for a list setting (`client-ranks = 4`) is a one-item list, not a TypeError
    assert config_from_run_config({"strategy": "flora", "client-ranks": 4}).client_ranks == [4]


def test_federate_all_linear_adapts_every_linear_layer(tiny_config):
    from lorakit.federated.server import ServerCore

    core = ServerCore(tiny_config("fedit", target_modules="all-linear"))
    assert {p.rsplit(".", 1)[-1] for p in core.shapes} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"}


def test_federate_flags_reach_every_setting_a_user_tunes(tmp_path, monkeypatch):
    """Was: FederatedConfig's max_length, LoRA-FAIR's λ / lr / steps and evaluate had no flag, so `lorakit federate`
    could not set the λ the docs name (the Flower run config could)."""
    import lorakit.federated.simulate

    seen = []
    monkeypatch.setattr(lorakit.federated.simulate, "federate",
                        lambda config, **k: seen.append(config) or {"rounds": [], "evaluation": []})
    assert main(["federate", "--strategy", "lora_fair", "--max-length", "32", "--fair-lambda", "0.5", "--fair-lr",
                 "0.1", "--fair-steps", "7", "--no-evaluate", "--output", str(tmp_path / "o")]) == 0
    c = seen[0]
    assert (c.max_length, c.fair_lambda, c.fair_lr, c.fair_steps, c.evaluate) == (32, 0.5, 0.1, 7, False)


@pytest.mark.parametrize("argv,says", [
    (["--target-modules", "qproj"], "matched no module: 'qproj' (closest: q_proj"),
    # an embedding's LoRA has lora_embedding_A/B, not linear lora_A/lora_B: was an AttributeError in the ServerApp
    (["--target-modules", "q_proj,embed_tokens"], "'model.embed_tokens' (Embedding) gets a LoraEmbedding. Leave it "
                                                  "out of --target-modules"),
    (["--data", "revers,sort"], "--data: unknown task 'revers'. Did you mean: reverse?"),
    (["--eval-data", "missing.jsonl"], "--eval-data 'missing.jsonl' is not a file"),
    # was: read only by the ServerApp, after Ray's start-up
    (["--eval-data", "EMPTY"], "empty.jsonl: no examples (the file is empty or has only blank lines)"),
    (["--round-timeout", "0"], "--round-timeout must be > 0"),
    (["--straggler-delay", "-5"], "--straggler-delay must be >= 0"),
    (["--backend-cpus", "-2"], "--backend-cpus: must be a positive integer"),
])
def test_federate_refuses_what_would_fail_inside_the_simulation(argv, says, tiny_model_dir, tmp_path, capsys,
                                                                 monkeypatch):
    """Was: targets matching no module, a task-name typo or a missing data file failed in the ServerApp inside Ray
    ("the Flower simulation ended without a result"), a round timeout of 0 waited for nothing and accepted no
    update, and --backend-cpus -2 reached Ray. Now each is refused before Flower starts, naming its flag."""
    import lorakit.federated.simulate

    monkeypatch.setattr(lorakit.federated.simulate, "federate", lambda *a, **k: pytest.fail("the run started"))
    (tmp_path / "empty.jsonl").write_text("\n")
    argv = [str(tmp_path / "empty.jsonl") if a == "EMPTY" else a for a in argv]
    try:
        code = main(["federate", "--model", tiny_model_dir, "--data", "reverse,sort", *argv,
                     "--output", str(tmp_path / "o")])
    except SystemExit as stop:  # argparse's own type errors
        code = stop.code
    assert code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("key,value", [("client-ranks", 8.5), ("client-ranks", "8,4.5"), ("client-ranks", "8,eight"),
                                       ("stragglers", 1.5), ("stragglers", "0, 1.0x")])
def test_run_config_lists_refuse_non_integers_naming_the_key(key, value):
    """Issue 36, item 3. Was: `client-ranks = 8.5` became [8] (``int(8.5)``) without a word, and `"8,4.5"` a bare
    ValueError. Now a ConfigError naming the run-config key; whole numbers (8, 8.0, "8, 4") still read."""
    from lorakit.federated.apps import config_from_run_config

    with pytest.raises(lk.ConfigError, match=f"run config '{key}': .*not a whole number"):
        config_from_run_config({"strategy": "flora", "clients": 4, key: value})
    assert config_from_run_config({"strategy": "flora", "clients": 4, "client-ranks": 8.0}).client_ranks == [8]
    assert config_from_run_config({"strategy": "flora", "clients": 4, "client-ranks": " 8, 4"}).client_ranks == [8, 4]


@pytest.mark.parametrize("field,value", [("rounds", 2.5), ("clients", 2.0), ("client_ranks", [8.5]), ("seed", True),
                                         ("stragglers", [0.5])])
def test_federated_config_refuses_non_integer_counts(field, value):
    """The same for a FederatedConfig built from JSON (or Python): a float count or rank names the field."""
    from lorakit.federated.base import FederatedConfig

    with pytest.raises(lk.ConfigError, match=f"{field}.*takes whole numbers"):
        FederatedConfig.from_dict({"strategy": "flora", "clients": 4, field: value})


@pytest.mark.parametrize("key", ["overwrite", "resume"])
def test_run_config_switches_refuse_a_quoted_false(key):
    """Was: ``bool("false")`` is True, so a quoted `overwrite = "false"` removed the output folder."""
    from lorakit.federated.apps import output_options

    with pytest.raises(lk.ConfigError, match=f"run config '{key}': 'false' is not true or false"):
        output_options({"output": "o", key: "false"})
    assert output_options({"output": "o", key: True})[1 if key == "overwrite" else 2] is True


@pytest.mark.parametrize("flag", ["--method", "--procedure"])
def test_federate_has_no_method_flag_and_says_so(flag, tmp_path, capsys):
    """Was: `lorakit federate --method dora` (or --procedure) was looked up as train's method, "unknown method 'dora'.
    Registered methods: ..." — a list federate has no use for — while `--method lora` was an unrecognized
    argument."""
    for value in ("dora", "lora", "galore"):
        try:
            code = main(["federate", flag, value, "--output", str(tmp_path / "o")])
        except SystemExit as stop:  # argparse's own errors
            code = stop.code
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"lorakit federate: error: unrecognized arguments: {flag} {value}" in err, err
        assert "unknown method" not in err and "unknown procedure" not in err


@pytest.mark.parametrize("written,meant", [("FLoRA", "flora"), ("LoRA-FAIR", "lora_fair"), ("FedIT", "fedit"),
                                           ("FFA-LoRA", "ffa")])
def test_a_strategy_written_as_its_paper_names_it_gets_a_near_match(written, meant, tmp_path, capsys):
    """README and docs name the strategies as their papers do (FedIT, FFA-LoRA, FLoRA, LoRA-FAIR). Was: `--strategy
    FLoRA` (or `strategy = "LoRA-FAIR"` in a Flower run config) listed the choices with no near match."""
    import re

    from lorakit.core.errors import ConfigError
    from lorakit.federated.apps import config_from_run_config

    try:
        code = main(["federate", "--strategy", written, "--output", str(tmp_path / "o")])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    hint = rf"Did you mean: ([a-z_]+, )*{meant}\b"  # FFA-LoRA: "flora, ffa"
    err = capsys.readouterr().err
    assert code == 2 and re.search(hint, err), err
    with pytest.raises(ConfigError, match=hint):
        config_from_run_config({"strategy": written})
