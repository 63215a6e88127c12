"""What a federated run leaves in its output folder: no stale adapter of an older run (``--overwrite``), and the
deployment ServerApp's run-config ``output`` checked as ``lorakit federate --output`` is."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")


def test_a_flora_run_without_an_accepted_round_removes_an_older_adapter(tiny_config, tmp_path):
    """Was: the older run's adapter/ stayed beside a federated.json saying "adapter": None."""
    from lorakit.federated.server import ServerCore

    old = tmp_path / "adapter"
    old.mkdir()
    (old / "adapter_config.json").write_text("{}")
    core = ServerCore(tiny_config("flora", evaluate=False))
    core.receive(1, [(0, b"not safetensors", {"num-examples": 8})], sent=1)  # rejected: nothing merged
    assert core.history[-1]["accepted"] == 0
    assert core.save_adapter(old) is None
    assert not old.exists() and list(tmp_path.iterdir()) == []  # removed whole, no temporary folder left


def _context(run_config):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_the_deployment_server_app_checks_its_output_folder(tmp_path):
    """Was: `output` in the run config was written into whatever was there. Now as `lorakit federate --output`:
    a non-empty folder needs `overwrite = true` (or `resume = true`), a file in the way is refused, before any round."""
    from lorakit.core.errors import LorakitError
    from lorakit.federated.apps import config_from_run_config, make_server_app

    used = tmp_path / "used"
    used.mkdir()
    (used / "federated.json").write_text("{}")
    app = make_server_app()
    with pytest.raises(LorakitError, match=r"output \(Flower run config\) .*used already exists and is not empty; "
                                           r"pass --overwrite"):
        app(None, _context({"output": str(used), "clients": 2}))  # refused before the grid is touched
    (tmp_path / "file").write_text("x")
    with pytest.raises(LorakitError, match="is an existing file"):
        app(None, _context({"output": str(tmp_path / "file")}))
    with pytest.raises(LorakitError, match="no federated checkpoint"):  # resume = true: it continues the run there
        app(None, _context({"output": str(used), "resume": True, "clients": 2, "rounds": 2}))
    # the three keys say where and how the ServerApp writes; they are not run settings
    assert config_from_run_config({"output": "x", "overwrite": True, "resume": False, "clients": 2}).clients == 2


def test_a_fresh_run_clears_an_older_runs_results_before_its_first_round(tiny_config, tmp_path):
    """--overwrite: an older run's federated.json, adapter/ and checkpoint/ go before round 1, so a stopped run never
    leaves a mix of two runs; a bad setting fails before anything is removed."""
    from lorakit.core.errors import LorakitError
    from lorakit.federated.apps import make_server_app

    for sub in ("adapter", "checkpoint"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.json").write_text("{}")
    (tmp_path / "federated.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LorakitError, match="nope-not-a-task"):
        make_server_app(output=tmp_path)(None, _context({"clients": 2, "data": "nope-not-a-task"}))
    assert len(list(tmp_path.iterdir())) == 4
    app = make_server_app(tiny_config("fedit", evaluate=False), output=tmp_path)
    with pytest.raises(AttributeError, match="NoneType"):  # no Flower grid here: the run stops at round 1
        app(None, _context({}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
