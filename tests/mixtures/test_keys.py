"""mixtures.keys: routing keys (ids in sorted-name order, names, none) -> expert weights, and the mapping check."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.mixtures.keys import KeyTable, check_mapping


def test_a_mapping_resolves_ids_in_sorted_name_order_names_and_rows_without_a_key():
    table = KeyTable(2, {"b": 1, "a": [0.25, 0.75], "c": -1}, default=0, names=None)  # ids: a=0, b=1, c=2
    with lk.routing(keys=torch.tensor([0, 1, 2, -1])):
        got = table(4, "cpu")
    assert got.tolist() == [[0.25, 0.75], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    with lk.routing(keys=["b", None]):
        assert table(4, "cpu").tolist() == [[0.0, 1.0]] * 2 + [[1.0, 0.0]] * 2  # two beams per row
    assert table(2, "cpu").tolist() == [[1.0, 0.0]] * 2  # no routing context: every row is keyless
    with lk.routing(keys=torch.tensor([3])), pytest.raises(lk.AdapterError, match="id 3 is out of range"):
        table(1, "cpu")
    with lk.routing(keys=["d"]), pytest.raises(lk.AdapterError, match="'d' names no expert"):
        table(1, "cpu")


def test_without_a_mapping_key_j_is_expert_j():
    table = KeyTable(2, None, default=-1, names=["x", "y"])
    with lk.routing(keys=torch.tensor([1, 0, 5, -1])):
        assert table(4, "cpu").tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    with lk.routing(keys=["y"]):
        assert table(1, "cpu").tolist() == [[0.0, 1.0]]


def test_check_mapping_names_the_entry():
    check_mapping("C", "key_to_expert", {"a": -1, "b": 1, "c": [0.5, 0.5]}, 2)
    with pytest.raises(lk.ConfigError, match=r"C.key_to_expert\['b'\]=2"):
        check_mapping("C", "key_to_expert", {"b": 2}, 2)
    with pytest.raises(lk.ConfigError, match="a list of 2 weights"):
        check_mapping("C", "key_to_expert", {"b": [1.0]}, 2)


def test_ids_with_task_names_follow_those_names_not_the_mappings_order():
    # the training loop numbers the data's tasks (here a subset: b, c) and passes their names; id 0 used to read
    # as the mapping's first name (a), so task b trained a's expert and c trained b's
    table = KeyTable(3, {"a": 0, "b": 1, "c": 2}, default=-1, names=None)
    with lk.routing(keys=torch.tensor([0, 1, -1]), extras={"task_names": ["b", "c"]}):
        assert table(3, "cpu").tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    with lk.routing(keys=torch.tensor([0]), extras={"task_names": ["b", "z"]}), \
            pytest.raises(lk.AdapterError, match=r"\['z'\] of the data have no entry"):
        table(1, "cpu")
    with lk.routing(keys=torch.tensor([2]), extras={"task_names": ["b", "c"]}), \
            pytest.raises(lk.AdapterError, match="id 2 is out of range"):
        table(1, "cpu")
