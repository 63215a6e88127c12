"""RegMix (arXiv 2407.01492): the official mixture sampler, the regression + search, and real tiny proxies."""

import random

import numpy as np
import pytest

from lorakit.core.errors import ConfigError
from lorakit.pretrain import regmix
from lorakit.pretrain.regmix import MixtureSampling, RegMixConfig, sample_mixtures, search_mixture


def official_generate_weights_dirichlet(prior_dist, minimum_number, num_samples, temperature, min_strength,
                                        max_strength, sample_multiplier, maximum_usage, seed):
    """A transcription of sail-sg/regmix ``mixture_config/synthesize_mixture.py`` lines 7-8 (seeding) and
    116-186 (``generate_weights_dirichlet``) plus 253-267 (``sort_and_deduplicate``), printing removed."""
    random.seed(seed)
    np.random.seed(seed)
    final_samples = []
    number_bound = [[0.0, min(p * maximum_usage, 1.0)] for p in prior_dist]
    if temperature < 1.0:
        prior_dist = prior_dist ** temperature
        prior_dist = prior_dist / np.sum(prior_dist)
    for _ in range(num_samples * sample_multiplier):
        samples = []
        for strength in np.logspace(np.log10(min_strength), np.log10(max_strength), 15):
            samples.append(np.random.dirichlet(prior_dist * strength, 1))
        samples = random.choice(samples)
        ok = all(number_bound[j][0] <= samples[0][j] <= number_bound[j][1] for j in range(len(samples[0])))
        if not ok:
            continue
        samples = np.where(samples < minimum_number, 0.0, samples)
        samples = samples / np.sum(samples, axis=1).reshape(-1, 1)
        samples = np.round(samples / minimum_number) * minimum_number
        final_samples.append(samples[0])
    arr = np.array(final_samples)
    arr = arr[np.lexsort(arr.T)]
    dedup = [arr[0]]
    for row in arr[1:]:
        if np.sum(np.abs(row - dedup[-1])) > 1e-5:
            dedup.append(row)
    return np.stack(random.sample(dedup, num_samples), axis=0)


def test_sampler_equals_the_official_script():
    prior = np.array([0.45, 0.25, 0.05, 0.25])
    sampling = MixtureSampling(sample_multiplier=5, minimum=1e-3, seed=42)
    ours = sample_mixtures(prior, 12, sampling)
    official = official_generate_weights_dirichlet(prior, 1e-3, 12, 0.5, 0.1, 5.0, 5, 15, 42)
    np.testing.assert_allclose(ours, official)
    assert ours.shape == (12, 4)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=4 * 1e-3)  # rounding to multiples of `minimum`


def test_sampler_rejects_a_bad_prior_and_too_few_samples():
    with pytest.raises(ConfigError, match="positive domain shares"):
        sample_mixtures([0.5, 0.0, 0.5], 4)
    with pytest.raises(ConfigError, match="distinct mixtures"):
        sample_mixtures([0.5, 0.5], 50, MixtureSampling(sample_multiplier=1, minimum=0.5))


def test_regression_and_search_find_a_known_optimum():
    """Loss = ||w − w*||² on the simplex with w* = (0.5, 0.3, 0.2): LightGBM fit on sampled mixtures, then the
    top-k search, lands near w*, and held-out ranks correlate (the paper's claim, at toy scale)."""
    target = np.array([0.5, 0.3, 0.2])
    rng = np.random.RandomState(0)
    x = rng.dirichlet([1.0, 1.0, 1.0], 300)
    y = ((x - target) ** 2).sum(axis=1, keepdims=True)
    models = regmix.fit_regressors(x[:240], y[:240], x[240:], y[240:])
    rho = regmix.spearman(models[0].predict(x[240:]), y[240:, 0])
    assert rho > 0.9
    best = search_mixture(lambda s: regmix.predict_target(models, s, 0), [1 / 3] * 3, n_samples=20_000, top_k=64)
    assert best.sum() == pytest.approx(1.0)
    assert np.abs(best - target).max() < 0.08, best


