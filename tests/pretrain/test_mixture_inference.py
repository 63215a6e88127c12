"""Data mixture inference (arXiv 2407.16607): the merge replay, the LP, and bad input."""

import json

import pytest

from lorakit.core.errors import ConfigError
from lorakit.pretrain import mixture_inference as mi
from lorakit.pretrain.tokenizer import train_tokenizer

# Three small, clearly different real texts (stdlib-shipped): Python source, the pydoc reference, task examples.
CATEGORIES = ("code", "docs", "tasks")


@pytest.fixture(scope="module")
def texts():
    from lorakit.pretrain.domains import domain_documents

    docs = domain_documents(CATEGORIES, scale=0.004, seed=0)  # ~12k characters per category
    return {name: "\n".join(d) for name, d in docs.items()}


def _tokenizer_on(tmp_path, texts, repeats, vocab_size=600):
    corpus = [texts[name] for name in texts for _ in range(repeats[name])]
    tok = train_tokenizer(corpus, vocab_size)
    tok.save_pretrained(tmp_path)
    return mi.load_bpe(tmp_path)


def test_replay_counts_match_a_direct_count(tmp_path, texts):
    """After replaying t merges, every pair count equals a fresh count on the text tokenized with those merges
    (checked on the pair of the next merge, which BPE training picked as the most frequent: paper §3.1)."""
    bpe = _tokenizer_on(tmp_path, texts, {n: 1 for n in texts})
    counts = mi.count_pairs(list(texts.values()), bpe, 50)
    current = dict(counts.initial)
    for t in range(50):
        merge = bpe.merges[t]
        assert current.get(merge, 0) == max(current.values()), f"merge {t} {merge} was not the most frequent pair"
        for pair, d in counts.deltas[t].items():
            current[pair] = current.get(pair, 0) + d


def test_lp_recovers_the_exact_mixture_when_samples_are_the_training_text(tmp_path, texts):
    """Training data = code ×3 + docs ×1 + tasks ×2: the true byte shares are known exactly, and with the
    training text as the samples the LP's feasible set (zero slack) contains them (paper §3.2)."""
    repeats = {"code": 3, "docs": 1, "tasks": 2}
    bpe = _tokenizer_on(tmp_path, texts, repeats)
    result = mi.infer_from_texts(bpe, {n: [texts[n]] for n in texts}, n_merges=300)
    n_bytes = {n: len(texts[n].encode()) * repeats[n] for n in texts}
    truth = {n: b / sum(n_bytes.values()) for n, b in n_bytes.items()}
    err = mi.mixture_error(truth, result.byte_share)
    assert result.objective == pytest.approx(0.0, abs=1e-6)
    assert err["max_abs"] < 0.01, (truth, result.byte_share)


def test_more_merges_asked_than_the_tokenizer_has_is_said(tmp_path, texts):
    """--merges 100000 on a tokenizer with fewer merges: the replay uses all it has and a warning names both counts
    (was: silence)."""
    bpe = _tokenizer_on(tmp_path, texts, {n: 1 for n in texts}, vocab_size=300)
    have = len(bpe.merges)
    with pytest.warns(UserWarning, match=rf"n_merges \(--merges\) = 100000, but the tokenizer has only {have} merges"):
        result = mi.infer_from_texts(bpe, {n: [texts[n]] for n in texts}, n_merges=100000)
    assert result.n_merges == have


def test_lp_orders_mixtures(tmp_path, texts):
    """Swapping which category dominates the training data swaps the inferred order."""
    shares = []
    for k, repeats in enumerate(({"code": 4, "docs": 1, "tasks": 1}, {"code": 1, "docs": 1, "tasks": 4})):
        bpe = _tokenizer_on(tmp_path / str(k), texts, repeats)
        shares.append(mi.infer_from_texts(bpe, {n: [texts[n]] for n in texts}, n_merges=200).byte_share)
    assert shares[0]["code"] > 0.5 > shares[1]["code"]
    assert shares[1]["tasks"] > 0.5 > shares[0]["tasks"]


