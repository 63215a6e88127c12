"""The ``lorakit`` console command (pyproject ``[project.scripts]``), a module outside the ``lorakit`` package on
purpose: the script pip generates imports its entry point's module first, and any module of the package imports
the package, with torch and transformers (seconds). A Ctrl-C in that import (``lorakit --help``, pressed at once)
came out of the script as a KeyboardInterrupt traceback. Here the import and the command run inside one handler:
one line and status 130, as every lorakit command answers Ctrl-C. ``import lorakit`` itself is unchanged (a
program importing the library keeps Python's KeyboardInterrupt), and so is ``python -m lorakit``, whose package
import runs before any code of the package can catch it."""

import sys


def main() -> int:
    try:
        from lorakit.cli import main as run_command

        return run_command()
    except KeyboardInterrupt:  # while importing, or before a command's own handler took over
        print("\nlorakit: interrupted", file=sys.stderr)
        return 130