def official_top_k_mixture(simulate, prior_dist) -> np.ndarray:
    """sail-sg/regmix ``regression_fitting/regression.ipynb`` (commit b004d3a), cell 16: ``np.random.seed(42)``,
    ``samples = np.random.dirichlet(prior_dist * 1, 100000)``; cell 18: ``k = 128``,
    ``top_k_samples = samples[np.argsort(simulation)[0:k]]``, ``optimal_data_mixture = np.mean(top_k_samples,
    axis=0)`` (``simulation`` is the fitted regressor's prediction on ``samples``, cell 17)."""
    np.random.seed(42)
    samples = np.random.dirichlet(np.asarray(prior_dist) * 1, 100000)
    simulation = simulate(samples)
    top_k_samples = samples[np.argsort(simulation)[0:128]]
    return np.mean(top_k_samples, axis=0)


def test_search_equals_the_official_notebook_on_its_pile_prior():
    """Spot check of the search step: the notebook's own 17-domain Pile prior (cell 16) and a fixed smooth
    predictor standing in for the regressor; our defaults (100,000 samples, top 128, seed 42) give its mixture."""
    prior = [0.11328527, 0.07960865, 0.00391349, 0.1853759, 0.05108136, 0.01596293, 0.10175077, 0.00370752,
             0.06652935, 0.00175077, 0.02708548, 0.23686921, 0.01184346, 0.00792997, 0.00803296, 0.03882595,
             0.04644696]
    direction = np.linspace(-1.0, 1.0, len(prior))
    predict = lambda s: (s - 0.06) ** 2 @ np.ones(len(prior)) + 0.3 * s @ direction  # noqa: E731
    state = np.random.get_state()
    try:
        expected = official_top_k_mixture(predict, prior)
    finally:
        np.random.set_state(state)
    np.testing.assert_allclose(search_mixture(predict, prior), expected, rtol=0, atol=1e-12)
    assert RegMixConfig().top_k == 128 and RegMixConfig().n_search == 100_000


def test_fit_and_search_summary():
    domains = ("code", "tasks")
    config = RegMixConfig(domains=domains, n_proxies=40, n_search=2000, top_k=16)
    rng = np.random.RandomState(1)
    records = []
    for index in range(40):
        w = rng.dirichlet([1.0, 1.0])
        losses = {"code": 5 - 2 * w[0] + 0.01 * rng.randn(), "tasks": 5 - 2 * w[1] ** 0.5 + 0.01 * rng.randn()}
        records.append({"index": index, "weights": dict(zip(domains, w.tolist())), "losses": losses})
    summary = regmix.fit_and_search(records, config, {"code": 0.6, "tasks": 0.4})
    assert summary["n_test"] == 10 and summary["n_train"] == 30  # every 4th index held out
    assert set(summary["mixtures"]) == {"regmix", "natural", "uniform"}
    assert sum(summary["mixture"].values()) == pytest.approx(1.0)
    assert summary["spearman_test"]["lightgbm"]["target"] > 0.5
    assert summary["predicted_target"]["regmix"] <= summary["predicted_target"]["natural"] + 1e-9


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="Did you mean: code"):
        RegMixConfig(domains=("cod", "tasks"))
    with pytest.raises(ConfigError, match="RegMix target 'taks'.*Did you mean: tasks"):
        RegMixConfig(domains=("code", "tasks"), target="taks")
    with pytest.raises(ConfigError, match="at least two domains"):
        RegMixConfig(domains=("code",))
    with pytest.raises(ConfigError, match="n_proxies must be > 0"):
        RegMixConfig(n_proxies=0)
    with pytest.raises(ConfigError, match="run `lorakit regmix --out"):
        regmix.load_regmix_mixture("/nonexistent/regmix")


def _resumable_sweep(tmp_path, saved_config):
    """A sweep folder as an earlier run left it: sweep.json with ``saved_config`` and three finished records."""
    import json

    config = RegMixConfig(domains=("code", "tasks"), n_proxies=8,
                          sampling=MixtureSampling(sample_multiplier=20, minimum=1e-2))
    natural = {"code": 0.6, "tasks": 0.4}
    mixtures = sample_mixtures([0.6, 0.4], config.n_proxies, config.sampling)
    records = [{"index": i, "split": "train", "weights": dict(zip(config.domains, mixtures[i].tolist())),
                "losses": {"code": 5.0, "tasks": 4.0}} for i in (0, 1, 3)]
    (tmp_path / "sweep.json").write_text(json.dumps({"config": saved_config, "natural": natural}))
    return config, natural, records, mixtures


