"""Data mixture inference from a BPE merge list (Hayase, Liu et al., "Data Mixture Inference: What do BPE
Tokenizers Reveal about their Training Data?", arXiv 2407.16607; official code
github.com/alisawuffles/tokenizer-attack, ``run_solver.py``).

BPE training picks, at every step ``t``, the most frequent pair in the (pre-tokenized, partly merged) training
data. With sample text per category ``i`` we can replay the merge list on each sample and count every pair
``p`` at every step, ``c_{i,p}^{(t)}``, normalised by the category's number of pairs before any merge (the
official ``--denom pairs``). If the training data were the mixture ``α``, the chosen merge ``m_t`` beats every
other pair, so the paper's linear program is (§3.2, eq. 2-3)::

    minimise   Σ_t v_t + Σ_p v_p
    subject to Σ_i α_i (c_{i,m_t}^{(t)} − c_{i,p}^{(t)}) + v_t + v_p ≥ 0   for every step t, pair p ≠ m_t
               α ≥ 0, Σ_i α_i = 1, v ≥ 0

with slack ``v_t`` per step and ``v_p`` per pair absorbing sampling noise. There are far too many pairs to write
every constraint, so, as the official ``lazy_optimize`` does, we start with none, solve, walk the merges with
the current ``α`` looking for pairs whose weighted count beats the merge's (at most ``competitor_batch_size``
per step, stopping a pass after ``max_add`` new constraints), add them, and re-solve until a pass finds no
violation. The official code solves with Gurobi and a Rust priority queue; we use ``scipy.optimize.linprog``
(HiGHS), re-solving from scratch each round, and numpy arrays over all pairs. ``α`` is in pair units; the
result is also given in bytes (``α_i · bytes_i / pairs_i``, renormalised, as the official ``score_solution``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from lorakit.cli_parser import CommandParser, DefaultsFormatter, check_output_file
from lorakit.core.errors import ConfigError, LorakitError, comma_items
from lorakit.io.files import atomic_write_json


# ---------------------------------------------------------------- reading a tokenizer


@dataclass
class BPETokenizer:
    """What the attack needs: the ordered merges and a function text -> pre-tokens (each a symbol string)."""

    merges: list[tuple[str, str]]
    pretokenize: Callable[[str], list[str]]
    name: str


def load_bpe(path: str | Path) -> BPETokenizer:
    """A Hugging Face ``tokenizer.json`` (or a folder holding one) with a BPE model.

    Raises ``ConfigError`` for a missing file, one that is not a tokenizer.json (not JSON, no ``model`` object) or
    a non-BPE model (WordPiece, Unigram have no merge list).
    """
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"No tokenizer.json at {file}; give a tokenizer.json or a folder that holds one.")
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not a tokenizer.json (not valid JSON: {e}).") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model", {}), dict):
        raise ConfigError(f"{file} is not a tokenizer.json (no 'model' object).")
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"{file} holds a {model.get('type')!r} tokenizer; data mixture inference needs a BPE "
                          "merge list.")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ConfigError(f"{file} uses subword prefixes/suffixes, which this replay does not model.")
    raw = model.get("merges", [])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) if isinstance(m, list) else (m,)
              for m in (raw if isinstance(raw, list) else [raw])]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2 or not all(isinstance(x, str) and x for x in m)), None)
    if bad is not None:  # each merge is "left right" or ["left", "right"]
        raise ConfigError(f"{file} is not a BPE tokenizer.json: merge {bad} is {raw[bad] if isinstance(raw, list) else raw!r}, "
                          "not a pair of tokens ('left right' or [\"left\", \"right\"]).")
    if not merges:
        raise ConfigError(f"{file} has an empty merge list.")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library's own parse error (a bare Exception): vocab, normalizer, ...
        raise ConfigError(f"{file} is not a tokenizer.json the tokenizers library can load ({e}).") from None
    normalizer, pre = tok.normalizer, tok.pre_tokenizer

    def pretokenize(text: str) -> list[str]:
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        return [piece for piece, _ in pre.pre_tokenize_str(text)] if pre is not None else [text]

    return BPETokenizer(merges, pretokenize, str(file))


# ---------------------------------------------------------------- replaying the merges on sample text


@dataclass
class PairCounts:
    """One category's pair counts while replaying merges: ``initial`` before merge 0, then ``deltas[t]`` =
    the change caused by applying merge ``t`` (pairs → signed count)."""

    initial: dict[tuple[str, str], int]
    deltas: list[dict[tuple[str, str], int]]
    n_pairs: int  # Σ initial counts: the official "pairs" denominator
    n_bytes: int


def count_pairs(texts: Sequence[str], tokenizer: BPETokenizer, n_merges: int) -> PairCounts:
    """Pre-tokenize ``texts``, split pre-tokens into characters, and apply the first ``n_merges`` merges in order,
    recording how every pair's count changes (the official ``dump_frequencies.py`` does this in Rust)."""
    word_freq = Counter(piece for text in texts for piece in tokenizer.pretokenize(text))
    words = [list(w) for w in word_freq]
    freqs = list(word_freq.values())
    counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for idx, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            counts[pair] += freq
            where[pair].add(idx)
    initial = {p: c for p, c in counts.items() if c}
    deltas = []
    for left, right in tokenizer.merges[:n_merges]:
        merged, delta = left + right, defaultdict(int)
        for idx in sorted(where.pop((left, right), ())):
            word, freq = words[idx], freqs[idx]
            for pair in zip(word, word[1:]):
                delta[pair] -= freq
            new, i = [], 0
            while i < len(word):  # left to right, non-overlapping, as BPE applies a merge
                if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
                    new.append(merged)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            words[idx] = new
            for pair in zip(new, new[1:]):
                delta[pair] += freq
                where[pair].add(idx)
        step = {p: d for p, d in delta.items() if d}
        for p, d in step.items():
            counts[p] += d
        deltas.append(step)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return PairCounts(initial, deltas, sum(initial.values()), n_bytes)


