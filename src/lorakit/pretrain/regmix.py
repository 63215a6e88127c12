"""RegMix: data mixture as regression (Liu et al., arXiv 2407.01492; official code github.com/sail-sg/regmix).

The recipe, scaled down to this machine:

1. Sample many domain mixtures around the natural token distribution (official
   ``mixture_config/synthesize_mixture.py``, ``generate_weights_dirichlet``): for each of ``n·100`` trials draw
   one Dirichlet sample at each of 15 log-spaced strengths ``s ∈ [0.1, 5]`` with concentration
   ``s · p^0.5 / Σ p^0.5`` (the prior ``p`` softened by temperature 0.5), pick one of the 15 at random, reject
   it when a weight exceeds ``min(15 · p_d, 1)`` (a domain may be repeated at most 15 times), zero weights
   below ``minimum``, renormalise, round to multiples of ``minimum``, deduplicate, and keep ``n`` at random.
2. Train one tiny proxy model per mixture (same tokenizer, same held-out validation blocks per domain) at a
   constant learning rate after warmup, as the official 1M proxies do; record the validation loss per domain.
3. Fit one LightGBM regressor per domain from mixture weights to loss with the official notebook's settings
   (``regression_fitting/regression.ipynb`` cell 13: gbdt, l1/l2, 1000 iterations, lr 1e-2, seed 42, early
   stopping after 3 rounds on the held-out proxies) and report Spearman's ρ on held-out proxies. One change:
   ``min_child_samples`` (LightGBM's default 20, sized for 512 proxies) scales with the number of proxies.
4. Search: predict the target loss for 100,000 mixtures drawn from ``Dirichlet(p)`` (cell 16, strength 1, no
   temperature) and return the mean of the ``top_k = 128`` with the lowest prediction (cell 18).

The paper's target is the Pile-CC validation loss; here the default target is the mean validation loss over
all domains (``target="mean"``), or one domain's loss when named. Deviation from the official notebook: it
early-stops on the same held-out proxies it then scores, which flatters ρ a little; we do the same so the
numbers are comparable, and also report a linear regression (the paper's baseline), which has no such step.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from lorakit.cli_parser import CommandParser, DefaultsFormatter, seed_arg
from lorakit.core.config import check_non_negative, check_positive, field_error
from lorakit.core.errors import ConfigError, LorakitError, comma_items, did_you_mean
from lorakit.io.files import atomic_write_json
from lorakit.pretrain.domains import (
    DOMAINS, DomainData, check_domain, prepare_domain_data, sample_mixture_blocks, uniform_weights,
)


@dataclass
class MixtureSampling:
    """The official sampler's constants (``synthesize_mixture.py`` lines 7-37); ``minimum`` is raised from
    2e-4 to 1e-3 because our proxies see ~1/5000 of the official proxies' tokens (its comment advises it)."""

    temperature: float = 0.5
    min_strength: float = 0.1
    max_strength: float = 5.0
    n_strengths: int = 15
    sample_multiplier: int = 100
    maximum_usage: float = 15.0
    minimum: float = 1e-3
    seed: int = 42


def sample_mixtures(prior: Sequence[float], n: int, sampling: MixtureSampling = MixtureSampling()) -> np.ndarray:
    """``n`` mixtures (n, D), each row on the simplex, drawn as the official ``generate_weights_dirichlet``.

    Uses ``numpy.random.RandomState(seed)`` and ``random.Random(seed)`` in the official call order, so the
    rows equal the official script's for the same prior and seed. Raises ``ConfigError`` when fewer than
    ``n`` distinct mixtures survive rejection.
    """
    prior = np.asarray(prior, dtype=np.float64)
    if prior.ndim != 1 or len(prior) < 2 or (prior <= 0).any():
        raise ConfigError(f"The prior must be >= 2 positive domain shares, got {prior.tolist()}.")
    prior = prior / prior.sum()
    np_rng, py_rng = np.random.RandomState(sampling.seed), random.Random(sampling.seed)
    upper = np.minimum(prior * sampling.maximum_usage, 1.0)  # bound from the prior before temperature
    if sampling.temperature < 1.0:
        prior = prior ** sampling.temperature
        prior = prior / prior.sum()
    strengths = np.logspace(np.log10(sampling.min_strength), np.log10(sampling.max_strength), sampling.n_strengths)
    kept = []
    for _ in range(n * sampling.sample_multiplier):
        if sampling.min_strength == sampling.max_strength:
            sample = np_rng.dirichlet(prior * sampling.min_strength, 1)
        else:
            sample = py_rng.choice([np_rng.dirichlet(prior * s, 1) for s in strengths])  # (1, D)
        if ((sample[0] < 0.0) | (sample[0] > upper)).any():
            continue
        sample = np.where(sample < sampling.minimum, 0.0, sample)
        sample = sample / sample.sum(axis=1, keepdims=True)
        kept.append(np.round(sample / sampling.minimum)[0] * sampling.minimum)
    unique = _deduplicate(np.array(kept)) if kept else []
    if len(unique) < n:
        raise ConfigError(f"Only {len(unique)} distinct mixtures survived sampling, fewer than the {n} asked; "
                          "raise MixtureSampling.sample_multiplier or lower n.")
    return np.stack(py_rng.sample(unique, n))


