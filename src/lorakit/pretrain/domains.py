"""Pretraining domains and data mixtures: named text sources that exist offline on any Python install.

A *domain* is a deterministic source of documents; a *mixture* is a weight per domain giving the share of
training tokens drawn from it. The four domains need nothing but the interpreter and lorakit:

| domain       | what                                                                     | natural size   |
|--------------|--------------------------------------------------------------------------|----------------|
| `code`       | standard-library ``.py`` source (the original half of the corpus)        | 3,000,000 chars|
| `docstrings` | module, class and function docstrings parsed out of the same files (prose about APIs) | all   |
| `docs`       | ``pydoc_data.topics``: the language reference that ``help()`` prints     | all            |
| `tasks`      | the built-in tasks' pretraining split (``prompt => completion``)         | 3,000,000 chars|

The *natural* mixture is each domain's share of the tokens in these default budgets (what the corpus holds
when nothing is reweighted), the *uniform* one gives every domain the same share. ``parse_mixture`` reads
``regmix | uniform | natural | code=0.5,tasks=0.5``; the ``regmix`` mixture itself is found by
``lorakit.pretrain.regmix``.
"""

from __future__ import annotations

import ast
import math
import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from lorakit.core.errors import ConfigError, comma_items, did_you_mean
from lorakit.pretrain.corpus import (
    Corpus, TaskTextsFn, split_chunks, stdlib_files, stdlib_texts, take_chars, task_texts,
)
from lorakit.pretrain.tokenizer import train_tokenizer

NAMED_MIXTURES = ("natural", "uniform", "regmix")
MIXTURE_TOLERANCE = 1e-3  # weights given by hand must sum to 1 within this


def _docstring_texts(n_chars: int, chunk_chars: int, seed: int, task_source: TaskTextsFn | None) -> list[str]:
    """Docstrings of stdlib modules, classes and functions, each one a document (long ones chunked).

    Files are parsed in a seeded order until the budget is met, so a small budget parses few files.
    """
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    docs, total = [], 0
    for path in files:
        if total >= n_chars:
            break
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= 40:  # one-liners like "Return x." carry little text statistics
                    chunks = split_chunks(text, chunk_chars)
                    docs.extend(chunks)
                    total += sum(map(len, chunks))
    return _take(docs, n_chars, seed)


def _pydoc_topic_texts(n_chars: int, chunk_chars: int, seed: int, task_source: TaskTextsFn | None) -> list[str]:
    from pydoc_data.topics import topics  # shipped with every CPython, it is what help("if") prints

    docs = [chunk for name in sorted(topics) for chunk in split_chunks(topics[name], chunk_chars)]
    return _take(docs, n_chars, seed)


def _code_texts(n_chars: int, chunk_chars: int, seed: int, task_source: TaskTextsFn | None) -> list[str]:
    return stdlib_texts(n_chars, chunk_chars, seed)


def _task_texts(n_chars: int, chunk_chars: int, seed: int, task_source: TaskTextsFn | None) -> list[str]:
    return task_texts(n_chars, seed, task_source)


def _take(docs: list[str], n_chars: int, seed: int) -> list[str]:
    """A seeded shuffle, then a prefix of about ``n_chars`` characters (all of them when there are fewer)."""
    random.Random(seed).shuffle(docs)
    return take_chars(docs, n_chars)


DomainTexts = Callable[[int, int, int, "TaskTextsFn | None"], list[str]]


@dataclass(frozen=True)
class Domain:
    """A named document source: ``texts(n_chars, chunk_chars, seed, task_source)`` and its natural budget."""

    name: str
    texts: DomainTexts
    natural_chars: int
    description: str


DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("code", _code_texts, 3_000_000, "standard-library Python source"),
    Domain("docstrings", _docstring_texts, 3_000_000, "docstrings parsed from the standard library"),
    Domain("docs", _pydoc_topic_texts, 3_000_000, "pydoc_data.topics, the reference text help() prints"),
    Domain("tasks", _task_texts, 3_000_000, "the built-in tasks' pretraining split"),
)}


def check_domain(name: str) -> str:
    if name not in DOMAINS:
        raise ConfigError(f"Unknown pretraining domain {name!r}; the domains are {sorted(DOMAINS)}."
                          f"{did_you_mean(name, DOMAINS)}")
    return name