# ---------------------------------------------------------------- the linear program


@dataclass
class InferenceResult:
    pair_share: dict[str, float]  # α as solved, in units of pairs
    byte_share: dict[str, float]  # α converted to bytes of training text
    objective: float
    n_constraints: int
    n_rounds: int
    n_merges: int
    missing_merges: int  # merges whose pair never occurs in any sample (no constraint possible)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def infer_mixture(counts: Mapping[str, PairCounts], merges: Sequence[tuple[str, str]], *,
                  competitor_batch_size: int = 10, max_add: int = 1000, max_rounds: int = 500,
                  tol: float = 1e-9) -> InferenceResult:
    """Solve the paper's LP by lazy constraint generation; see the module docstring.

    ``competitor_batch_size`` is the official 10; ``max_add`` is 1000 rather than the official 100 because
    HiGHS re-solves from scratch each round where Gurobi warm-starts (same answer in a tenth of the rounds on
    our validation tokenizers).

    ``counts`` maps category → its replay (``count_pairs``) over the same ``merges``. Raises ``ConfigError``
    when fewer than two categories are given.
    """
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    names = list(counts)
    if len(names) < 2:
        raise ConfigError(f"Data mixture inference needs at least two categories, got {names}.")
    n_cat = len(names)
    n_steps = min(len(merges), *(len(c.deltas) for c in counts.values()))
    denoms = np.array([counts[n].n_pairs for n in names], dtype=np.float64)
    if (denoms == 0).any():
        empty = [n for n, d in zip(names, denoms) if d == 0]
        raise ConfigError(f"Categories {empty} have no character pairs; give them more sample text.")

    pair_id: dict[tuple[str, str], int] = {}
    def pid(pair):
        return pair_id.setdefault(pair, len(pair_id))
    for name in names:
        for pair in counts[name].initial:
            pid(pair)
        for step in counts[name].deltas[:n_steps]:
            for pair in step:
                pid(pair)
    initial = np.zeros((len(pair_id), n_cat))  # (P, D): normalised counts before merge 0
    for j, name in enumerate(names):
        for pair, c in counts[name].initial.items():
            initial[pair_id[pair], j] = c / denoms[j]
    step_deltas = []  # per step: (ids (k,), values (k, D))
    for t in range(n_steps):
        merged = defaultdict(lambda: np.zeros(n_cat))
        for j, name in enumerate(names):
            for pair, d in counts[name].deltas[t].items():
                merged[pair_id[pair]][j] = d / denoms[j]
        ids = np.fromiter(merged, dtype=np.int64, count=len(merged))
        step_deltas.append((ids, np.stack([merged[i] for i in ids]) if len(ids) else np.zeros((0, n_cat))))
    merge_ids = [pair_id.get(tuple(m), -1) for m in merges[:n_steps]]

    alpha = np.full(n_cat, 1.0 / n_cat)
    v_step = np.zeros(n_steps)
    pair_var: dict[int, int] = {}  # pair id -> index among the per-pair slack variables
    v_pair = np.zeros(0)
    rows: list[tuple[int, int, np.ndarray]] = []  # (step, competitor pair id, c_m − c_p (D,))
    seen: set[tuple[int, int]] = set()
    objective, rounds = 0.0, 0
    for rounds in range(1, max_rounds + 1):
        slack_of_pair = np.zeros(len(pair_id))
        for p, k in pair_var.items():
            slack_of_pair[p] = v_pair[k]
        current = initial.copy()
        score = current @ alpha - slack_of_pair  # (P,) weighted count minus the pair's own slack
        added = 0
        for t in range(n_steps):
            m = merge_ids[t]
            if m >= 0:
                cutoff = score[m] + slack_of_pair[m] + v_step[t] + tol
                beaten = np.flatnonzero(score > cutoff)
                beaten = beaten[beaten != m]
                beaten = [p for p in beaten[np.argsort(-score[beaten])] if (t, p) not in seen][:competitor_batch_size]
                for p in beaten:
                    seen.add((t, p))
                    rows.append((t, int(p), current[m] - current[p]))
                    pair_var.setdefault(int(p), len(pair_var))
                added += len(beaten)
            ids, values = step_deltas[t]
            if len(ids):
                current[ids] += values
                score[ids] += values @ alpha
            if added >= max_add:
                break
        if added == 0:
            break
        # x = [α (D), v_step (T), v_pair (Q)]; each row: −(c_m − c_p)·α − v_t − v_p ≤ 0
        n_q = len(pair_var)
        r_idx, c_idx, vals = [], [], []
        for r, (t, p, diff) in enumerate(rows):
            r_idx += [r] * (n_cat + 2)
            c_idx += [*range(n_cat), n_cat + t, n_cat + n_steps + pair_var[p]]
            vals += [*(-diff), -1.0, -1.0]
        a_ub = coo_matrix((vals, (r_idx, c_idx)), shape=(len(rows), n_cat + n_steps + n_q)).tocsr()
        cost = np.concatenate([np.zeros(n_cat), np.ones(n_steps + n_q)])
        a_eq = np.concatenate([np.ones(n_cat), np.zeros(n_steps + n_q)])[None, :]
        bounds = [(0, 1)] * n_cat + [(0, None)] * (n_steps + n_q)
        res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(len(rows)), A_eq=a_eq, b_eq=[1.0], bounds=bounds,
                      method="highs")
        if res.status != 0:
            raise RuntimeError(f"HiGHS could not solve the mixture LP: {res.message}")
        alpha = np.clip(res.x[:n_cat], 0.0, None)
        alpha /= alpha.sum()
        v_step, v_pair = res.x[n_cat:n_cat + n_steps], res.x[n_cat + n_steps:]
        objective = float(res.fun)
    byte_ratio = np.array([counts[n].n_bytes for n in names]) / denoms
    in_bytes = alpha * byte_ratio
    in_bytes /= in_bytes.sum()
    return InferenceResult(
        pair_share=dict(zip(names, alpha.tolist())), byte_share=dict(zip(names, in_bytes.tolist())),
        objective=objective, n_constraints=len(rows), n_rounds=rounds, n_merges=n_steps,
        missing_merges=sum(1 for m in merge_ids if m < 0),
    )