def _deduplicate(rows: np.ndarray, threshold: float = 1e-5) -> list[np.ndarray]:
    """Official ``sort_and_deduplicate``: lexsort, then drop a row within L1 ``threshold`` of the last kept."""
    rows = rows[np.lexsort(rows.T)]
    result = [rows[0]]
    for row in rows[1:]:
        if np.abs(row - result[-1]).sum() > threshold:
            result.append(row)
    return result


# ---------------------------------------------------------------- proxies

MIN_FIT_PROXIES = 4  # training proxies (not held out) the regression needs; fewer is refused before any training


@dataclass
class RegMixConfig:
    """The proxy sweep. Defaults: 64 proxies (48 to fit, every 4th held out), ~0.2M parameters, 100 steps of 1,024 tokens."""

    domains: tuple[str, ...] = tuple(DOMAINS)
    n_proxies: int = 64  # all proxies; every ``test_every``-th one is held out to score the regression
    test_every: int = 4
    domain_scale: float = 0.5
    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 172
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 100
    lr: float = 3e-3
    warmup_steps: int = 20
    eval_blocks: int = 64  # held-out validation blocks per domain, the same for every proxy
    target: str = "mean"
    top_k: int = 128
    n_search: int = 100_000
    seed: int = 0
    sampling: MixtureSampling = field(default_factory=MixtureSampling)

    def __post_init__(self) -> None:
        check_non_negative(self, "seed")  # numpy's and Python's seeding refuse a negative seed
        if isinstance(self.sampling, dict):
            self.sampling = MixtureSampling(**self.sampling)
        self.domains = tuple(check_domain(d) for d in self.domains)
        repeated = sorted({d for d in self.domains if self.domains.count(d) > 1})
        if repeated:  # one column per domain in the regression; a repeat left a domain with no data
            raise field_error(self, "domains", f" names {repeated} more than once; list each domain once.")
        if len(self.domains) < 2:
            raise ConfigError(f"RegMix needs at least two domains, got {list(self.domains)}.",
                              field="RegMixConfig.domains")
        for name in ("n_proxies", "test_every", "steps", "batch_size", "seq_len", "eval_blocks", "top_k", "n_search"):
            if getattr(self, name) <= 0:
                raise field_error(self, name, f" must be > 0, got {getattr(self, name)}.")
        if self.top_k > self.n_search:  # argsort(...)[:top_k] took all: the mean of every sample, not the best ones
            raise field_error(self, "top_k", f"={self.top_k} exceeds n_search={self.n_search}: the result would "
                              "be the mean of every candidate mixture, not of the best ones; lower top_k or raise "
                              "n_search.")
        check_positive(self, "lr", "domain_scale", finite=True)
        check_non_negative(self, "warmup_steps")
        fit = self.n_proxies - self.n_proxies // self.test_every  # every test_every-th proxy is held out
        if fit < MIN_FIT_PROXIES:
            enough = next(n for n in range(MIN_FIT_PROXIES, 4 * MIN_FIT_PROXIES * self.test_every + 1)
                          if n - n // self.test_every >= MIN_FIT_PROXIES) if self.test_every > 1 else None
            raise field_error(
                self, "n_proxies", f"={self.n_proxies} with test_every={self.test_every} leaves {fit} proxies to "
                f"fit the regression (one in test_every is held out); the LightGBM fit needs at least "
                f"{MIN_FIT_PROXIES}: " + (f"raise n_proxies to {enough} or more." if enough else
                                          "raise test_every (1 holds every proxy out)."))
        try:  # the proxy's shape and vocabulary: refused now, not after the domains' data is built
            self.pretrain_config()
        except ConfigError as e:  # named as this config's field (the user set RegMixConfig's, not PretrainConfig's)
            orig = (e.field or "").rsplit(".", 1)[-1]
            name = {"max_position_embeddings": "seq_len"}.get(orig, orig)
            if name not in {f.name for f in fields(self)}:
                raise
            raise ConfigError(str(e).replace(f"PretrainConfig.{orig}", f"RegMixConfig.{name}"),
                              field=f"RegMixConfig.{name}") from None
        if self.target != "mean" and self.target not in self.domains:
            options = ["mean", *self.domains]
            raise ConfigError(f"RegMix target {self.target!r} is neither 'mean' nor a domain in the sweep "
                              f"({options}).{did_you_mean(self.target, options)}", field="RegMixConfig.target")

    def is_test(self, index: int) -> bool:
        return index % self.test_every == self.test_every - 1

    def pretrain_config(self):
        """The proxy as a ``PretrainConfig``: constant learning rate after warmup (``min_lr_ratio=1``)."""
        from lorakit.pretrain.train import PretrainConfig

        return PretrainConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=1, intermediate_size=self.intermediate_size,
            max_position_embeddings=self.seq_len, seq_len=self.seq_len, batch_size=self.batch_size,
            steps=self.steps, lr=self.lr, warmup_steps=self.warmup_steps, min_lr_ratio=1.0, bf16=False,
            num_threads=1, seed=self.seed,
        )


