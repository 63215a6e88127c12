"""Under torchrun: each rank stops with TrainingInterrupted inside ``lorakit.cli.ErrorsReported`` (as ``lorakit train``
does on Ctrl-C, which reaches every process) and writes what it printed on stderr to ``<out>/stderr-<RANK>.txt``."""

import contextlib
import io
import os
import sys
from pathlib import Path

from lorakit.cli import CommandParser, ErrorsReported
from lorakit.training import TrainingInterrupted

out = Path(sys.argv[1])
captured = io.StringIO()
with contextlib.redirect_stderr(captured):
    with ErrorsReported(CommandParser(prog="lorakit train"),
                        resume=lambda ckpt: f"lorakit train --resume-from {ckpt}") as run:
        raise TrainingInterrupted(3, 10, str(out / "checkpoint-3"))
assert run.status == 130, run.status
(out / f"stderr-{os.environ['RANK']}.txt").write_text(captured.getvalue())
