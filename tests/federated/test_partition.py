"""Non-IID splits of the built-in tasks over clients."""

from __future__ import annotations

from collections import Counter

import pytest

from lorakit import ConfigError
from lorakit.data import load_examples
from lorakit.federated import partition

EXAMPLES = load_examples("reverse,sort,upper,add", "train", n=40, seed=0)


def _key(ex):
    return (ex.prompt, ex.completion)


@pytest.mark.parametrize("scheme", ["iid", "task", "skew"])
def test_every_example_goes_to_exactly_one_client(scheme):
    parts = partition(EXAMPLES, 3, scheme, alpha=0.3, seed=1)
    assert all(parts) and sum(map(len, parts)) == len(EXAMPLES)
    assert Counter(_key(e) for p in parts for e in p) == Counter(_key(e) for e in EXAMPLES)
    assert parts == partition(EXAMPLES, 3, scheme, alpha=0.3, seed=1)  # deterministic


def test_task_split_gives_whole_tasks():
    parts = partition(EXAMPLES, 4, "task")
    assert [len({e.task for e in p}) for p in parts] == [1, 1, 1, 1]
    assert len({p[0].task for p in parts}) == 4
    shared = partition(EXAMPLES, 8, "task")  # two clients per task split its examples
    assert [len(p) for p in shared] == [20] * 8


def test_skew_split_is_skewed_and_iid_is_not():
    def spread(parts):  # largest share of one task on one client, averaged over clients
        return sum(max(Counter(e.task for e in p).values()) / len(p) for p in parts) / len(parts)

    assert spread(partition(EXAMPLES, 4, "skew", alpha=0.1)) > spread(partition(EXAMPLES, 4, "iid")) + 0.2


def test_too_few_examples():
    with pytest.raises(ConfigError, match="cannot be split"):
        partition(EXAMPLES[:2], 3)


def test_task_split_refuses_a_client_without_examples(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The module's contract: every client gets at least one example. Was: with more clients than tasks, a task with
    fewer examples than the clients sharing it left one client empty; the up-front check passed and that client
    failed in every round ("TrainConfig.batch_size must be a positive integer, got 0")."""
    import json

    import lorakit.federated.simulate
    from lorakit.cli import main
    from lorakit.data import Example

    few = [Example(f"b{i} =>", " x", task="b") for i in range(1)] + [Example(f"a{i} =>", " y", task="a")
                                                                   for i in range(9)]
    with pytest.raises(ConfigError, match=r"task 'b' has 1 training example\(s\) for the 2 clients \[1, 3\]"):
        partition(few, 4, "task")
    assert [len(p) for p in partition(few, 4, "iid")] == [3, 3, 2, 2]  # the other schemes can split it
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion, "task": e.task}) + "\n"
                            for e in few + few[1:]))  # the held-out last tenth is a's
    monkeypatch.setattr(lorakit.federated.simulate, "federate", lambda *a, **k: pytest.fail("the run started"))
    assert main(["federate", "--model", tiny_model_dir, "--data", str(data), "--clients", "4",
                 "--output", str(tmp_path / "o")]) == 2
    assert "task 'b' has 1 training example(s) for the 2 clients [1, 3]" in capsys.readouterr().err
