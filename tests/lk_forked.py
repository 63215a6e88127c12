"""Child processes forked from a process that has imported lorakit once (a ``multiprocessing`` forkserver): each
child is a real process (its own pid, signals, exit status, SIGKILL), started without paying the imports again.

A test process cannot fork itself safely (it runs threads: servers, engines); the forkserver is a fresh interpreter
that only imports, so it forks cleanly. The console script and ``python -m lorakit`` are still started as
subprocesses by the tests about them (tests/test_cli.py::test_console_script_runs, tests/test_cli_new_user.py,
tests/serving/test_serving_server.py::test_cli_serve_starts_and_answers[eager])."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

# What the forkserver imports before it forks children: what `lorakit serve` imports before it loads a model.
PRELOAD = ["lk_forked", "lorakit", "lorakit.cli", "lorakit.hub", "lorakit.serving.server", "lorakit.serving.store",
           "lorakit.serving.engine", "fastapi", "uvicorn", "httpx", "transformers.models.llama.modeling_llama"]


def _child_setup(env: dict[str, str], stdout_path: str, stderr_path: str, cwd: str | None) -> None:
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)


def _run_cli(argv: list[str], env: dict[str, str], stdout_path: str, stderr_path: str) -> None:
    """The child of :meth:`Child.cli`: ``lorakit ARGV``; its exit code is the CLI's."""
    _child_setup(env, stdout_path, stderr_path, None)
    from lorakit.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _run_code(code: str, env: dict[str, str], stdout_path: str, stderr_path: str, cwd: str) -> None:
    """The child of :func:`run_code`: ``python -c CODE`` in ``cwd``."""
    _child_setup(env, stdout_path, stderr_path, cwd)
    exec(compile(code, "<forked>", "exec"), {"__name__": "__main__"})
    sys.stdout.flush()
    sys.stderr.flush()


class Child:
    """A started child with the parts of ``subprocess.Popen`` the tests use (poll, terminate, wait)."""

    def __init__(self, target, args: tuple):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)  # read when the forkserver starts (the session's first child)
        self.process = context.Process(target=target, args=args, daemon=True)
        self.process.start()

    @classmethod
    def cli(cls, argv: list[str], env: dict[str, str], stdout_path: str, stderr_path: str) -> "Child":
        """``lorakit ARGV`` with environment ``env``, its streams written to the given files."""
        return cls(_run_cli, (argv, env, stdout_path, stderr_path))

    def poll(self) -> int | None:
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise TimeoutError(f"child {self.process.pid} still running after {timeout} s")
        return self.process.exitcode


def run_code(code: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """``python -c CODE`` in ``cwd`` as a forked child, to its end: (exit status, stderr); a status below 0 is the
    signal that ended it, as ``subprocess`` gives it."""
    import tempfile

    fd, err = tempfile.mkstemp(suffix=".stderr")
    os.close(fd)
    try:
        child = Child(_run_code, (code, dict(os.environ if env is None else env), os.devnull, err, str(cwd)))
        status = child.wait(timeout)
        return status, Path(err).read_text()
    finally:
        os.unlink(err)