def domain_documents(names: Sequence[str] = tuple(DOMAINS), scale: float = 1.0, chunk_chars: int = 1_024,
                     seed: int = 0, task_source: TaskTextsFn | None = None) -> dict[str, list[str]]:
    """Documents per domain, ``scale`` times each domain's natural budget (``scale < 1`` for tests)."""
    if scale <= 0:
        raise ConfigError(f"Domain scale must be > 0, got {scale}.")
    return {name: DOMAINS[check_domain(name)].texts(round(DOMAINS[name].natural_chars * scale), chunk_chars,
                                                     seed, task_source)
            for name in names}


def check_weights(weights: Mapping[str, float], what: str = "mixture") -> dict[str, float]:
    """Validate a domain → weight map: known domains, finite weights >= 0, summing to 1 (within 1e-3)."""
    if not weights:
        raise ConfigError(f"The {what} names no domain; give e.g. code=0.5,tasks=0.5.")
    for name, weight in weights.items():
        check_domain(name)
        if not (weight >= 0.0 and weight != float("inf")):  # also rejects NaN
            raise ConfigError(f"The {what} weight of {name!r} is {weight}; weights must be finite and >= 0.")
    total = sum(weights.values())
    if abs(total - 1.0) > MIXTURE_TOLERANCE:
        raise ConfigError(f"The {what} weights sum to {total:.6g}, not 1 ({dict(weights)}); rescale them so "
                          "they sum to 1.")
    return {name: float(weights[name]) for name in weights}


def parse_mixture(text: str) -> str | dict[str, float]:
    """``natural`` / ``uniform`` / ``regmix`` as they are, or ``name=weight,...`` as a checked dict."""
    text = text.strip()
    if "=" not in text:
        if text not in NAMED_MIXTURES:
            raise ConfigError(f"Unknown mixture {text!r}; give one of {list(NAMED_MIXTURES)} or "
                              f"domain=weight pairs such as code=0.4,tasks=0.6.{did_you_mean(text, NAMED_MIXTURES)}")
        return text
    weights: dict[str, float] = {}
    for part in comma_items(text, "", "domain=weight pairs", field="mixture"):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:  # `code:0.4` read as a domain named "code:0.4" with the weight '' was reported as a bad number
            raise ConfigError(f"Mixture item {part!r} is not domain=weight (in {text!r}); write e.g. code=0.4.")
        if name in weights:
            raise ConfigError(f"Domain {name!r} appears twice in mixture {text!r}.")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ConfigError(f"Mixture weight {value!r} for {name!r} is not a number (in {text!r}).") from None
    return check_weights(weights)


