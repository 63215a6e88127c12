"""Every registered procedure's options become ``lorakit train --procedure NAME`` flags (no clash with the
method's flags, e.g. GaLore's ``optim_target_modules`` beside LoRA's ``target_modules``)."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit.cli import main
from lorakit.training import list_procedures


@pytest.mark.parametrize("info", list_procedures(), ids=lambda p: p.name)
def test_procedure_options_are_cli_flags(info, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--procedure", info.name, "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(info.config_cls):
        assert "--" + f.name.replace("_", "-") in out, f.name
