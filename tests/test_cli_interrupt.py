"""Ctrl-C while the ``lorakit`` command is still importing (torch, transformers: seconds) is one line and status 130,
as during any command. Was: the console script's ``from lorakit.cli import main`` raised KeyboardInterrupt before
any lorakit handler existed, and Python printed its traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import lorakit

SRC = Path(lorakit.__file__).resolve().parents[1]
ROOT = SRC.parent

# A real SIGINT at a known point: an import finder (first on sys.meta_path) that says when `torch` is about to be
# imported and then waits; the signal interrupts that wait, inside `import lorakit`, as a Ctrl-C pressed while
# torch loads does. Then the console script pip generates for pyproject's [project.scripts] entry point.
SCRIPT = """\
import importlib.abc, sys, time

class Stall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("importing torch", flush=True)
            time.sleep(120)
        return None

sys.meta_path.insert(0, Stall())
from {module} import {function}
sys.exit({function}())
"""


def test_ctrl_c_while_the_command_imports_torch_is_one_line_and_status_130():
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["lorakit"]
    module, function = entry.split(":")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(module=module, function=function), "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    try:
        assert proc.stdout.readline() == "importing torch\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "Traceback" not in err and err.strip() == "lorakit: interrupted", err
    assert proc.returncode == 130 and out == ""
