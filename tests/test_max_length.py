"""``max_length`` (tokens per training example) below 2 is refused on every path that takes it. Was: ``lorakit train
--max-length 1`` and ``lorakit federate --max-length 1`` ran to the end with loss 0.0000 (every example cut to its
BOS token, so no token was left to predict) and saved an untrained adapter; only 0 and below were refused."""

from __future__ import annotations

import pytest
import torch

from lorakit.cli import main
from lorakit.core.config import MIN_LENGTH
from lorakit.core.errors import ConfigError
from lorakit.data import Example
from lorakit.data.collate import IGNORE_INDEX, tokenize_example


@pytest.fixture(scope="module")
def tokenizer():
    from lorakit.hub import load_tokenizer

    return load_tokenizer(None)  # the bundled model's: it opens every prompt with BOS


def _predicted(item) -> int:
    """Tokens a causal LM is trained to predict in ``item``: labels shifted left by one (HF's loss), not -100."""
    return int((torch.tensor(item["labels"][1:]) != IGNORE_INDEX).sum())


def test_the_smallest_budget_still_predicts_a_token_and_one_less_is_refused(tokenizer):
    example = Example("reverse: a b c", "c b a")
    assert _predicted(tokenize_example(example, tokenizer, max_length=MIN_LENGTH)) == 1
    assert _predicted(tokenize_example(example, tokenizer, max_length=MIN_LENGTH + 1)) == 2
    with pytest.raises(ValueError, match="max_length must be >= 2, got 1"):
        tokenize_example(example, tokenizer, max_length=1)  # was: BOS alone, nothing to predict


def test_train_and_federated_configs_refuse_one_token():
    from lorakit.federated import FederatedConfig
    from lorakit.federated.apps import config_from_run_config
    from lorakit.training import TrainConfig

    for make, field in ((lambda: TrainConfig(steps=2, max_length=1), "TrainConfig.max_length"),
                        (lambda: FederatedConfig(max_length=1), "FederatedConfig.max_length"),
                        (lambda: config_from_run_config({"max-length": 1}), "FederatedConfig.max_length")):
        with pytest.raises(ConfigError, match="must be >= 2, got 1: every example is cut to 1 token") as error:
            make()
        assert error.value.field == field
    with pytest.raises(ConfigError, match="takes whole numbers"):  # was: 8.5 passed and was cut in every client
        FederatedConfig(max_length=8.5)
    assert TrainConfig(steps=2, max_length=2).max_length == FederatedConfig(max_length=2).max_length == 2


@pytest.mark.parametrize("command", [["train", "--steps", "2"], ["federate", "--rounds", "1"]])
def test_the_commands_refuse_max_length_1_before_any_work(command, tmp_path, capsys, monkeypatch):
    import lorakit.hub

    monkeypatch.setattr(lorakit.hub, "load_tokenizer", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit) as stop:
        main([*command, "--max-length", "1", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "argument --max-length: must be an integer >= 2 (a token to predict from and one to predict), got 1" in err
    assert not (tmp_path / "out").exists()
