"""``lorakit train --init NAME``: a registered init chosen on the command line, its options, and its file."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main

COMMON = ["--data", "reverse", "--steps", "2", "--batch-size", "4", "--train-examples", "16", "--eval-examples", "2",
          "--quiet", "--r", "4", "--target-modules", "q_proj", "v_proj", "--init-batches", "2"]


def test_train_with_a_base_changing_data_driven_init_saves_for_the_original_base(tmp_path, capsys):
    out = tmp_path / "ga"
    assert main(["train", "--init", "lora_ga", "--init-options", '{"scale": "unit"}', "--output", str(out), *COMMON]) == 0
    assert "changed the base" in capsys.readouterr().out
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # PEFT's rank-2r conversion
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", "reverse", "--eval-examples", "2"]) == 0


def test_train_with_eva_and_its_options(tmp_path):
    out = tmp_path / "eva"
    assert main(["train", "--init", "eva", "--init-options", '{"rho": 1.0, "tau": 0.5}', "--output", str(out),
                 *COMMON]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["rank_pattern"] == {}  # rho = 1: ranks stay uniform


def test_unknown_init_is_a_clear_error_before_loading(capsys):
    assert main(["train", "--init", "lora_gaa", "--steps", "1"]) == 2
    assert "unknown init 'lora_gaa'. Did you mean: lora_ga" in capsys.readouterr().err


def _no_model_load(monkeypatch):
    import lorakit.hub

    def no_load(*args, **kwargs):
        raise AssertionError("a base model was loaded before the init settings were checked")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)


def test_a_misspelt_init_option_is_named_before_loading(capsys, monkeypatch):
    _no_model_load(monkeypatch)
    assert main(["train", "--init", "eva", "--init-options", '{"rhoo": 2}', *COMMON]) == 2
    assert "unknown option 'rhoo' for init 'eva'. Did you mean: rho?" in capsys.readouterr().err
    assert main(["train", "--init-lora-weights", "eva", "--init-options", '{"rhoo": 2}', *COMMON]) == 2
    assert "unknown option 'rhoo' for init 'eva'" in capsys.readouterr().err


def test_init_options_without_an_init_are_an_error_not_ignored(capsys, monkeypatch):
    _no_model_load(monkeypatch)
    assert main(["train", "--init-options", '{"rho": 1.0}', *COMMON]) == 2
    assert "--init-options is given but no init runs" in capsys.readouterr().err


def test_init_options_reach_an_init_the_config_names(tmp_path):
    """--init-lora-weights eva (PEFT's spelling) with --init-options: the options were dropped unless --init named it.
    rho = 1 keeps EVA's ranks uniform (no rank_pattern); the default rho = 2 redistributes them."""
    out = tmp_path / "eva"
    assert main(["train", "--init-lora-weights", "eva", "--init-options", '{"rho": 1.0, "tau": 0.5}',
                 "--output", str(out), *COMMON]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["rank_pattern"] == {}


def test_export_of_a_pissa_adapter_is_a_plain_lora_for_the_untouched_base(tmp_path):
    """`lorakit export` promises a plain PEFT LoRA (what vLLM / SGLang / lorakit's banks load); a PiSSA file is
    relative to the residual base its init leaves, so export writes PEFT's conversion for the original base
    (``path_initial_model_for_weight_conversion``: rank 2r, init_lora_weights true). Reference: real PEFT's output
    of the PiSSA adapter (PEFT re-runs PiSSA when it loads it)."""
    import torch
    from peft import PeftModel

    from lorakit.hub import load_model_and_tokenizer

    out = tmp_path / "pissa"
    assert main(["train", "--init", "pissa", "--lr", "0.05", "--output", str(out), *COMMON]) == 0
    assert main(["export", str(out / "adapter"), "--output", str(tmp_path / "plain")]) == 0
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_model_and_tokenizer(None)[0], str(out / "adapter"))(ids).logits
        got = PeftModel.from_pretrained(load_model_and_tokenizer(None)[0], str(tmp_path / "plain"))(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_a_base_changing_init_with_a_4bit_base_is_refused_before_loading(capsys, monkeypatch):
    _no_model_load(monkeypatch)
    assert main(["train", "--init", "pissa", "--quantize", "nf4", *COMMON]) == 2
    assert "--init pissa changes the base weights, which --quantize nf4 stores in 4 bit" in capsys.readouterr().err


# -- init × method (and procedure × method, federated counts): refused before any model loads -----------------
# What each init needs is its own contract (lorakit/init/): lora_sb / nlora set the three factors of a B·M·A
# adapter (``middle_targets``), pissa / olora / corda / lora_ga / eva set or move B A factors of a LoRA
# (``linear_targets`` / ``split_base_weight``), eva cannot re-rank a DoRA magnitude, and only methods whose config
# has an init field can name one (``AdapterConfig.with_init``).
MISMATCHES = [
    (["--init", "lora_sb"], "init 'lora_sb' cannot initialise a 'lora' adapter: it works on B·M·A adapters "
                            "(inttune, lora_xs, nlora, slora)"),
    (["--init", "nlora"], "init 'nlora' cannot initialise a 'lora' adapter: it works on B·M·A adapters"),
    (["--method", "lora_xs", "--init", "pissa"], "init 'pissa' cannot initialise a 'lora_xs' adapter: it works on "
                                                 "LoRA-style B·A adapters (ffa_lora, lora)"),
    (["--method", "slora", "--init", "lora_ga"], "init 'lora_ga' cannot initialise a 'slora' adapter"),
    (["--method", "mixlora", "--init", "eva"], "method 'mixlora' has no field that selects an init"),
    (["--init", "eva", "--use-dora"], "a DoRA adapter cannot change rank after its magnitude was set"),
    (["--init-lora-weights", "corda", "--method", "lora"], None),  # a fitting pair: reaches the model load
    # two inits named: the message names the method's own flag as typed (was "--init-lora-weights / --init-weights")
    (["--init", "pissa", "--init-lora-weights", "eva"], "--init pissa and --init-lora-weights eva name two inits"),
    (["--method", "lora_xs", "--init", "lora_sb", "--init-weights", "nlora"],
     "--init lora_sb and --init-weights nlora name two inits"),
    (["--procedure", "allora", "--use-dora"], "ALLoRA needs plain LoRA on linear layers; the adapter is lora with "
                                              "--use-dora"),
    (["--procedure", "allora", "--lora-alpha", "8", "--lora-dropout", "0.1"],
     "ALLoRA uses no scaling factor and no dropout; the adapter has scaling 2 (set --lora-alpha = r, no rsLoRA), "
     "dropout (set --lora-dropout = 0)"),
    (["--procedure", "ggpo", "--method", "ffa_lora"], "LoRA-GGPO needs plain LoRA on linear layers; the adapter is "
                                                      "'ffa_lora'"),
    (["--procedure", "loraprune", "--lora-bias"], "LoRAPrune needs a plain LoRA adapter"),
    # BA-LoRA's regularisers read the LM head's logits (balora.py param_groups), which a classifier lacks
    (["--procedure", "balora", "--task-type", "seq-cls"], "BA-LoRA needs a causal LM with an output layer"),
    # Flexora holds out its validation examples (200 by default) from the 16 training examples
    (["--procedure", "flexora"], "--val-size 200 validation examples are held out of a run of 16 training examples"),
]


@pytest.mark.parametrize("flags,says", MISMATCHES, ids=[" ".join(f) for f, _ in MISMATCHES])
def test_an_init_or_procedure_that_does_not_fit_the_method_is_refused_before_loading(flags, says, capsys, monkeypatch,
                                                                                    tmp_path):
    """Was: `--init lora_sb` on a plain LoRA failed inside the init, after the model loaded and the "before"
    evaluation ran (ALLoRA / GGPO / LoRAPrune on the wrong adapter, BA-LoRA on a classifier and Flexora's hold-out
    on too little data failed when training started, after the model loaded)."""
    _no_model_load(monkeypatch)
    argv = ["train", *flags, *COMMON, "--output", str(tmp_path / "out")]
    if says is None:
        with pytest.raises(AssertionError, match="a base model was loaded"):
            main(argv)
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


def test_the_python_api_refuses_a_mismatched_init_before_its_data_pass():
    """add_adapter(..., init="lora_sb") on a LoRA config: ConfigError before the gradient pass, nothing attached."""
    import torch

    import lorakit
    from lorakit.core.errors import ConfigError
    from lk_models import tiny_llama

    model = tiny_llama()
    batches = [{"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.ones(1, 4, dtype=torch.long)}]
    with pytest.raises(ConfigError, match="init 'lora_sb' cannot initialise a 'lora' adapter"):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), init="lora_sb",
                            init_batches=batches)
    assert not lorakit.core.model.adapter_state(model).configs


def test_train_with_randomised_pissa_saves_for_the_original_base(tmp_path, capsys):
    """pissa_niter_K's randomised SVD cannot be redone exactly when the file loads (the residual base would be
    another draw), so `lorakit train` writes PEFT's rank-2r conversion for the untouched base, as for LoRA-GA; the
    adapter was saved as it was and reloaded against a newly drawn base."""
    out = tmp_path / "pissa"
    assert main(["train", "--init", "pissa_niter_2", "--output", str(out), *COMMON]) == 0
    assert "changed the base" in capsys.readouterr().out
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True


def test_train_with_loftq_through_either_init_option(tmp_path, capsys):
    """``--init loftq --init-options`` and PEFT's spelling ``--init-lora-weights loftq --loftq-config``: the file
    carries the loftq_config that ran (PEFT's keys), is saved as it is (LoftQ is redone exactly on load, so no
    rank-2r conversion), and eval loads it."""
    out = tmp_path / "loftq"
    assert main(["train", "--init", "loftq", "--init-options", '{"loftq_bits": 8}', "--output", str(out),
                 *COMMON]) == 0
    assert "changed the base" not in capsys.readouterr().out
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq" and config["r"] == 4
    assert config["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 1}
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", "reverse", "--eval-examples", "2"]) == 0
    out = tmp_path / "peft_spelling"
    assert main(["train", "--init-lora-weights", "loftq", "--loftq-config", '{"loftq_bits": 4, "loftq_iter": 2}',
                 "--output", str(out), *COMMON]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq" and config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}


@pytest.mark.parametrize("flags,says", [
    (["--init", "loftq", "--quantize", "nf4"], "--init loftq changes the base weights, which --quantize nf4 stores"),
    (["--init-lora-weights", "loftq", "--loftq-config", '{"loftq_bits": 2}'],
     "--loftq-config['loftq_bits']=2: LoftQ quantizes to 4 bits (NF4) or 8 bits (int8)"),
    (["--loftq-config", '{"loftq_bits": 4}'], "sets LoftQ, but --init-lora-weights True; set --init-lora-weights loftq"),
    (["--init", "loftq", "--init-options", '{"loftq_bits": 2}'],  # the flag typed, not --loftq-config
     "--init-options['loftq_bits']=2: LoftQ quantizes to 4 bits (NF4) or 8 bits (int8)"),
    (["--init-lora-weights", "loftq", "--init-options", '{"loftq_iter": 0}'],
     "--init-options['loftq_iter']=0 must be an integer >= 1"),
])
def test_loftq_settings_are_checked_before_loading(flags, says, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    assert main(["train", *flags, *COMMON]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("flags,says", [
    # PEFT has one field for both (LoraConfig.init_lora_weights, peft/tuners/lora/config.py): "gaussian" and
    # "pissa" cannot both hold, so neither may be dropped silently
    (["--init", "pissa", "--init-lora-weights", "gaussian"],
     "--init pissa replaces --init-lora-weights gaussian (both set how A and B start); give one of them."),
    (["--init", "eva", "--init-lora-weights", "false"], "--init eva replaces --init-lora-weights False"),
    # a value of init_lora_weights typed to --init names the flag that takes it
    (["--init", "gaussian"], "'gaussian' is no registered init (--init runs those) but a value of the method's own "
                             "--init-lora-weights; use --init-lora-weights gaussian."),
    (["--init", "orthogonal"], "use --init-lora-weights orthogonal."),
])
def test_init_beside_the_methods_own_init_value_is_refused_before_loading(flags, says, capsys, monkeypatch):
    from peft import LoraConfig as PeftLoraConfig

    PeftLoraConfig(r=4, init_lora_weights="gaussian")  # the value is PEFT's (init_lora_weights), not an init name
    _no_model_load(monkeypatch)
    assert main(["train", *flags, *COMMON]) == 2
    assert says in capsys.readouterr().err
