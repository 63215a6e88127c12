"""Pretraining domains and --mixture: parsing, bad input, block sampling, and pretrain-base on a mixture."""

import json

import pytest
import torch

from lorakit.core.errors import ConfigError
from lorakit.pretrain import PretrainConfig, pretrain_base
from lorakit.pretrain.domains import (
    DOMAINS, check_weights, domain_documents, parse_mixture, resolve_mixture, sample_mixture_blocks,
)


def test_parse_named_and_explicit_mixtures():
    assert parse_mixture("natural") == "natural"
    assert parse_mixture("code=0.25, tasks=0.75") == {"code": 0.25, "tasks": 0.75}


@pytest.mark.parametrize("text, message", [
    ("cod=0.5,tasks=0.5", r"Unknown pretraining domain 'cod'.*Did you mean: code"),
    ("code=0.5,tasks=0.6", r"sum to 1\.1, not 1"),
    ("code=1.5,tasks=-0.5", r"weight of 'tasks' is -0\.5"),
    ("code=nan,tasks=1", r"weight of 'code' is nan"),
    ("code=x,tasks=1", r"'x' for 'code' is not a number"),
    ("code=0.5,code=0.5", r"appears twice"),
    # was "Mixture weight '' for 'code:0.5' is not a number": the item has no '=' at all
    ("code:0.5,tasks=0.5", r"Mixture item 'code:0\.5' is not domain=weight .*code=0\.4"),
    ("unifrom", r"Unknown mixture 'unifrom'.*Did you mean: uniform"),
])
def test_bad_mixtures_are_named(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_mixture(text)


def test_resolve_mixture():
    natural = {"code": 0.7, "tasks": 0.3}
    assert resolve_mixture("natural", natural) == natural
    assert resolve_mixture("uniform", natural) == {"code": 0.5, "tasks": 0.5}
    with pytest.raises(ConfigError, match="No RegMix result"):
        resolve_mixture("regmix", natural, "/nonexistent")
    assert check_weights({"docs": 1.0}) == {"docs": 1.0}


def test_domains_are_offline_text():
    docs = domain_documents(("docstrings", "docs"), scale=0.002, seed=0)
    for name, texts in docs.items():
        assert texts and sum(map(len, texts)) >= 0.5 * DOMAINS[name].natural_chars * 0.002
    assert all(isinstance(t, str) and t.strip() for t in docs["docstrings"])


def test_sample_mixture_blocks_follows_the_weights():
    blocks = {"a": torch.zeros(10, 4, dtype=torch.long), "b": torch.ones(50, 4, dtype=torch.long)}
    mixed = sample_mixture_blocks(blocks, {"a": 0.8, "b": 0.2}, 100, torch.Generator().manual_seed(0))
    assert mixed.shape == (100, 4)
    assert int((mixed[:, 0] == 0).sum()) == 80  # "a" has 10 blocks: repeated over 8 passes


@pytest.mark.parametrize("weights,n,expected", [
    # three equal domains, 4 blocks: quotas 4/3 each; round() gave 1 + 1 + 1 = 3. Largest remainder: floors 1, 1, 1,
    # one block left, all remainders 1/3: the first domain (ties keep the order) -> 2, 1, 1
    ({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 4, {"a": 2, "b": 1, "c": 1}),
    # quotas 1.5, 1.5: round() (half to even) gave 2 + 2 = 4 for 3 blocks; floors 1, 1 + one left -> 2, 1
    ({"a": 0.5, "b": 0.5}, 3, {"a": 2, "b": 1}),
    # quotas 0.7, 2.1, 4.2 for 7 blocks: floors 0, 2, 4 (6), one left to the largest remainder 0.7 (a) -> 1, 2, 4
    ({"a": 0.1, "b": 0.3, "c": 0.6}, 7, {"a": 1, "b": 2, "c": 4}),
    ({"a": 0.8, "b": 0.2}, 100, {"a": 80, "b": 20}),  # exact quotas stay as they are
])
def test_tiny_mixtures_add_up_to_exactly_steps_times_batch(weights, n, expected):
    """Hamilton's largest-remainder apportionment: counts are the quotas' floors plus one for each of the
    n − Σfloor largest remainders, so they sum to n (the number of blocks steps × batch_size asks for)."""
    blocks = {name: torch.full((5, 3), i, dtype=torch.long) for i, name in enumerate(weights)}
    mixed = sample_mixture_blocks(blocks, weights, n, torch.Generator().manual_seed(0))
    assert mixed.shape == (n, 3)
    assert {name: int((mixed[:, 0] == i).sum()) for i, name in enumerate(weights)} == expected


def test_pretrain_config_rejects_bad_mixtures():
    with pytest.raises(ConfigError, match="Did you mean: docs"):
        PretrainConfig(mixture="dcs=1")
    with pytest.raises(ConfigError, match="needs regmix_dir"):
        PretrainConfig(mixture="regmix")
    with pytest.raises(ConfigError, match="mixture_scale must be > 0"):
        PretrainConfig(mixture="uniform", mixture_scale=0)


def test_pretrain_base_on_a_mixture(tmp_path):
    config = PretrainConfig(
        mixture="code=0.5,docs=0.2,tasks=0.3", mixture_scale=0.004, vocab_size=400, hidden_size=32, num_layers=1,
        num_heads=2, num_kv_heads=1, intermediate_size=64, max_position_embeddings=32, seq_len=32, batch_size=8,
        steps=4, lr=1e-2, warmup_steps=1, bf16=False, num_threads=1, log_every=2, eval_fraction=0.1)
    info = pretrain_base(config, tmp_path / "m", log=lambda line: None)
    assert info["corpus"]["weights"] == {"code": 0.5, "docs": 0.2, "tasks": 0.3}
    assert info["corpus"]["train_blocks"] == 32
    assert set(info["eval_loss_per_domain"]) == set(DOMAINS)
    assert info["eval_loss"] == pytest.approx(sum(info["eval_loss_per_domain"].values()) / len(DOMAINS), abs=1e-3)
    assert json.loads((tmp_path / "m" / "pretrain_info.json").read_text())["config"]["mixture"] == config.mixture


def test_a_mixture_run_without_held_out_blocks_saves_its_model(tmp_path):
    """``--mixture ... --eval-fraction 0`` (or a domain too small to hold a block out) trained, then crashed on
    ``round(None, 4)`` building pretrain_info.json: a TypeError traceback and no model saved. Each such domain's
    loss is recorded as null, as the mean is (nothing to average), and the model is saved."""
    config = PretrainConfig(
        mixture="uniform", mixture_scale=0.004, vocab_size=400, hidden_size=32, num_layers=1, num_heads=2,
        num_kv_heads=1, intermediate_size=64, max_position_embeddings=32, seq_len=32, batch_size=4, steps=2,
        lr=1e-2, warmup_steps=1, bf16=False, num_threads=1, log_every=1, eval_fraction=0.0)
    info = pretrain_base(config, tmp_path / "m", log=lambda line: None)
    saved = json.loads((tmp_path / "m" / "pretrain_info.json").read_text())
    assert saved["eval_loss_per_domain"] == {name: None for name in DOMAINS} == info["eval_loss_per_domain"]
    assert saved["eval_loss"] is None and (tmp_path / "m" / "model.safetensors").is_file()


def test_a_domain_too_small_for_two_blocks_names_the_scale_flags(tmp_path, capsys):
    """`pretrain-base --mixture uniform --mixture-scale 0.00002` failed with "raise --stdlib-chars", a flag the mixture
    run does not read; now the domain, its scale and the flags that size it."""
    from lorakit.cli import main

    assert main(["pretrain-base", "--out", str(tmp_path / "m"), "--mixture", "uniform", "--mixture-scale", "0.00002",
                 "--vocab-size", "400", "--seq-len", "32", "--steps", "2", "--num-threads", "1"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lorakit pretrain-base: error: Domain ") and "at scale 2e-05 is too small: it gives " in last
    assert "--stdlib-chars" not in last and "(pretrain-base --mixture-scale, regmix --domain-scale)" in last, last
    assert not (tmp_path / "m").exists()