def train_proxy(data: DomainData, weights: Mapping[str, float], config: RegMixConfig, seed: int) -> dict[str, float]:
    """Train one proxy on ``weights`` and return its validation loss per domain (nats per token)."""
    from lorakit.pretrain.train import build_model, evaluate_loss, lr_lambda, make_optimizer

    pconfig = config.pretrain_config()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    blocks = sample_mixture_blocks(data.train, weights, config.steps * config.batch_size, generator)
    model = build_model(pconfig, data.tokenizer)
    optimizer = make_optimizer(model, pconfig)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(pconfig))
    model.train()
    for step in range(config.steps):
        batch = blocks[step * config.batch_size: (step + 1) * config.batch_size]  # (B, T); already shuffled
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), pconfig.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: evaluate_loss(model, held, pconfig) for name, held in data.eval.items()}


def read_proxies(path: Path, domains: Sequence[str] = ()) -> list[dict]:
    """The finished proxies' records in ``path`` (``proxies.jsonl``, one JSON object per line: ``index``, ``split``,
    ``weights``, ``losses``, ``seconds``); blank lines are skipped. ConfigError naming the file and line for a line
    that is not such a record (cut off by a full disk or a crash, or edited), or whose ``weights`` or ``losses``
    lack one of ``domains``, saying what to do."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            why = None
        except json.JSONDecodeError as e:
            record, why = None, f"invalid JSON: {e.msg}"
        if why is None and not isinstance(record, dict):
            why = "not a JSON object"
        elif why is None:
            missing = [k for k in ("index", "weights", "losses") if k not in record]
            if missing:
                why = f"no {', '.join(map(repr, missing))}"
            elif not isinstance(record["index"], int) or isinstance(record["index"], bool):
                why = f"'index' is not an integer: {record['index']!r}"
            elif not isinstance(record["weights"], dict) or not isinstance(record["losses"], dict):
                why = "'weights' and 'losses' must be objects"
            else:  # the fit reads every domain of both (a hand-edited record ended in a KeyError there)
                lacking = [f"domain {d!r} in {key!r}" for key in ("weights", "losses") for d in domains
                           if d not in record[key]]
                if lacking:
                    why = f"no {', '.join(lacking)}"
        if why is not None:
            raise ConfigError(f"{path}:{number}: not a proxy record ({why}); delete that line (its proxy trains "
                              "again when the sweep is resumed) or start a new --out folder.")
        records.append(record)
    return records


def read_sweep(out: Path) -> dict:
    """``out/sweep.json`` (``config`` and ``natural``, written when a sweep starts); ConfigError when it is missing
    or unreadable."""
    path = out / "sweep.json"
    if not path.is_file():
        raise ConfigError(f"no sweep.json in {out}: the folder holds no sweep `lorakit regmix` started (it writes "
                          "sweep.json first); run without --fit-only, or give the sweep's --out folder.")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not a readable sweep record ({e}); run the sweep again into a new --out "
                          "folder.") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) or \
            not isinstance(saved.get("natural"), dict):
        raise ConfigError(f"{path} is not a readable sweep record (no 'config' and 'natural' objects); run the "
                          "sweep again into a new --out folder.")
    return saved


def run_sweep(config: RegMixConfig, out_dir: str | Path, log: Callable[[str], None] = print,
              task_source=None, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Train ``n_proxies`` proxies, appending each to ``out_dir/proxies.jsonl`` (resumable: proxies
    already in the file are skipped). ``shard=(i, n)`` trains only the proxies whose index is ``i`` mod ``n``,
    so ``n`` processes can share a sweep. Returns the records in the file."""
    out = Path(out_dir)
    check_saved_config(out, config)  # before the domains' data is built (minutes at the default scale)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    data = prepare_domain_data(config.domains, config.seq_len, config.vocab_size, config.eval_blocks,
                               config.domain_scale, config.seed, task_source, config.seq_len, log)
    prior = data.natural()
    mixtures = sample_mixtures([prior[d] for d in config.domains], config.n_proxies, config.sampling)
    path = out / "proxies.jsonl"
    records = read_proxies(path, config.domains) if path.exists() else []
    check_resumable(out, config, prior, records, mixtures)
    atomic_write_json(out / "sweep.json", {"config": asdict(config), "natural": prior})  # a kill leaves the old one
    if records and not path.read_bytes().endswith(b"\n"):  # a last record without its newline (an editor, a copy):
        with path.open("a") as f:  # the next record would join its line, and both read as one invalid line
            f.write("\n")
    done = {r["index"] for r in records}
    for index, row in enumerate(mixtures):
        if index in done or index % shard[1] != shard[0]:
            continue
        start = time.perf_counter()
        weights = dict(zip(config.domains, row.tolist()))
        losses = train_proxy(data, weights, config, config.seed + index)
        record = {"index": index, "split": "test" if config.is_test(index) else "train",
                  "weights": weights, "losses": losses, "seconds": round(time.perf_counter() - start, 1)}
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
        log(f"proxy {index + 1}/{len(mixtures)} {record['split']}: "
            + " ".join(f"{d}={w:.3f}" for d, w in weights.items()) + " -> "
            + " ".join(f"{d}={v:.3f}" for d, v in losses.items()) + f" ({record['seconds']} s)")
    return records


