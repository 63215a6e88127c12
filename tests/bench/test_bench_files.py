"""What ``lorakit bench`` writes into --output: plots and partial results replace the old file whole or not at all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lorakit.bench


def _figure_that_fails_while_drawing():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.artist import Artist

    class Interrupted(Artist):  # Ctrl-C arriving while matplotlib renders the figure
        def draw(self, renderer):
            raise KeyboardInterrupt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fig.add_artist(Interrupted())
    return fig


def test_an_interrupted_plot_leaves_the_previous_plot_whole(tmp_path):
    """A plot stopped mid-save leaves the previous file as it was and no temporary beside it (matplotlib's own
    ``savefig(path)`` draws first, then truncates and writes ``path`` in place: a stop in that write left a torn
    image, which the source scan below keeps out of the bench modules)."""
    import matplotlib.pyplot as plt

    from lorakit.bench import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = save_figure(fig, tmp_path / "merge.png", dpi=50)
    plt.close(fig)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")
    fig = _figure_that_fails_while_drawing()
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, path, dpi=50)
    plt.close(fig)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["merge.png"]  # no temporary left beside it


def test_bench_modules_write_plots_and_partial_results_atomically():
    """Every figure of ``lorakit bench`` goes through ``save_figure``; no bench module writes a result with
    ``Path.write_text`` (bench merge's merge.partial.json was one)."""
    root = Path(lorakit.bench.__file__).parent
    direct = []
    for file in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                if (name == "savefig" and file.name != "__init__.py") or name == "write_text":
                    direct.append(f"{file.name}:{node.lineno} {name}")
    assert direct == [], direct