def token_counts(blocks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {name: int(b.numel()) for name, b in blocks.items()}


def natural_weights(counts: Mapping[str, int]) -> dict[str, float]:
    """Each domain's share of the available tokens (RegMix's 'token distribution' prior)."""
    total = sum(counts.values())
    return {name: n / total for name, n in counts.items()}


def uniform_weights(names: Sequence[str]) -> dict[str, float]:
    return {name: 1.0 / len(names) for name in names}


def block_counts(weights: Mapping[str, float], n: int) -> dict[str, int]:
    """Whole block counts per domain, proportional to ``weights`` (>= 0, normalised over the names given) and
    summing to exactly ``n``: the largest-remainder (Hamilton) method — each domain gets ``floor(q_d)`` of its
    quota ``q_d = n · w_d / Σw``, and the ``n − Σ floor(q_d)`` blocks left go one each to the largest remainders
    ``q_d − floor(q_d)`` (ties: the earlier domain). Rounding each quota on its own (``round(q_d)``) misses ``n``
    at small scale (three equal domains, ``n = 4``: 1 + 1 + 1). All zero when every weight is 0."""
    total = float(sum(weights.values()))
    if total <= 0:
        return {name: 0 for name in weights}
    quotas = {name: n * w / total for name, w in weights.items()}
    counts = {name: math.floor(q) for name, q in quotas.items()}
    left = n - sum(counts.values())
    by_remainder = sorted(weights, key=lambda name: -(quotas[name] - counts[name]))  # stable: ties keep order
    for name in by_remainder[:left]:
        counts[name] += 1
    return counts


def sample_mixture_blocks(blocks: Mapping[str, torch.Tensor], weights: Mapping[str, float], n_blocks: int,
                          generator: torch.Generator) -> torch.Tensor:
    """``n_blocks`` training blocks (n_blocks, T): domain ``d``'s share of ``w_d · n_blocks`` blocks, drawn
    without replacement within each pass over the domain (a domain smaller than its share repeats, as
    RegMix's multi-epoch usage bound allows), then shuffled together. The shares are apportioned by
    :func:`block_counts` (largest remainder), so they add up to exactly ``n_blocks``."""
    counts = block_counts({name: weights.get(name, 0.0) for name in blocks}, n_blocks)
    picked = []
    for name, count in counts.items():
        if count == 0:
            continue
        pool = blocks[name]
        if len(pool) == 0:
            raise ConfigError(f"Domain {name!r} has weight {weights[name]} but no training blocks.")
        passes = -(-count // len(pool))
        order = torch.cat([torch.randperm(len(pool), generator=generator) for _ in range(passes)])[:count]
        picked.append(pool[order])
    if not picked:
        raise ConfigError(f"The mixture {dict(weights)} selects no blocks out of {n_blocks}.")
    mixed = torch.cat(picked)
    return mixed[torch.randperm(len(mixed), generator=generator)]


@dataclass
class DomainData:
    """A shared tokenizer and, per domain, packed training blocks and held-out validation blocks (N, T)."""

    tokenizer: object
    train: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]

    def natural(self) -> dict[str, float]:
        return natural_weights(token_counts(self.train))


def prepare_domain_data(domains: Sequence[str], seq_len: int, vocab_size: int, n_eval: int | float,
                        scale: float = 1.0, seed: int = 0, task_source=None, model_max_length: int = 256,
                        log: Callable[[str], None] = print) -> DomainData:
    """Documents per domain → one BPE tokenizer on all of them → blocks per domain, split train / eval.

    ``n_eval`` is a block count per domain (int) or a fraction of each domain's blocks (float < 1).
    """
    from lorakit.pretrain.train import pack_corpus  # train.py imports this module

    docs = domain_documents(domains, scale, seed=seed, task_source=task_source)
    tokenizer = train_tokenizer([d for name in domains for d in docs[name]], vocab_size,
                                model_max_length=model_max_length)
    train, held = {}, {}
    for i, name in enumerate(domains):
        try:
            blocks = pack_corpus(Corpus(docs[name], 0, 0), tokenizer, seq_len, seed + i)
        except ConfigError as e:  # pack_corpus's advice (stdlib_chars) is for the plain corpus, which is not read here
            raise ConfigError(f"Domain {name!r} at scale {scale:g} is too small: {str(e).split(';')[0].replace('The corpus gives', 'it gives')}. Raise the "
                              "domains' scale (pretrain-base --mixture-scale, regmix --domain-scale) or lower "
                              "seq_len.") from None
        k = int(len(blocks) * n_eval) if isinstance(n_eval, float) else min(n_eval, len(blocks) // 2)
        held[name], train[name] = blocks[:k], blocks[k:]  # pack_corpus already shuffled the documents
        log(f"domain {name}: {len(docs[name])} documents, {blocks.numel()} tokens, {k} eval blocks")
    return DomainData(tokenizer, train, held)


def resolve_mixture(mixture: str, natural: Mapping[str, float], regmix_dir: str = "") -> dict[str, float]:
    """The weights a ``--mixture`` value names, over the domains in ``natural``."""
    parsed = parse_mixture(mixture)
    if parsed == "natural":
        return dict(natural)
    if parsed == "uniform":
        return uniform_weights(list(natural))
    if parsed == "regmix":
        from lorakit.pretrain.regmix import load_regmix_mixture

        return check_weights(load_regmix_mixture(regmix_dir), "RegMix mixture")
    return parsed


def mixture_training_data(config, generator: torch.Generator, task_source: TaskTextsFn | None = None,
                          log: Callable[[str], None] = print):
    """What ``pretrain_base`` trains on under ``config.mixture``: (tokenizer, train blocks (steps·B, T),
    held-out blocks per domain, stats). The tokenizer and the held-out blocks come from all domains at their
    natural budgets, so every mixture is scored on the same text with the same tokenizer."""
    if parse_mixture(config.mixture) == "regmix":  # read it now: a bad --regmix-dir fails before the data is built
        resolve_mixture("regmix", {}, config.regmix_dir)
    data = prepare_domain_data(tuple(DOMAINS), config.seq_len, config.vocab_size, config.eval_fraction,
                               config.mixture_scale, config.seed, task_source, config.max_position_embeddings, log)
    natural = data.natural()
    weights = resolve_mixture(config.mixture, natural, config.regmix_dir)
    train_blocks = sample_mixture_blocks(data.train, weights, config.steps * config.batch_size, generator)
    stats = {"mixture": config.mixture, "weights": {k: round(v, 4) for k, v in weights.items()},
             "natural_weights": {k: round(v, 4) for k, v in natural.items()},
             "domain_tokens": token_counts(data.train), "train_blocks": len(train_blocks),
             "eval_blocks": {k: len(v) for k, v in data.eval.items()}}
    return data.tokenizer, train_blocks, data.eval, stats