def test_resume_accepts_the_same_sweep_saved_with_the_older_split_fields(tmp_path):
    """The 33-proxy sweep in benchmarks/regmix was saved as n_proxies=48 + n_test=16; resuming it as
    n_proxies=64, test_every=4 samples the same 64 mixtures (n·100 trials either way), so it must be accepted."""
    from dataclasses import asdict

    config = RegMixConfig(domains=("code", "tasks"), n_proxies=8,
                          sampling=MixtureSampling(sample_multiplier=20, minimum=1e-2))
    legacy = {k: v for k, v in asdict(config).items() if k != "test_every"}
    legacy.update(n_proxies=6, n_test=2, domains=list(config.domains))
    config, natural, records, mixtures = _resumable_sweep(tmp_path, legacy)
    regmix.check_resumable(tmp_path, config, natural, records, mixtures)  # no error


def test_resume_refuses_a_sweep_trained_differently(tmp_path):
    from dataclasses import asdict

    base = RegMixConfig(domains=("code", "tasks"), n_proxies=8,
                        sampling=MixtureSampling(sample_multiplier=20, minimum=1e-2))
    saved = {**asdict(base), "domains": ["code", "tasks"], "steps": 50, "lr": 1e-3}
    config, natural, records, mixtures = _resumable_sweep(tmp_path, saved)
    with pytest.raises(ConfigError, match=r"different config \(lr: 0.001 there, 0.003 now, steps: 50 there, 100 now"):
        regmix.check_resumable(tmp_path, config, natural, records, mixtures)

    saved = {**asdict(base), "domains": ["code", "tasks"]}
    config, natural, records, mixtures = _resumable_sweep(tmp_path, saved)
    with pytest.raises(ConfigError, match="natural shares changed"):
        regmix.check_resumable(tmp_path, config, {"code": 0.5, "tasks": 0.5}, records, mixtures)
    records[2]["weights"] = {"code": 0.5, "tasks": 0.5}
    with pytest.raises(ConfigError, match="Proxy 3 in .*proxies.jsonl was trained on"):
        regmix.check_resumable(tmp_path, config, natural, records, mixtures)
    other = sample_mixtures([0.6, 0.4], 9, config.sampling)  # another n_proxies samples other mixtures
    with pytest.raises(ConfigError, match="Proxy 0 .*another n_proxies"):
        regmix.check_resumable(tmp_path, config, natural, records[:1], other)


@pytest.mark.slow
def test_sweep_with_real_tiny_proxies(tmp_path):
    """Two domains, six real Llama proxies of a few thousand parameters: records are written, resumable, fit."""
    config = RegMixConfig(domains=("docs", "tasks"), n_proxies=6, test_every=3, domain_scale=0.003, vocab_size=300,
                          hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seq_len=16,
                          batch_size=4, steps=5, eval_blocks=4, n_search=500, top_k=8,
                          sampling=MixtureSampling(sample_multiplier=20, minimum=1e-2))
    records = regmix.run_sweep(config, tmp_path, log=lambda s: None)
    assert [r["index"] for r in records] == list(range(6))
    assert all(np.isfinite(list(r["losses"].values())).all() for r in records)
    assert regmix.run_sweep(config, tmp_path, log=lambda s: None) == records  # resumed: nothing retrained
    summary = regmix.fit_and_search(records, config, {"docs": 0.3, "tasks": 0.7})
    assert summary["n_train"] == 4 and summary["n_test"] == 2