def test_bundled_tokenizer_loads():
    from lorakit.assets import BASE_MODEL_PATH

    bpe = mi.load_bpe(BASE_MODEL_PATH)
    assert len(bpe.merges) > 3000 and all(len(m) == 2 for m in bpe.merges[:10])
    assert bpe.pretokenize("x = 12") == ["x", "Ġ=", "Ġ", "1", "2"]  # digits split one per token, byte-level spaces


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="No tokenizer.json"):
        mi.load_bpe(tmp_path / "missing")
    wordpiece = tmp_path / "wp.json"
    wordpiece.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ConfigError, match="needs a BPE merge list"):
        mi.load_bpe(wordpiece)
    with pytest.raises(ConfigError, match="at least two categories"):
        mi.infer_mixture({"a": mi.PairCounts({}, [], 1, 1)}, [])
    with pytest.raises(ConfigError, match="NAME=FILE"):
        mi._read_category("code")
    with pytest.raises(ConfigError, match="not found"):
        mi._read_category(f"code={tmp_path / 'nope.txt'}")


def test_cli_reports_shares(tmp_path, texts, capsys):
    bpe_dir = tmp_path / "tok"
    _tokenizer_on(bpe_dir, texts, {n: 1 for n in texts}, vocab_size=400)
    args = ["--tokenizer", str(bpe_dir), "--merges", "100", "--out", str(tmp_path / "new" / "r.json")]  # parent made
    for name in texts:
        (tmp_path / f"{name}.txt").write_text(texts[name])
        args += ["--category", f"{name}={tmp_path / f'{name}.txt'}"]
    assert mi.main(args) == 0
    report = json.loads((tmp_path / "new" / "r.json").read_text())
    assert set(report["byte_share"]) == set(CATEGORIES)
    assert sum(report["byte_share"].values()) == pytest.approx(1.0)
    assert mi.main(["--tokenizer", str(bpe_dir), "--domains", "code,dosc"]) == 2
    assert "Did you mean: docs" in capsys.readouterr().err
    # more merges than the tokenizer has: said up front (replaying them all can take minutes), then all are used
    n = len(mi.load_bpe(bpe_dir).merges)
    assert mi.main([*args[:2], "--merges", str(n + 1000), *args[6:]]) == 0
    out = capsys.readouterr()
    assert f"--merges {n + 1000} is more than the {n} merges of" in out.err and f"using all {n}" in out.err
    assert json.loads(out.out)["n_merges"] <= n


def test_cli_refuses_a_repeated_category(tmp_path, capsys):
    """A repeated name used to keep only the last sample text and silently solve for one category fewer."""
    (tmp_path / "a.txt").write_text("def f(x):\n    return x\n")
    (tmp_path / "b.txt").write_text("The quick brown fox.\n")
    tok = ["--tokenizer", str(tmp_path / "unused")]  # the repeat is reported before the tokenizer is read
    assert mi.main(tok + ["--category", f"code={tmp_path / 'a.txt'}", "--category", f"prose={tmp_path / 'b.txt'}",
                          "--category", f"code={tmp_path / 'b.txt'}"]) == 2
    assert "Category name given more than once: 'code'." in capsys.readouterr().err
    assert mi.main(tok + ["--category", f"docs={tmp_path / 'a.txt'}", "--domains", "code,docs"]) == 2
    assert "Category name given more than once: 'docs'." in capsys.readouterr().err
    assert mi.main(tok + ["--domains", "tasks,code,tasks,code"]) == 2
    assert "Category name given more than once: 'code', 'tasks'." in capsys.readouterr().err


def test_lorakit_cli_dispatches(tmp_path, capsys):
    from lorakit.cli import main

    assert main(["infer-mixture", "--tokenizer", str(tmp_path / "none"), "--domains", "code,docs"]) == 2
    assert "No tokenizer.json" in capsys.readouterr().err


@pytest.mark.parametrize("content,says", [(b'{"a": 1}\n{"b": 2}\n', "not valid JSON"), (b"\x98\x00\x01", "not valid JSON"),
                                          (b"[1]", "no 'model' object")])