# What only the fit and the search read: a sweep may be resumed with these changed. ``n_test`` is the older
# spelling of the held-out split (the last ``n_test`` of ``n_proxies + n_test`` proxies).
_FIT_ONLY_FIELDS = frozenset({"n_proxies", "n_test", "test_every", "target", "top_k", "n_search"})


def check_saved_config(out: Path, config: RegMixConfig) -> None:
    """``ConfigError`` naming each field that shapes a proxy and differs between ``out/sweep.json`` (when present)
    and ``config``: the part of :func:`check_resumable` that needs no data, so it runs first."""
    if not (out / "sweep.json").exists():
        return
    saved = read_sweep(out)
    current = json.loads(json.dumps(asdict(config)))  # tuples as lists, as saved
    changed = sorted(k for k in set(saved["config"]) | set(current)
                     if k not in _FIT_ONLY_FIELDS and saved["config"].get(k) != current.get(k))
    if changed:
        raise ConfigError(f"{out} holds a sweep made with a different config ("
                          + ", ".join(f"{k}: {saved['config'].get(k)!r} there, {current.get(k)!r} now" for k in changed)
                          + "); use a new --out folder or the same flags.")


def check_resumable(out: Path, config: RegMixConfig, natural: Mapping[str, float], records: Sequence[dict],
                    mixtures: np.ndarray) -> None:
    """Refuse to add proxies to ``out`` when its earlier ones were trained differently.

    Compares ``out/sweep.json`` (when present) with ``config`` on every field that shapes a proxy and on the
    natural shares (the data), and each finished record's mixture with the one ``config`` samples at its index
    (which also catches a changed ``n_proxies``: the sampler draws ``n_proxies · 100`` trials). Raises
    ``ConfigError`` naming what differs.
    """
    saved_path = out / "sweep.json"
    check_saved_config(out, config)
    if saved_path.exists():
        saved = read_sweep(out)
        drift = {d: (saved["natural"].get(d), v) for d, v in natural.items()
                 if not math.isclose(saved["natural"].get(d, -1.0), v, rel_tol=1e-9)}
        if drift:
            raise ConfigError(f"The domains' natural shares changed since {saved_path} was written "
                              f"(then, now: {drift}): the training data differs; start a new --out folder.")
    for record in records:
        index = record["index"]
        expected = mixtures[index] if index < len(mixtures) else None
        got = np.array([record["weights"].get(d, np.nan) for d in config.domains])
        if expected is None or not np.allclose(got, expected, atol=1e-9):
            raise ConfigError(f"Proxy {index} in {out / 'proxies.jsonl'} was trained on {record['weights']}, not "
                              f"the mixture this config samples at index {index}"
                              + ("" if expected is None else f" ({dict(zip(config.domains, expected.tolist()))})")
                              + "; the sweep was made with another n_proxies, domains or sampler: use its flags "
                              "or a new --out folder.")


