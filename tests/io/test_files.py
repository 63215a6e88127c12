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


# -- a save killed mid-write ---------------------------------------------------------------------------------
def _killed_in(code: str, tmp_path) -> None:
    """Run ``code`` in a Python process that SIGKILLs itself at its first fsync (a temp file then exists, written
    but not renamed): what a save killed between its writes leaves on disk, with no cleanup run. The process is
    forked from one that has imported lorakit (``lk_forked``)."""
    import signal

    from lk_forked import run_code

    script = ("import os, signal\nos.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n" + code)
    status, err = run_code(script, tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert status == -signal.SIGKILL, err


def test_a_save_killed_mid_write_leaves_temps_the_next_save_removes_and_loads_ignore(tmp_path):
    import lorakit as lk
    import torch
    from lk_models import tiny_llama

    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    folder = tmp_path / "adapter"
    lk.save_adapter(model, folder)
    expected = sorted(p.name for p in folder.iterdir())
    # the same save again, killed after its first temp file is written (a real save: write_adapter_files)
    _killed_in("from lorakit.io.files import load_tensors, read_json\n"
               "from lorakit.io.peft_format import write_adapter_files\n"
               "write_adapter_files('adapter', load_tensors('adapter/adapter_model.safetensors'), "
               "read_json('adapter/adapter_config.json'))\n", tmp_path)
    stale = sorted(set(p.name for p in folder.iterdir()) - set(expected))
    assert stale and all(files.is_temp_name(n) and n.endswith(".tmp") for n in stale), stale
    fresh = lk.load_adapter(tiny_llama(), folder)  # the old set, whole; the temp file is not read
    torch.testing.assert_close(lk.adapter_state_dict(fresh), lk.adapter_state_dict(model))

    lk.save_adapter(model, folder)  # the next successful save removes what the killed one left
    assert sorted(p.name for p in folder.iterdir()) == expected


def test_a_folder_save_killed_mid_write_is_not_served_and_the_next_save_removes_it(tmp_path):
    import shutil

    from lorakit.serving.store import adapter_folders

    root = tmp_path / "adapters"
    (root / "a").mkdir(parents=True)
    (root / "a" / "adapter_config.json").write_text("{}")
    (root / "a" / "adapter_model.safetensors").write_bytes(b"x")
    # saving folder b: its files are in the temp folder, the process is killed before the rename
    _killed_in("import shutil\nfrom lorakit.io.files import write_dir_atomically, atomic_write_bytes\n"
               "def write(tmp):\n"
               "    shutil.copy('adapters/a/adapter_config.json', tmp / 'adapter_config.json')\n"
               "    atomic_write_bytes(tmp / 'adapter_model.safetensors', b'y')\n"
               "write_dir_atomically('adapters/b', write)\n", tmp_path)
    left = [p.name for p in root.iterdir() if p.name != "a"]
    assert len(left) == 1 and left[0].startswith(".b.tmp-") and files.is_temp_name(left[0])
    assert [d.name for d in adapter_folders(root)] == ["a"]  # the half-saved folder holds a config but is no adapter

    files.write_dir_atomically(root / "b", lambda tmp: shutil.copy(root / "a" / "adapter_config.json", tmp))
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]
    assert [d.name for d in adapter_folders(root)] == ["a", "b"]


def test_a_save_in_progress_keeps_its_temp_file_from_another_saves_cleanup(tmp_path, monkeypatch):
    """The cleanup removes only unlocked temps: a concurrent save of the same file (its temp locked while it
    writes) is left alone, and both saves complete."""
    target = tmp_path / "x.json"
    seen: list[list[str]] = []
    real_fsync = os.fsync

    def fsync_then_save_again(fd):
        real_fsync(fd)
        if not seen:  # inside the first save, its temp written and locked: a second save of the same file runs
            seen.append(sorted(p.name for p in tmp_path.iterdir()))
            files.atomic_write_bytes(target, b"second")
            seen.append(sorted(p.name for p in tmp_path.iterdir()))

    monkeypatch.setattr(os, "fsync", fsync_then_save_again)
    files.atomic_write_bytes(target, b"first")
    assert len(seen[0]) == 1 and files.is_temp_name(seen[0][0])
    assert seen[1] == sorted([seen[0][0], "x.json"])  # the second save kept the first one's temp
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_a_temp_locked_by_another_process_is_kept_until_that_process_ends(tmp_path):
    """The lock is a cross-process one (filelock's ``lock_descriptor``): a temp that another live process holds is
    not removed by this one's cleanup, and is once that process has exited."""
    import subprocess
    import sys

    temp = tmp_path / ".x.json.abcd1234.tmp"
    temp.write_bytes(b"being written")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys\nfrom filelock import lock_descriptor\n"
         f"fd = os.open({str(temp)!r}, os.O_RDWR)\nlock_descriptor(fd)\nprint('locked', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert files.remove_stale_temps(tmp_path / "x.json") == [] and temp.exists()
    finally:
        holder.communicate("", timeout=60)
    assert files.remove_stale_temps(tmp_path / "x.json") == [temp] and not temp.exists()