def test_lorakit_cli_names_a_file_that_is_no_tokenizer_json(content, says, tmp_path, capsys):
    """Was: a JSONDecodeError traceback, exit 1 (e.g. --tokenizer data.jsonl)."""
    from lorakit.cli import main

    bad = tmp_path / "data.jsonl"
    bad.write_bytes(content)
    assert main(["infer-mixture", "--tokenizer", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit infer-mixture: error: {bad} is not a tokenizer.json ({says}") and "Traceback" not in err


def test_cli_names_sample_chars_and_a_folder_as_out_before_any_work(tmp_path, capsys):
    """--sample-chars 0 failed as "Domain scale must be > 0, got 0.0" (no flag named); --out FOLDER failed only after
    the whole inference had run."""
    tok = ["--tokenizer", str(tmp_path / "unused")]  # both are reported before the tokenizer is read
    assert mi.main(tok + ["--domains", "code,docs", "--sample-chars", "0"]) == 2
    assert "--sample-chars must be > 0" in capsys.readouterr().err
    assert mi.main(tok + ["--domains", "code,docs", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err


def test_an_existing_out_file_is_replaced_only_with_overwrite_before_any_work(tmp_path, capsys):
    """Was: --out r.json silently replaced an earlier result (every other output asks for --overwrite)."""
    earlier = tmp_path / "r.json"
    earlier.write_text('{"byte_share": {"code": 1.0}}')
    tok = ["--tokenizer", str(tmp_path / "unused"), "--domains", "code,docs"]  # refused before the tokenizer is read
    assert mi.main(tok + ["--out", str(earlier)]) == 2
    err = capsys.readouterr().err
    assert f"--out {earlier} already exists; pass --overwrite to replace it" in err, err
    assert earlier.read_text() == '{"byte_share": {"code": 1.0}}'
    assert mi.main(tok + ["--out", str(earlier), "--overwrite"]) == 2  # now the missing tokenizer, not the file
    assert "No tokenizer.json" in capsys.readouterr().err


def _edited_tokenizer(edit) -> dict:
    from lorakit.assets import BASE_MODEL_PATH

    spec = json.loads((BASE_MODEL_PATH / "tokenizer.json").read_text())
    edit(spec["model"])
    return spec


@pytest.mark.parametrize("edit,says", [
    (lambda m: m.update(merges=[1, 2]), "is not a BPE tokenizer.json: merge 0 is 1, not a pair of tokens"),  # TypeError
    (lambda m: m.update(merges=["Ġt", *m["merges"][1:]]), "merge 0 is 'Ġt', not a pair of tokens"),  # ValueError
    (lambda m: m["merges"].insert(5, ["zz", "qq"]), "the tokenizers library can load (Token `zz` out of vocabulary"),  # library Exception
    (lambda m: m.pop("vocab"), "the tokenizers library can load (Missing vocab/merges"),
])
def test_a_damaged_merge_list_is_a_one_line_error(edit, says, tmp_path, capsys):
    """A tokenizer.json whose merges are not token pairs, or that the tokenizers library cannot load (a merge of
    tokens missing from the vocabulary, no vocab), ended in a TypeError / ValueError / bare Exception traceback."""
    from lorakit.cli import main

    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(_edited_tokenizer(edit)))
    (tmp_path / "a.txt").write_text("the cat sat on the mat")
    assert main(["infer-mixture", "--tokenizer", str(bad), "--category", f"a={tmp_path / 'a.txt'}",
                 "--category", f"b={tmp_path / 'a.txt'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"lorakit infer-mixture: error: {bad} ") and says in err, err


def test_cli_says_once_that_fewer_merges_exist(tmp_path, texts, capsys, recwarn):
    """--merges above the tokenizer's count was said twice: the CLI's own line, then a UserWarning with a source line."""
    from lorakit.cli import main

    bpe = _tokenizer_on(tmp_path, texts, {n: 1 for n in texts}, vocab_size=300)
    for name in texts:
        (tmp_path / f"{name}.txt").write_text(texts[name])
    assert main(["infer-mixture", "--tokenizer", str(tmp_path), "--merges", "100000",
                 *[f"--category={n}={tmp_path / f'{n}.txt'}" for n in texts]]) == 0
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"lorakit infer-mixture: --merges 100000 is more than the {len(bpe.merges)} "
                                        f"merges of {bpe.name}; using all {len(bpe.merges)}"]
    assert not [w for w in recwarn if "merges" in str(w.message)]