# ---------------------------------------------------------------- regression and search

LIGHTGBM_PARAMS = {  # regression.ipynb cell 13
    "task": "train", "boosting_type": "gbdt", "objective": "regression", "metric": ["l1", "l2"],
    "num_iterations": 1000, "seed": 42, "learning_rate": 1e-2, "verbosity": -1,
}


def fit_regressors(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray | None = None,
                   y_test: np.ndarray | None = None, params: Mapping | None = None) -> list:
    """One ``lightgbm.LGBMRegressor`` per target column (y: (N, M)), early-stopped on the test set when given."""
    try:
        import lightgbm as lgb
    except ImportError as err:
        raise ImportError("RegMix's regression needs LightGBM: pip install 'lorakit[pretrain]'.") from err
    # num_threads=1: LightGBM ignores OMP_NUM_THREADS and spins every core, 80x slower on a busy machine for
    # these few-hundred-row fits; it changes speed only.
    params = {**LIGHTGBM_PARAMS, "min_child_samples": scaled_min_child_samples(len(x_train)), "num_threads": 1,
              **(params or {})}
    models = []
    with warnings.catch_warnings():
        # the official notebook's eval_set spelling; newer LightGBM prefers eval_X/eval_y, which 4.0 lacks
        warnings.filterwarnings("ignore", message=".*'eval_set' is deprecated")
        for j in range(y_train.shape[1]):
            model = lgb.LGBMRegressor(**params)
            if x_test is not None and len(x_test):
                model.fit(x_train, y_train[:, j], eval_set=[(x_test, y_test[:, j])], eval_metric="l2",
                          callbacks=[lgb.early_stopping(stopping_rounds=3, verbose=False)])
            else:
                model.fit(x_train, y_train[:, j])
            models.append(model)
    return models


def scaled_min_child_samples(n_train: int) -> int:
    """LightGBM's default ``min_child_samples=20`` was sized for the official 512 proxies (3.9% of them); we keep
    that fraction for our smaller sweeps (at least 2), or every tree would be a single leaf below 40 proxies."""
    return max(2, round(n_train * 20 / 512))


def predict_target(models: Sequence, x: np.ndarray, target_index: int | None) -> np.ndarray:
    """The target loss (N,): one regressor's prediction, or the mean over all when ``target_index`` is None."""
    preds = np.stack([m.predict(x) for m in models], axis=1)  # (N, M)
    return preds.mean(axis=1) if target_index is None else preds[:, target_index]


