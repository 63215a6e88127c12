"""How many CPU threads torch gets when a command is not told: one rule for every lorakit command."""
from __future__ import annotations

import os


def default_num_threads() -> int:
    """OMP_NUM_THREADS when set (a positive integer); else half the CPUs this process may use, 1 to 8.

    torch's default (every core) collapses when another job shares the machine (its threads spin waiting for
    each other: 20-50x slower); half the cores loses little on an idle machine and degrades gracefully.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores // 2, 8))


NUM_THREADS_HELP = "0: OMP_NUM_THREADS if set, else half the CPUs (1 to 8)"


def resolve_num_threads(num_threads: int | None) -> int:
    """The torch CPU thread count for a ``--num-threads`` flag or ``num_threads`` field: itself when >= 1, and
    :func:`default_num_threads` for 0 or None (one rule for every command). Raises ConfigError below 0."""
    from .errors import ConfigError

    if num_threads is not None and num_threads < 0:
        raise ConfigError(f"--num-threads must be >= 0 ({NUM_THREADS_HELP}), got {num_threads}")
    return num_threads or default_num_threads()