def test_cli_dispatch_and_bad_flags(tmp_path, capsys):
    from lorakit.cli import main

    assert main(["regmix", "--out", str(tmp_path), "--domains", "code,dosc"]) == 2
    assert "Did you mean: docs" in capsys.readouterr().err
    assert main(["regmix", "--out", str(tmp_path), "--fit-only"]) == 2
    assert "no proxies" in capsys.readouterr().err
    assert main(["pretrain-base", "--out", str(tmp_path / "m"), "--mixture", "code=0.7,tasks=0.7"]) == 2
    assert "sum to 1.4" in capsys.readouterr().err


def _no_data(*args, **kwargs):
    raise AssertionError("the domains' data was built before the cheap checks")


def test_too_few_proxies_to_fit_are_refused_before_training(tmp_path, capsys):
    """``--n-proxies 2`` used to train both proxies and only then fail in the fit (it needs 4 not held out)."""
    from lorakit.cli import main

    with pytest.raises(ConfigError, match=r"n_proxies=2 with test_every=4 leaves 2 proxies .* at least 4: raise "
                                          r"n_proxies to 5"):
        RegMixConfig(n_proxies=2)
    with pytest.raises(ConfigError, match="leaves 0 proxies .* raise test_every"):
        RegMixConfig(n_proxies=8, test_every=1)
    assert RegMixConfig(n_proxies=5).n_proxies == 5  # index 3 held out, 4 to fit
    assert main(["regmix", "--out", str(tmp_path / "sweep"), "--n-proxies", "2"]) == 2
    assert "lorakit regmix: error: --n-proxies 2 with --test-every 4 leaves 2" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_a_resumed_folder_of_another_config_is_refused_before_the_data_is_built(tmp_path, monkeypatch, capsys):
    from dataclasses import asdict

    from lorakit.cli import main

    base = RegMixConfig(domains=("code", "tasks"), n_proxies=8,
                        sampling=MixtureSampling(sample_multiplier=20, minimum=1e-2))
    config, *_ = _resumable_sweep(tmp_path, {**asdict(base), "domains": ["code", "tasks"], "steps": 50})
    monkeypatch.setattr(regmix, "prepare_domain_data", _no_data)
    with pytest.raises(ConfigError, match=r"different config \(steps: 50 there, 100 now"):
        regmix.run_sweep(config, tmp_path)
    assert main(["regmix", "--out", str(tmp_path), "--domains", "code,tasks", "--n-proxies", "8"]) == 2
    assert "lorakit regmix: error: " in capsys.readouterr().err


def test_pretrain_base_reads_the_regmix_result_before_the_data(tmp_path, monkeypatch, capsys):
    from lorakit.cli import main
    from lorakit.pretrain import domains

    monkeypatch.setattr(domains, "prepare_domain_data", _no_data)
    assert main(["pretrain-base", "--out", str(tmp_path / "m"), "--mixture", "regmix", "--regmix-dir",
                 str(tmp_path / "none")]) == 2
    assert "lorakit pretrain-base: error: No RegMix result at" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("flags,says", [(["--lr", "nan"], "--lr must be > 0 and finite, got nan."),
                                        (["--domain-scale", "-1"], "--domain-scale must be > 0 and finite, got -1.0."),
                                        (["--domains", "code,docs,code"], "--domains names ['code'] more than once")])
def test_lr_scale_and_repeated_domains_are_refused_before_the_data_is_built(tmp_path, monkeypatch, capsys, flags,
                                                                          says):
    """--lr nan ended in AdamW's ValueError traceback, --domains code,code in a reshape RuntimeError after building
    the data (one regression column per domain: a repeat leaves one without rows), --domain-scale -1 in a message
    naming no flag."""
    from lorakit.cli import main

    monkeypatch.setattr(regmix, "prepare_domain_data", _no_data)
    assert main(["regmix", "--out", str(tmp_path / "out"), *flags]) == 2
    assert says in capsys.readouterr().err


