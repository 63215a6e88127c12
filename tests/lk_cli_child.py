"""``lorakit ARGS`` in a child process forked from a process that has imported lorakit's CLI once (a
``multiprocessing`` forkserver): each child is a real process, started without paying the imports again.

A test process cannot fork itself safely (it runs threads: servers, engines); the forkserver is a fresh interpreter
that only imports, so it forks cleanly. The console script itself is tested as a subprocess elsewhere
(tests/serving/test_serving_server.py::test_cli_serve_starts_and_answers[eager], tests/test_cli.py)."""

from __future__ import annotations

import multiprocessing
import os
import sys

# What the forkserver imports before it forks children: everything `lorakit serve` imports before it loads a model.
PRELOAD = ["lk_cli_child", "lorakit.cli", "lorakit.hub", "lorakit.serving.server", "lorakit.serving.store",
           "lorakit.serving.engine", "fastapi", "uvicorn", "httpx", "transformers.models.llama.modeling_llama"]


def run_cli(argv: list[str], env: dict[str, str], stdout_path: str, stderr_path: str) -> None:
    """The child: the given environment and standard streams, then ``lorakit ARGV``; its exit code is the CLI's."""
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    from lorakit.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class Child:
    """A started ``lorakit`` child with the parts of ``subprocess.Popen`` the tests use (poll, terminate, wait)."""

    def __init__(self, argv: list[str], env: dict[str, str], stdout_path: str, stderr_path: str):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        self.process = context.Process(target=run_cli, args=(argv, env, stdout_path, stderr_path), daemon=True)
        self.process.start()

    def poll(self) -> int | None:
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise TimeoutError(f"lorakit child {self.process.pid} still running after {timeout} s")
        return self.process.exitcode