def infer_from_texts(tokenizer: BPETokenizer, texts: Mapping[str, Sequence[str]], n_merges: int = 1000,
                     **solver) -> InferenceResult:
    """Replay the first ``n_merges`` merges on each category's texts and solve for the mixture."""
    if n_merges <= 0:
        raise ConfigError(f"n_merges must be > 0, got {n_merges}.")
    if n_merges > len(tokenizer.merges):  # the replay simply runs out: say so rather than solve on fewer in silence
        warnings.warn(f"n_merges (--merges) = {n_merges}, but the tokenizer has only {len(tokenizer.merges)} merges; "
                      f"the mixture is inferred from those {len(tokenizer.merges)}.", stacklevel=2)
    counts = {name: count_pairs(t, tokenizer, n_merges) for name, t in texts.items()}
    return infer_mixture(counts, tokenizer.merges[:n_merges], **solver)


def mixture_error(truth: Mapping[str, float], predicted: Mapping[str, float]) -> dict[str, float]:
    """Mean squared error (the paper's metric) and the largest absolute error between two mixtures."""
    diffs = [predicted.get(k, 0.0) - v for k, v in truth.items()]
    return {"mse": float(np.mean(np.square(diffs))), "max_abs": float(np.max(np.abs(diffs)))}


# ---------------------------------------------------------------- CLI


