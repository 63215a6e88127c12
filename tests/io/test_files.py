"""lorakit.io.files.atomic_write_files: a set of files written together, all or none."""

import os

import pytest

from lorakit.io import files


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open descriptors through /proc")
def test_a_failure_while_writing_leaves_the_old_set_no_temp_file_and_no_open_descriptor(tmp_path, monkeypatch):
    config, tensors = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    files.atomic_write_files({config: b"old config", tensors: b"old tensors"})

    calls = []

    def failing_fchmod(fd, mode):  # the second file's temp file cannot take its mode
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("fchmod refused")
        return real_fchmod(fd, mode)

    real_fchmod = os.fchmod
    monkeypatch.setattr(files.os, "fchmod", failing_fchmod)
    before = _open_fds()
    with pytest.raises(OSError, match="fchmod refused"):
        files.atomic_write_files({config: b"new config", tensors: b"new tensors"})

    assert _open_fds() == before  # the failed temp file's descriptor was closed (it leaked before)
    assert config.read_bytes() == b"old config" and tensors.read_bytes() == b"old tensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_the_set_is_replaced_with_the_usual_file_mode(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "sub" / "b.bin"
    files.atomic_write_files({a: b"1", b: b"2"})
    assert (a.read_bytes(), b.read_bytes()) == (b"1", b"2")
    umask = files.current_umask()
    assert (a.stat().st_mode & 0o777) == (0o666 & ~umask)
