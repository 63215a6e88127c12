"""Benchmarks: the method leaderboard (``bench methods``) and lorakit-vs-PEFT performance (``bench perf``)."""

from __future__ import annotations

import io
from pathlib import Path


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Save a matplotlib figure atomically (rendered in memory, then written to a temp file and renamed), so a run
    stopped while plotting never leaves a truncated image; the format is the suffix's (``.png``)."""
    from ..io.files import atomic_write_bytes

    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return path
