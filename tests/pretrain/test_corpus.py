"""The stdlib half of the pretraining corpus: which files, and a seeded, reproducible draw of chunks."""

import pytest

from lorakit.pretrain.corpus import stdlib_files, stdlib_texts


@pytest.fixture
def fake_stdlib(tmp_path):
    """A small stdlib-shaped tree: modules, a test package and site-packages that must be skipped."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "site-packages").mkdir()
    for i in range(6):
        (tmp_path / f"mod{i}.py").write_text("".join(f"x{i}_{j} = {j}  # é\n" for j in range(300)), encoding="utf-8")
    (tmp_path / "pkg" / "long.py").write_text("a = 1\n" + "b = '" + "z" * 500 + "'\n" + "c = 3", encoding="utf-8")
    (tmp_path / "test" / "test_mod.py").write_text("skipped = True\n")
    (tmp_path / "site-packages" / "third.py").write_text("skipped = True\n")
    (tmp_path / "test_top.py").write_text("skipped = True\n")
    return tmp_path


def test_files_skip_tests_and_third_party(fake_stdlib):
    names = [p.relative_to(fake_stdlib).as_posix() for p in stdlib_files(fake_stdlib)]
    assert names == ["mod0.py", "mod1.py", "mod2.py", "mod3.py", "mod4.py", "mod5.py", "pkg/long.py"]


def test_deterministic_and_a_larger_budget_extends_a_smaller(fake_stdlib):
    small = stdlib_texts(600, chunk_chars=128, seed=3, root=fake_stdlib)
    assert stdlib_texts(600, chunk_chars=128, seed=3, root=fake_stdlib) == small
    large = stdlib_texts(3000, chunk_chars=128, seed=3, root=fake_stdlib)
    assert large[: len(small)] == small and len(large) > len(small)
    assert stdlib_texts(600, chunk_chars=128, seed=4, root=fake_stdlib) != small
    everything = stdlib_texts(10**9, chunk_chars=128, seed=3, root=fake_stdlib)
    assert sorted(line for line in "\n".join(everything).split("\n") if line) == sorted(
        line for p in stdlib_files(fake_stdlib) for line in p.read_text(encoding="utf-8").split("\n") if line)
