"""The diffusion commands check their outputs as the main CLI does (``lorakit.cli_parser.check_output_dir``): a
taken output fails before any work without --overwrite, an output folder holding an input is refused, a file in
the way is named, and outputs are written atomically."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("diffusers")

from lorakit.cli import main  # noqa: E402
from lorakit.cli_parser import check_output_file  # noqa: E402
from lorakit.core.errors import LorakitError  # noqa: E402
from lorakit.diffusion import TrainSpec, UNetSpec, train_base  # noqa: E402

TINY = UNetSpec(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "base"
    train_base(out, TINY, TrainSpec(steps=1, batch_size=2), log_every=0)
    return out


def test_compose_image_refuses_a_taken_out_before_loading(tmp_path, capsys):
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"old")
    args = ["compose-image", "--base", str(tmp_path / "nope"), "--lora", str(tmp_path / "l"), "--out", str(grid)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--out {grid} already exists; pass --overwrite" in err and "train-base" not in err  # before the base
    assert grid.read_bytes() == b"old"
    assert main(args + ["--overwrite"]) == 2  # past the output check, on to the missing base
    assert "train-base" in capsys.readouterr().err
    assert main(["compose-image", "--base", str(tmp_path / "nope"), "--lora", "l", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is an existing folder; give a file path" in capsys.readouterr().err


def test_check_output_file_names_a_file_in_the_way_and_an_unwritable_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(LorakitError, match="is a file, so the file cannot be created"):
        check_output_file(tmp_path / "f" / "grid.png", "--out", overwrite=True)
    assert check_output_file(tmp_path / "new" / "grid.png", "--out", overwrite=False) == tmp_path / "new" / "grid.png"
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(LorakitError, match="cannot write in"):
            check_output_file(ro / "grid.png", "--out", overwrite=True)


def test_train_base_and_classifier_refuse_a_non_empty_out_and_a_file(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    for cmd in (["diffusion", "train-base"], ["diffusion", "train-classifier"]):
        assert main([*cmd, "--out", str(taken), "--steps", "1"]) == 2, cmd
        assert f"--out {taken} already exists and is not empty; pass --overwrite" in capsys.readouterr().err
        assert main([*cmd, "--out", str(taken / "keep.txt"), "--steps", "1"]) == 2, cmd
        assert "is an existing file; give a folder path" in capsys.readouterr().err
    assert (taken / "keep.txt").read_text() == "mine"
    assert main(["diffusion", "bench", "--run-dir", str(tmp_path), "--out", str(taken / "keep.txt")]) == 2
    assert "is an existing file; give a folder path" in capsys.readouterr().err


def test_train_loras_out_holding_its_base_is_refused(base, capsys):
    run = base.parent
    assert main(["diffusion", "train-loras", "--base", str(base), "--out", str(run), "--overwrite",
                 "--concepts", "digit3", "--steps", "1"]) == 2
    assert f"--out {run} holds the input {base}" in capsys.readouterr().err
    assert (base / "base.json").is_file()


def test_train_loras_overwrite_replaces_the_folder_whole(base, tmp_path, capsys):
    out = tmp_path / "loras"
    (out / "stale").mkdir(parents=True)
    (out / "stale" / "adapter_config.json").write_text("{}")
    args = ["diffusion", "train-loras", "--base", str(base), "--out", str(out), "--concepts", "digit3", "thick",
            "--steps", "1", "--batch-size", "1"]
    assert main(args) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["digit3", "loras.json", "thick"]  # no stale LoRA beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loras"]  # no temp folder left