# -- the Windows path (run here with files._WINDOWS set: the same calls, the way Windows needs them) ------------
def test_windows_path_a_concurrent_save_keeps_the_running_ones_temp_and_both_complete(tmp_path, monkeypatch):
    """On Windows each temp file is closed just before its rename (Windows renames no open file); until then it
    is locked, and a second save's cleanup keeps it."""
    monkeypatch.setattr(files, "_WINDOWS", True)
    target = tmp_path / "x.json"
    seen: list[list[str]] = []
    real_fsync = os.fsync

    def fsync_then_save_again(fd):
        real_fsync(fd)
        if not seen:
            seen.append(sorted(p.name for p in tmp_path.iterdir()))
            files.atomic_write_files({target: b"second", tmp_path / "y.json": b"y"})

    monkeypatch.setattr(os, "fsync", fsync_then_save_again)
    files.atomic_write_bytes(target, b"first")
    assert len(seen[0]) == 1 and files.is_temp_name(seen[0][0])
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "y.json"]


def test_windows_path_a_folder_being_written_is_locked_through_a_file_beside_it(tmp_path, monkeypatch):
    """On Windows a folder cannot be opened as a descriptor: the running folder save locks ``.<name>.tmp-*.lock``
    beside it. Another save of the same folder meanwhile keeps both; a killed save's pair is removed by the next."""
    from lk_forked import run_code

    monkeypatch.setattr(files, "_WINDOWS", True)
    root = tmp_path / "adapters"
    inside: list[list[str]] = []

    def write(tmp):
        (tmp / "adapter_config.json").write_text("{}")
        if not inside:  # a second save of the same folder runs (and cleans up) while this one writes
            inside.append(sorted(p.name for p in root.iterdir()))
            files.write_dir_atomically(root / "b", lambda t: (t / "adapter_config.json").write_text('{"second": 1}'))
            inside.append(sorted(p.name for p in root.iterdir()))

    files.write_dir_atomically(root / "b", write)
    assert len(inside[0]) == 2 and inside[0][1] == inside[0][0] + ".lock"
    assert all(files.is_temp_name(n) for n in inside[0])
    assert inside[1] == sorted(inside[0] + ["b"])  # the second save kept the running one's folder and lock
    assert sorted(p.name for p in root.iterdir()) == ["b"] and (root / "b" / "adapter_config.json").read_text() == "{}"

    # killed mid-save (SIGKILL at its first fsync): the temp folder and its lock file stay
    script = ("import os, signal\nos.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
              "from lorakit.io import files\nfiles._WINDOWS = True\n"
              "files.write_dir_atomically('adapters/b', lambda t: files.atomic_write_bytes(t / 'w.bin', b'y'))\n")
    status, err = run_code(script, tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})  # forked: lk_forked
    assert status < 0, err
    left = sorted(p.name for p in root.iterdir() if p.name != "b")
    assert len(left) == 2 and left[1] == left[0] + ".lock" and all(files.is_temp_name(n) for n in left), left
    files.write_dir_atomically(root / "b", lambda t: (t / "adapter_config.json").write_text("{}"))
    assert sorted(p.name for p in root.iterdir()) == ["b"]


def test_lorakit_imports_without_the_posix_only_modules(tmp_path):
    """Windows has no ``fcntl`` and no ``resource``: the package, its training loop and its CLI import without them
    (a module set to None in sys.modules fails to import, as a missing one does)."""
    import subprocess
    import sys

    script = ("import sys\nsys.modules['fcntl'] = None\nsys.modules['resource'] = None\n"
              "import lorakit, lorakit.io.files, lorakit.training.loop, lorakit.cli, lorakit.bench.variants\n"
              "print('imported')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr[-2000:]