def _write_records(path, records, tail=""):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_fit_only_names_a_missing_or_malformed_sweep_file(tmp_path, capsys):
    """Was: `regmix --fit-only` on a folder with proxies.jsonl but no sweep.json (a sweep killed before writing it, or
    files copied without it) ended in FileNotFoundError's traceback, and a bad proxies line in JSONDecodeError's."""
    import json
    from dataclasses import asdict

    from lorakit.cli import main

    config, natural, records, _ = _resumable_sweep(tmp_path, {})
    (tmp_path / "sweep.json").unlink()
    _write_records(tmp_path / "proxies.jsonl", records)
    assert main(["regmix", "--out", str(tmp_path), "--fit-only"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"no sweep.json in {tmp_path}" in err, err
    (tmp_path / "sweep.json").write_text('{"config": {}, "natu')
    assert main(["regmix", "--out", str(tmp_path), "--fit-only"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{tmp_path / 'sweep.json'} is not a readable sweep record" in err, err
    defaults = json.loads(json.dumps(asdict(RegMixConfig())))  # the sweep the command's default flags describe
    (tmp_path / "sweep.json").write_text(json.dumps({"config": defaults, "natural": natural}))
    domains = defaults["domains"]  # the records of such a sweep name each of its domains
    records = [{**r, "weights": {d: 1 / len(domains) for d in domains}, "losses": {d: 4.0 for d in domains}}
               for r in records]
    _write_records(tmp_path / "proxies.jsonl", records[:1] + ["not a record"] + records[1:])
    assert main(["regmix", "--out", str(tmp_path), "--fit-only"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{tmp_path / 'proxies.jsonl'}:2: not a proxy record" in err, err


def test_fit_only_names_the_line_and_domain_a_hand_edited_record_lacks(tmp_path, capsys):
    """Was: `regmix --fit-only` on a proxies.jsonl record without one of the domains ended in a KeyError."""
    import json
    from dataclasses import asdict

    from lorakit.cli import main

    config = RegMixConfig()  # what the command's default flags describe
    (tmp_path / "sweep.json").write_text(json.dumps({"config": json.loads(json.dumps(asdict(config))),
                                                     "natural": {d: 1 / len(config.domains) for d in config.domains}}))
    records = [{"index": i, "split": "train", "weights": {d: 1 / len(config.domains) for d in config.domains},
                "losses": {d: 4.0 + i for d in config.domains}} for i in range(3)]
    dropped = config.domains[-1]
    del records[1]["losses"][dropped]
    _write_records(tmp_path / "proxies.jsonl", records)
    assert main(["regmix", "--out", str(tmp_path), "--fit-only"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyError" not in err, err
    assert f"{tmp_path / 'proxies.jsonl'}:2: not a proxy record (no domain {dropped!r} in 'losses')" in err, err


def test_a_bad_proxy_line_is_named_with_what_to_do_before_the_data_is_built(tmp_path, monkeypatch, capsys):
    """A resumed sweep read proxies.jsonl with json.loads: a line cut off by a full disk, or edited by hand, ended
    in JSONDecodeError's traceback (after sweep.json was checked, before any message). It is a ConfigError naming
    the file and line, and what to do; a complete line that is not a record (no index / weights / losses) too."""
    from dataclasses import asdict

    base = RegMixConfig(domains=("code", "tasks"), n_proxies=8,
                        sampling=MixtureSampling(sample_multiplier=20, minimum=1e-2))
    config, natural, records, _ = _resumable_sweep(tmp_path, {**asdict(base), "domains": ["code", "tasks"]})
    path = tmp_path / "proxies.jsonl"
    _write_records(path, records, tail='{"index": 4, "split": "train", "weig')
    with pytest.raises(ConfigError, match=r"proxies.jsonl:4: not a proxy record .*delete that line"):
        regmix.read_proxies(path)
    _write_records(path, records, tail='{"index": 4}\n')
    with pytest.raises(ConfigError, match=r"proxies.jsonl:4: not a proxy record \(no 'weights'"):
        regmix.read_proxies(path)
    _write_records(path, records + [{"index": "x", "weights": {}, "losses": {}}])
    with pytest.raises(ConfigError, match=r"proxies.jsonl:4: not a proxy record \('index' is not"):
        regmix.read_proxies(path)
    _write_records(path, records, tail="\n")
    assert regmix.read_proxies(path) == records  # a blank line is no record
    _write_records(path, records, tail="{")
    monkeypatch.setattr(regmix, "prepare_domain_data", lambda *a, **k: _FakeData(natural))
    with pytest.raises(ConfigError, match="proxies.jsonl:4"):  # a resumed sweep reads it the same way
        regmix.run_sweep(config, tmp_path, log=lambda s: None)


class _FakeData:
    def __init__(self, natural):
        self._natural = natural

    def natural(self):
        return dict(self._natural)


def test_fit_only_refuses_flags_of_another_sweep(tmp_path, capsys):
    """Was: `regmix --fit-only` with the default --domains on a sweep of code,tasks ended in KeyError: 'docstrings'
    (the fit read the flags' domains from records that lack them). A sweep's settings are compared as a resumed
    sweep's are; the fit-only settings (--target, --top-k, --n-search, --test-every) may differ."""
    from dataclasses import asdict

    from lorakit.cli import main

    base = RegMixConfig(domains=("code", "tasks"), n_proxies=8,
                        sampling=MixtureSampling(sample_multiplier=20, minimum=1e-2))
    _, natural, records, _ = _resumable_sweep(tmp_path, {**asdict(base), "domains": ["code", "tasks"]})
    _write_records(tmp_path / "proxies.jsonl", records)
    assert main(["regmix", "--out", str(tmp_path), "--fit-only"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "holds a sweep made with a different config (domains: ['code', 'tasks'] " \
        "there, ['code', 'docstrings', 'docs', 'tasks'] now" in err, err


@pytest.mark.parametrize("text,says", [
    ('{"mixture": {"code": 0.5, "tas', "is not a RegMix result (Unterminated string"),  # cut off: was JSONDecodeError
    ('{"domains": ["code"]}', "has no 'mixture' object of domain -> weight numbers (got None)"),  # was KeyError
    ('{"mixture": {"code": "0.5", "tasks": 0.5}}', "has no 'mixture' object of domain -> weight numbers"),  # TypeError
    ('[0.5, 0.5]', "is not a RegMix result (not a JSON object)"),
])
def test_pretrain_base_names_a_damaged_regmix_json_before_the_data(tmp_path, monkeypatch, capsys, text, says):
    """`pretrain-base --mixture regmix --regmix-dir DIR` with a regmix.json that is cut off or edited ended in a
    JSONDecodeError / KeyError / TypeError traceback; now one line naming the file and how to rewrite it."""
    from lorakit.cli import main
    from lorakit.pretrain import domains

    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "regmix.json").write_text(text)
    monkeypatch.setattr(domains, "prepare_domain_data", _no_data)
    assert main(["pretrain-base", "--out", str(tmp_path / "m"), "--mixture", "regmix", "--regmix-dir",
                 str(tmp_path / "sweep")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"lorakit pretrain-base: error: {tmp_path / 'sweep' / 'regmix.json'} "), last
    assert says in last and "--fit-only" in last
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("flags,says", [
    (["--hidden-size", "30"], "--hidden-size (30) / num_heads (2) = 15 per head; rotary embeddings need an even"),
    (["--seq-len", "1"], "--seq-len must be >= 2"),  # was: NaN losses, then LightGBM's "Input y contains NaN"
    (["--vocab-size", "10"], "--vocab-size must be >= 300"),  # was: said only once the data was built (minutes)
])
def test_a_proxy_shape_that_cannot_train_is_refused_before_the_data_is_built(tmp_path, monkeypatch, capsys, flags,
                                                                           says):
    """The proxy's PretrainConfig was built only in train_proxy, after the domains' data and sweep.json (which
    then refused the corrected flags as another sweep's): an odd head width ended in transformers' RoPE ValueError
    traceback, --seq-len 1 in a LightGBM traceback on NaN losses."""
    from lorakit.cli import main

    monkeypatch.setattr(regmix, "prepare_domain_data", _no_data)
    assert main(["regmix", "--out", str(tmp_path / "out"), *flags]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pretrain_base_will_not_replace_the_regmix_sweep_it_reads(tmp_path, monkeypatch, capsys):
    """`pretrain-base --out runs/regmix --overwrite --mixture regmix --regmix-dir runs/regmix` replaced the sweep
    folder (proxies.jsonl: every proxy trained) with the new model; an --out above it deleted it too. Now refused
    before any work, the sweep untouched."""
    from lorakit.cli import main
    from lorakit.pretrain import domains

    sweep = tmp_path / "runs" / "regmix"
    sweep.mkdir(parents=True)
    files = {"regmix.json": '{"mixture": {"code": 0.5, "tasks": 0.5}}', "proxies.jsonl": "{}\n", "sweep.json": "{}"}
    for name, text in files.items():
        (sweep / name).write_text(text)
    monkeypatch.setattr(domains, "prepare_domain_data", _no_data)
    for out in (sweep, tmp_path / "runs"):
        assert main(["pretrain-base", "--out", str(out), "--overwrite", "--mixture", "regmix", "--regmix-dir",
                     str(sweep)]) == 2
        assert f"--out {out} holds the input {sweep / 'regmix.json'}" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in sweep.iterdir()} == files


def test_a_top_k_above_n_search_is_refused(capsys, tmp_path):
    """--top-k above --n-search averaged every candidate (argsort(...)[:top_k] took them all), so regmix.json held
    the mean of Dirichlet(natural) samples, about the natural mixture, whatever the regression predicted."""
    from lorakit.cli import main

    with pytest.raises(ConfigError, match="top_k=200 exceeds n_search=100"):
        RegMixConfig(top_k=200, n_search=100)
    RegMixConfig(top_k=100, n_search=100)  # equal: every candidate, asked for explicitly
    assert main(["regmix", "--out", str(tmp_path / "out"), "--top-k", "2000", "--n-search", "1000"]) == 2
    assert "--top-k 2000 exceeds --n-search 1000" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # ~30 s: a child process builds the sweep's data and trains its first proxy
def test_ctrl_c_keeps_the_finished_proxies_and_says_how_to_resume(tmp_path):
    """Ctrl-C in `lorakit regmix` printed a KeyboardInterrupt traceback; now exit 130 with the finished proxies
    counted (they stay in proxies.jsonl, which a rerun resumes from)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    flags = ["--n-proxies", "8", "--steps", "400", "--domain-scale", "0.01", "--eval-blocks", "4", "--n-search",
             "1000", "--top-k", "16", "--vocab-size", "400", "--batch-size", "4", "--seq-len", "32"]
    child = subprocess.Popen([sys.executable, "-m", "lorakit", "regmix", "--out", str(out), *flags],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    proxies = out / "proxies.jsonl"
    deadline = time.monotonic() + 240
    while not (proxies.exists() and proxies.stat().st_size) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    err = child.communicate(timeout=120)[1]
    assert child.returncode == 130 and "Traceback" not in err, err
    done = len(regmix.read_proxies(proxies))
    assert done >= 1
    assert err.strip().splitlines()[-1] == (
        f"lorakit regmix: interrupted; {done} finished prox{'y' if done == 1 else 'ies'} in {proxies} (the one in "
        "training is dropped): run the same command again to resume the sweep")


def test_a_resumed_sweep_whose_last_record_lacks_its_newline_keeps_every_record(tmp_path):
    """proxies.jsonl ending in a complete record without its newline (saved by an editor or a tool that strips it):
    the next proxy's record was appended to the same line, and the next read refused that line, which held two
    trained proxies ('delete that line'). Two real tiny proxies, one per shard."""
    config = RegMixConfig(domains=("docs", "tasks"), n_proxies=4, test_every=5, domain_scale=0.003, vocab_size=300,
                          hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seq_len=16,
                          batch_size=4, steps=2, eval_blocks=4, n_search=500, top_k=8,
                          sampling=MixtureSampling(sample_multiplier=20, minimum=1e-2))
    regmix.run_sweep(config, tmp_path, log=lambda s: None, shard=(0, 2))  # proxies 0 and 2
    path = tmp_path / "proxies.jsonl"
    path.write_text(path.read_text().rstrip("\n"))
    regmix.run_sweep(config, tmp_path, log=lambda s: None, shard=(1, 2))  # proxies 1 and 3, appended
    assert sorted(r["index"] for r in regmix.read_proxies(path)) == [0, 1, 2, 3]