def search_mixture(predict: Callable[[np.ndarray], np.ndarray], prior: Sequence[float], n_samples: int = 100_000,
                   top_k: int = 128, seed: int = 42) -> np.ndarray:
    """The mean of the ``top_k`` of ``n_samples`` ``Dirichlet(prior)`` mixtures with the lowest predicted loss
    (regression.ipynb cells 16 and 18). Returns (D,) on the simplex."""
    samples = np.random.RandomState(seed).dirichlet(np.asarray(prior, dtype=np.float64), n_samples)  # (S, D)
    best = samples[np.argsort(predict(samples))[:top_k]]
    return best.mean(axis=0)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def fit_and_search(records: Sequence[dict], config: RegMixConfig, natural: Mapping[str, float]) -> dict:
    """Fit on the train proxies, score on the test proxies, search the best mixture; a JSON-ready summary."""
    domains = list(config.domains)
    def arrays(split):  # the split follows the index, so a sweep stopped early still has held-out proxies
        rows = [r for r in records if ("test" if config.is_test(r["index"]) else "train") == split]
        return (np.array([[r["weights"][d] for d in domains] for r in rows]),
                np.array([[r["losses"][d] for d in domains] for r in rows]))
    x_train, y_train = arrays("train")
    x_test, y_test = arrays("test")
    if len(x_train) < MIN_FIT_PROXIES:
        raise ConfigError(f"Only {len(x_train)} training proxies finished; RegMix needs {MIN_FIT_PROXIES} to fit.")
    models = fit_regressors(x_train, y_train, x_test, y_test)
    target_index = None if config.target == "mean" else domains.index(config.target)
    true_target = y_test.mean(axis=1) if target_index is None else y_test[:, target_index]
    summary = {"domains": domains, "target": config.target, "n_train": len(x_train), "n_test": len(x_test)}
    if len(x_test) >= 3:
        from sklearn.linear_model import LinearRegression

        linear = LinearRegression().fit(x_train, y_train)
        lin_pred = linear.predict(x_test)
        summary["spearman_test"] = {
            "lightgbm": {"target": spearman(predict_target(models, x_test, target_index), true_target),
                         **{d: spearman(models[j].predict(x_test), y_test[:, j]) for j, d in enumerate(domains)}},
            "linear": {"target": spearman(lin_pred.mean(axis=1) if target_index is None else lin_pred[:, target_index],
                                          true_target),
                       **{d: spearman(lin_pred[:, j], y_test[:, j]) for j, d in enumerate(domains)}},
        }
    prior = [natural[d] for d in domains]
    best = search_mixture(lambda x: predict_target(models, x, target_index), prior, config.n_search, config.top_k)
    candidates = {"regmix": dict(zip(domains, best.tolist())), "natural": dict(natural),
                  "uniform": uniform_weights(domains)}
    summary["mixtures"] = candidates
    summary["predicted_target"] = {
        name: float(predict_target(models, np.array([[w[d] for d in domains]]), target_index)[0])
        for name, w in candidates.items()}
    summary["mixture"] = candidates["regmix"]
    return summary


def load_regmix_mixture(regmix_dir: str | Path) -> dict[str, float]:
    """The mixture ``lorakit regmix`` saved in ``regmix_dir/regmix.json``."""
    path = Path(regmix_dir) / "regmix.json"
    if not path.exists():
        raise ConfigError(f"No RegMix result at {path}; run `lorakit regmix --out {regmix_dir}` first "
                          "(it trains the proxy models and writes regmix.json).")
    try:
        mixture = json.loads(path.read_text(encoding="utf-8")).get("mixture")
    except (ValueError, AttributeError, OSError) as e:  # not JSON, not an object, unreadable
        why = getattr(e, "strerror", None) or (str(e) if not isinstance(e, AttributeError) else "not a JSON object")
        raise ConfigError(f"{path} is not a RegMix result ({why}); run `lorakit regmix --out {regmix_dir} "
                          "--fit-only` to write it again from the sweep's proxies.") from None
    if not isinstance(mixture, dict) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                for w in mixture.values()):
        raise ConfigError(f"{path} has no 'mixture' object of domain -> weight numbers (got {mixture!r}); run "
                          f"`lorakit regmix --out {regmix_dir} --fit-only` to write it again from the sweep's proxies.")
    return mixture


