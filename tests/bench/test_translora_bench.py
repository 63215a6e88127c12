"""The Trans-LoRA benchmark's graded metric (letter accuracy, a companion to exact match)."""

import pytest

from lorakit.bench.translora import letter_accuracy


@pytest.mark.parametrize("prediction, reference, expected", [
    (" b c a", " b c a", 1.0),
    (" b c x", " b c a", 2 / 3),
    (" b c", " b c a", 2 / 3),          # a missing symbol counts as wrong
    (" b c a d", " b c a", 3 / 4),      # an extra one too
    (" c a b", " b c a", 0.0),          # positions matter
    ("", " b", 0.0),
    ("", "", 0.0),
])
def test_letter_accuracy(prediction, reference, expected):
    assert letter_accuracy(prediction, reference) == pytest.approx(expected)
