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
