"""``lorakit bench``'s command line: lorakit's own errors raised during a run, and wrong ``--only`` names, read as
``lorakit bench: error: ...`` (no traceback), as every other command's errors do."""

from __future__ import annotations

import pytest

from lorakit.cli import ErrorsReported, main
from lorakit.cli_parser import CommandParser


def test_a_config_error_inside_a_bench_is_the_commands_error(tmp_path, capsys):
    """Was: `bench federated --clients 0` printed a traceback ending in FederatedConfig's ConfigError."""
    assert main(["bench", "federated", "--quick", "--clients", "0", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "lorakit bench: error: --clients must be >= 1, got 0\n", err
    assert not (tmp_path / "federated.json").exists()


def test_errors_reported_maps_lorakit_errors_and_lets_others_through(capsys):
    from lorakit.core.errors import ConfigError
    from lorakit.training import AdapterSaveError

    parser = CommandParser(prog="lorakit bench")
    parser.add_argument("--steps", type=int)
    with ErrorsReported(parser) as run:
        raise ConfigError("{field} must be > 0, got 0", field="steps")
    assert run.status == 2 and capsys.readouterr().err == "lorakit bench: error: --steps must be > 0, got 0\n"
    with ErrorsReported(parser) as run:
        raise AdapterSaveError("cannot write out/adapter (disk full); saved to /tmp/rescue", "/tmp/rescue")
    assert run.status == 1 and "lorakit bench: error: cannot write" in capsys.readouterr().err
    with ErrorsReported(parser) as run:
        run.status = 0
    assert run.status == 0
    with pytest.raises(RuntimeError, match="a bug"), ErrorsReported(parser):  # not lorakit's: its traceback shows
        raise RuntimeError("a bug")
    with pytest.raises(ValueError), ErrorsReported(parser):  # only where a command asks (also=...)
        raise ValueError("not lorakit's")
