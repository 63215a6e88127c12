"""Seeds are integers >= 0: ``torch.manual_seed(-1)`` takes a negative seed but numpy's and Python's seeding do not,
so a run with ``--seed -1`` would fail (or seed one library and not the other) only after the model has loaded.
Every ``--seed`` / ``--seeds`` flag refuses one as argparse's usage error naming the flag, and every config with a
``seed`` field refuses one with a ConfigError whose ``field`` is that seed."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit.cli import main
from lorakit.core.errors import ConfigError

OUT = "{out}"
COMMANDS = [  # every command with a seed flag, the rest of a command line that would otherwise start work
    ["train", "--output", OUT],
    ["eval", "--data", "reverse"],
    ["tasks", "--jsonl", "reverse"],
    ["federate", "--output", OUT],
    ["generate-adapter", "--task", "reverse", "--generator", OUT, "--output", OUT],
    ["merge-adapters", OUT, OUT, "--output", OUT],
    ["pretrain-base", "--out", OUT],
    ["regmix", "--out", OUT],
    ["diffusion", "train-base", "--out", OUT],
    ["diffusion", "train-loras", "--out", OUT],
    ["diffusion", "train-classifier", "--out", OUT],
    ["compose-image", "--lora", OUT, "--out", OUT],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_every_seed_flag_refuses_a_negative_seed(argv, tmp_path, capsys, monkeypatch):
    import lorakit.hub

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before --seed was checked")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_model)
    argv = [a.replace(OUT, str(tmp_path / "o")) for a in argv]
    try:
        status = main([*argv, "--seed", "-1"])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert "argument --seed: must be an integer >= 0, got -1" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "o").exists()


def test_train_refuses_a_seed_past_the_64_bit_range(tmp_path, capsys):
    # torch.manual_seed raised "Overflow when unpacking long long" after the data loaded
    with pytest.raises(SystemExit) as e:
        main(["train", "--output", str(tmp_path / "o"), "--seed", str(2**64)])
    assert e.value.code == 2
    assert f"argument --seed: must be an integer in 0..{2**63 - 1} (2**63 - 1), got {2**64}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bench_seeds_refuse_a_negative_seed(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "methods", "--quick", "--seeds", "0,-1", "--output", str(tmp_path)])
    assert e.value.code == 2
    assert "argument --seeds: must be an integer >= 0, got -1" in capsys.readouterr().err


def _configs_with_a_seed():
    from lorakit.compose.icm_lora_generator import IcmLoraConfig
    from lorakit.compose.translora import TransLoraConfig
    from lorakit.federated.base import FederatedConfig
    from lorakit.pretrain.corpus import CorpusConfig
    from lorakit.pretrain.loram_align import AlignConfig
    from lorakit.pretrain.regmix import RegMixConfig
    from lorakit.pretrain.train import PretrainConfig
    from lorakit.quantize.cbq import CBQConfig
    from lorakit.training import TrainConfig

    return [TrainConfig, IcmLoraConfig, TransLoraConfig, FederatedConfig, CorpusConfig, AlignConfig,
            RegMixConfig, PretrainConfig, CBQConfig]


@pytest.mark.parametrize("cls", _configs_with_a_seed(), ids=lambda c: c.__name__)
def test_every_config_refuses_a_negative_seed(cls):
    assert "seed" in {f.name for f in dataclasses.fields(cls)}
    cls(seed=0)
    with pytest.raises(ConfigError, match=r"seed must be >= 0.*got -1") as e:
        cls(seed=-1)
    assert e.value.field == f"{cls.__name__}.seed"