def build_parser() -> CommandParser:
    parser = CommandParser(prog="lorakit infer-mixture", field_flags={"n_merges": "--merges"},
                           formatter_class=DefaultsFormatter, description=(
        "Infer the category proportions of a BPE tokenizer's training data from its merge list "
        "(Hayase et al., arXiv 2407.16607)."))
    parser.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.json or a folder with one")
    parser.add_argument("--category", action="append", default=[], metavar="NAME=FILE",
                        help="sample text of one category (repeat); a FILE may be a folder, whose .txt, .py, .md and .rst "
                             "files (in every subfolder) are read")
    parser.add_argument("--domains", default="", metavar="NAMES",
                        help="use lorakit's pretraining domains as categories, e.g. code,docstrings,docs,tasks")
    parser.add_argument("--sample-chars", type=int, default=300_000, help="characters per domain with --domains")
    parser.add_argument("--merges", type=int, default=1000,
                        help="how many leading merges to use (at most the tokenizer's)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here (default: printed only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser


def check_unique_categories(names: Sequence[str]) -> None:
    """Raise ``ConfigError`` naming any category given twice (``--category`` names and ``--domains`` together):
    a repeat would silently replace the first sample text with the second, and the LP would solve for one
    category fewer than the user listed."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"Category name given more than once: {', '.join(map(repr, repeated))}. Each --category "
                          "NAME and --domains name must be distinct (a repeat would replace the first sample text); "
                          "put one category's sample files in one folder, or give them different names.")


def _read_category(spec: str) -> tuple[str, list[str]]:
    name, sep, where = spec.partition("=")
    if not sep or not name or not where:
        raise ConfigError(f"--category expects NAME=FILE, got {spec!r}.")
    path = Path(where)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".py", ".md", ".rst"))
    elif path.exists():
        files = [path]
    else:
        raise ConfigError(f"Sample text for category {name!r} not found: {path}.")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if not any(texts):
        raise ConfigError(f"Category {name!r} has no text in {path}.")
    return name, texts


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        names = comma_items(args.domains, "--domains", "domain names")
        check_unique_categories([spec.partition("=")[0] for spec in args.category] + names)
        if names and args.sample_chars <= 0:
            raise ConfigError(f"--sample-chars must be > 0 (characters of each --domains sample), got {args.sample_chars}.")
        if args.out and os.path.isdir(args.out):
            raise ConfigError(f"--out {args.out} is a folder; give the path of the JSON file to write.")
        if args.out:  # an existing file (without --overwrite) or an unwritable place: said now, not after the run
            check_output_file(args.out, "--out", overwrite=args.overwrite)
        tokenizer = load_bpe(args.tokenizer)
        if args.merges > len(tokenizer.merges):  # said now: replaying every merge can take minutes
            print(f"lorakit infer-mixture: --merges {args.merges} is more than the {len(tokenizer.merges)} merges of "
                  f"{tokenizer.name}; using all {len(tokenizer.merges)}", file=sys.stderr)
        texts = dict(_read_category(spec) for spec in args.category)
        if names:
            from lorakit.pretrain.domains import DOMAINS, domain_documents

            scale = {n: args.sample_chars / DOMAINS[n].natural_chars for n in names if n in DOMAINS}
            for n in names:
                texts[n] = domain_documents([n], scale.get(n, 1.0), seed=1)[n]
        if len(texts) < 2:
            raise ConfigError("Give at least two categories (--category NAME=FILE or --domains a,b).")
        # at most the tokenizer's merges: the shortfall was said above (infer_from_texts would warn a second time)
        result = infer_from_texts(tokenizer, texts, min(args.merges, len(tokenizer.merges)))
    except LorakitError as err:  # ConfigError and the output check's
        return parser.fail(err)
    except KeyboardInterrupt:  # Ctrl-C: nothing is written before the result, so nothing is half-written
        print(f"\n{parser.prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    report = {"tokenizer": tokenizer.name, **result.to_dict()}
    print(json.dumps(report, indent=2))  # first: a failing --out loses nothing
    if args.out:
        try:
            atomic_write_json(args.out, report)  # makes the missing parent folders
        except OSError as err:
            return parser.fail(f"--out {args.out}: {err.strerror or err}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