# --help text of each sweep flag (its default is RegMixConfig's, shown by the formatter)
_FLAG_HELP = {
    "n_proxies": "proxy models in the sweep, every --test-every-th held out to score the regression",
    "test_every": "hold out every N-th proxy", "steps": "training steps per proxy",
    "hidden_size": "proxy model width", "num_layers": "proxy decoder layers",
    "seq_len": "tokens per training / validation block", "batch_size": "blocks per proxy training step",
    "vocab_size": "tokens of the sweep's tokenizer", "eval_blocks": "validation blocks per domain (every proxy)",
    "top_k": "best of the --n-search candidate mixtures averaged into the result",
    "n_search": "Dirichlet(natural) mixtures scored by the regression", "seed": "seed of the data and the proxies",
    "lr": "proxy learning rate (constant after warmup)",
    "domain_scale": "times each domain's natural character budget, for the sweep's data",
}


def build_parser() -> CommandParser:
    parser = CommandParser(prog="lorakit regmix", formatter_class=DefaultsFormatter, description=(
        "RegMix (arXiv 2407.01492): train proxy models on random domain mixtures, regress validation loss on "
        "the mixture with LightGBM, and write the predicted best mixture to OUT/regmix.json."))
    parser.add_argument("--out", type=Path, required=True, help="folder for proxies.jsonl and regmix.json")
    parser.add_argument("--fit-only", action="store_true", help="fit on the proxies already in OUT")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="train only proxies with index = I mod N (run N processes to share a sweep)")
    defaults = RegMixConfig()
    parser.add_argument("--domains", default=",".join(defaults.domains), help="comma-separated domain names")
    for name in ("n_proxies", "test_every", "steps", "hidden_size", "num_layers", "seq_len", "batch_size",
                 "vocab_size", "eval_blocks", "top_k", "n_search", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=seed_arg if name == "seed" else int,
                            default=getattr(defaults, name), help=_FLAG_HELP[name])
    for name in ("lr", "domain_scale"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name),
                            help=_FLAG_HELP[name])
    parser.add_argument("--target", default=defaults.target, help="'mean' or a domain whose loss to minimise")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (status := parser.file_in_the_way(args.out, "--out")) is not None:  # was a FileExistsError traceback
        return status
    values = {k: v for k, v in vars(args).items() if k not in ("out", "fit_only", "shard")}
    try:
        values["domains"] = tuple(comma_items(values["domains"], "--domains", "domain names"))
        return _run(args, RegMixConfig(**values))
    except LorakitError as err:  # a flag, a resumed folder's other config, too few finished proxies to fit, ...
        return parser.fail(err)  # the sweep's records stay
    except KeyboardInterrupt:  # Ctrl-C: the finished proxies are on disk, the one in training is dropped
        path = args.out / "proxies.jsonl"
        done = sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0
        print(f"\n{parser.prog}: interrupted; {done} finished prox{'y' if done == 1 else 'ies'} in {path} "
              "(the one in training is dropped): run the same command again to resume the sweep", file=sys.stderr)
        return 130


def _run(args, config: "RegMixConfig") -> int:
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.fit_only:
        path = args.out / "proxies.jsonl"
        if not path.exists():
            raise ConfigError(f"no proxies at {path}; run without --fit-only first.")
        natural = read_sweep(args.out)["natural"]
        check_saved_config(args.out, config)  # the fit reads the flags' domains: those of the sweep, or an error
        records = read_proxies(path, config.domains)
    else:
        try:
            shard = tuple(int(x) for x in args.shard.split("/"))
            assert len(shard) == 2 and 0 <= shard[0] < shard[1]
        except (ValueError, AssertionError):
            raise ConfigError(f"--shard expects I/N with 0 <= I < N, got {args.shard!r}.") from None
        run_sweep(config, args.out, log, shard=shard)
        if shard[1] > 1:
            print(f"shard {args.shard} done; fit with --fit-only once every shard has finished.")
            return 0
        records = read_proxies(args.out / "proxies.jsonl", config.domains)
        natural = read_sweep(args.out)["natural"]
    summary = fit_and_search(records, config, natural)
    atomic_write_json(args.out / "regmix.json", summary)
    print(json.dumps({k: summary[k] for k in ("mixture", "predicted_target", "spearman_test") if k in summary},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
