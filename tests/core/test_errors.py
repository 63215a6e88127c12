"""lorakit's errors survive pickle (a worker process's error sent back, copy.deepcopy) with their message and
attributes, whatever their constructor takes."""

from __future__ import annotations

import copy
import pickle

import pytest

from lorakit.core.errors import AdapterError, ConfigError, LorakitError, UnknownMethodError
from lorakit.training import AdapterSaveError, TrainingInterrupted


def _round_trip(error: BaseException) -> BaseException:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and back.args == error.args and str(back) == str(error)
    return back


def test_training_interrupted_round_trips_with_its_attributes():
    """Was: pickle.loads raised TypeError (__init__() missing 2 required positional arguments)."""
    error = TrainingInterrupted(3, 10, "/runs/a/checkpoint-3")
    back = _round_trip(error)
    assert (back.step, back.total_steps, back.checkpoint) == (3, 10, "/runs/a/checkpoint-3")
    assert str(back) == "interrupted at step 3 of 10; checkpoint saved to /runs/a/checkpoint-3"
    deep = copy.deepcopy(error)
    assert (deep.step, deep.checkpoint) == (3, "/runs/a/checkpoint-3")


def test_adapter_save_error_round_trips_with_its_rescue_dir():
    back = _round_trip(AdapterSaveError("cannot write /out (disk full); the adapter is in /tmp/rescue", "/tmp/rescue"))
    assert back.rescue_dir == "/tmp/rescue"
    assert _round_trip(AdapterSaveError("cannot write /out", None)).rescue_dir is None


@pytest.mark.parametrize("error", [
    ConfigError("{field} must be > 0, got 0", field="LoraConfig.r"),
    ConfigError("plain message"),
    AdapterError("no adapter named 'b'"),
    UnknownMethodError("unknown method 'lroa'. Did you mean: lora?"),
    LorakitError("two", "args"),
], ids=lambda e: type(e).__name__)
def test_other_errors_round_trip_with_their_field(error):
    back = _round_trip(error)
    assert back.field == error.field
    if error.field is not None:  # the text still words the field, for a CLI to give it its flag
        assert back.worded("--r") == "--r must be > 0, got 0" and str(back) == "LoraConfig.r must be > 0, got 0"


def test_a_pickled_error_is_still_caught_as_its_bases():
    back = pickle.loads(pickle.dumps(UnknownMethodError("unknown method 'x'")))
    with pytest.raises(KeyError):
        raise back


def test_near_matches_ignore_case():
    """Was: `--method TIES` listed no near match (difflib scores 'TIES' against 'ties' 0)."""
    from lorakit.compose.methods import get_merge_method
    from lorakit.core.errors import ConfigError, near_matches

    assert near_matches("TIES", ["ties", "dare_ties", "linear"])[0] == "ties"
    assert set(near_matches("DARE", ["dare_ties", "dare_linear", "sce"])) == {"dare_ties", "dare_linear"}
    with pytest.raises(ConfigError, match="Did you mean: ties"):
        get_merge_method("TIES")


def test_near_matches_keep_candidates_that_differ_only_in_case():
    """Candidates equal but for case (state-dict keys, label names) are all listed, the one written like ``name``
    first (was: only the first in sorted order, so 'lm_heads' suggested 'LM_HEAD' and never 'lm_head')."""
    from lorakit.core.errors import near_matches

    assert near_matches("lm_heads", ["lm_head", "LM_HEAD"]) == ["lm_head", "LM_HEAD"]
    assert near_matches("Pos", ["POS", "pos", "neg"]) == ["pos", "POS"]
    assert near_matches("TIES", ["ties", "dare_ties"]) == ["ties", "dare_ties"]


def test_did_you_mean_path_is_cheap_and_never_raises(tmp_path, monkeypatch):
    """The hint decorates an error, so it must not raise one of its own (was: OSError "File name too long" for a long
    component) nor take seconds: difflib over every entry of a folder of 100k runs took ~20 s, so a folder of more
    than PATH_HINT_ENTRIES entries gets no hint (capped here to keep the test small)."""
    from lorakit.core import errors

    for name in ("rotate", "reverse", "sort"):
        (tmp_path / name).mkdir()
    assert errors.did_you_mean_path(tmp_path / "rotat" / "adapter") == \
        f" Did you mean: {tmp_path / 'rotate' / 'adapter'}?"
    assert errors.did_you_mean_path(tmp_path / ("x" * 300) / "adapter") == ""
    assert errors.did_you_mean_path(tmp_path / "sort" / "x" / "y") == ""  # nothing near "x" in an empty folder
    monkeypatch.setattr(errors, "PATH_HINT_ENTRIES", 2)
    assert errors.did_you_mean_path(tmp_path / "rotat" / "adapter") == ""
