"""Few-shot prompting vs QLoRA on a question-answering set built from the Python standard library.

The question: "which module defines the function <name>?" (``module_of: heappush => heapq``). Facts are parsed
with ``ast`` from the CPython source files installed on this machine (``lorakit.data.tasks.stdlib_function_facts``:
588 public top-level functions of 54 modules; the 69 names that two modules define, such as ``abspath`` in
``posixpath`` and ``ntpath``, are dropped, leaving 519 questions), so every answer is true of real text the bundled base read while it
was pretrained (the stdlib source was half its corpus), but this question format never was. Functions are split
into train / test by a stable hash of their qualified name (the built-in tasks' partition): a test function is
never a demonstration nor a training example.

- k-shot prompting: k train questions with their answers, one per line, then the test question; the frozen
  bundled base answers greedily. The base has 256 positions, so k stops where the longest prompt + answer no
  longer fits (23 shots here); the script prints that k and measures any larger k there instead.
- QLoRA: the same base loaded in 4-bit NF4 (bitsandbytes, double quantization), a LoRA on every linear layer,
  trained on the first n train questions (the k-shot demonstrations are the first k of the same order), then
  asked the test question with no demonstrations.

Metric: exact match of the first whitespace-separated word of the completion with the module name (the same
rule for both), over the test functions. The majority-class rate (always answer the most common train module)
is printed as the floor.

Usage (from this folder; about 15 minutes on one free CPU core at the defaults, 40 on a shared one):

    python fewshot_vs_qlora.py                       # writes results/fewshot_vs_qlora.{json,md,png}
    python fewshot_vs_qlora.py --quick               # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch

import lorakit as lk
from lorakit.io.files import atomic_write_bytes
from lorakit.data.collate import encode_prompt
from lorakit.data.evaluate import generate_completions
from lorakit.data.example import Example
from lorakit.data.tasks import is_held_out, stable_seed, stdlib_function_facts
from lorakit.hub import load_model_and_tokenizer
from lorakit.training import TrainConfig, train

TASK = "module_of"


def build_qa(seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, test) questions about the functions whose name only one module defines; train in a seeded random
    order (its first k are the k demonstrations)."""
    train_set, test_set = [], []
    facts = stdlib_function_facts()
    defined_in = Counter(f.name for f in facts)
    for fact in facts:
        if defined_in[fact.name] > 1:  # abspath is in posixpath and ntpath: no single right answer
            continue
        example = Example(f"{TASK}: {fact.name} =>", f" {fact.module}", task=None)
        (test_set if is_held_out(fact.qualname) else train_set).append(example)
    random.Random(stable_seed(TASK, seed)).shuffle(train_set)
    return train_set, test_set


def first_word(text: str) -> str:
    words = text.split()
    return words[0] if words else ""


def accuracy(predictions: list[str], examples: list[Example]) -> float:
    return sum(first_word(p) == e.completion.strip() for p, e in zip(predictions, examples)) / len(examples)


def kshot_prompt(demos: list[Example], question: Example) -> str:
    """k solved questions, one per line, then the question: ``module_of: a => m\\n...module_of: q =>``."""
    return "".join(f"{d.prompt}{d.completion}\n" for d in demos) + question.prompt


def max_shots(tokenizer, train_set: list[Example], test_set: list[Example], positions: int, new_tokens: int) -> int:
    """The largest k whose longest prompt (k demonstrations + a test question) leaves room for the answer."""
    longest = max(test_set, key=lambda e: len(tokenizer(e.prompt).input_ids))
    k = 0
    while k < len(train_set) and len(tokenizer(kshot_prompt(train_set[:k + 1], longest)).input_ids) + new_tokens \
            <= positions:
        k += 1
    return k


@torch.no_grad()
def choice_scores(model, tokenizer, prompt: str, choices: list[str]) -> torch.Tensor:
    """(C,) summed log-probability of each choice's tokens (``" " + choice``) after ``prompt``. The prompt runs
    once; its key/value cache is repeated over the choices, which run as one right-padded batch."""
    device = next(model.parameters()).device
    options = [tokenizer.encode(f" {c}", add_special_tokens=False) for c in choices]
    width = max(map(len, options))
    ids = torch.full((len(options), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(options), width), dtype=torch.long, device=device)
    for row, tokens in enumerate(options):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    prompt_ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)  # (1, P)
    out = model(input_ids=prompt_ids, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(options))
    attention = torch.cat([torch.ones_like(prompt_ids).expand(len(options), -1), mask], 1)  # (C, P + width)
    logp = model(input_ids=ids, attention_mask=attention, past_key_values=cache).logits.log_softmax(-1)
    first = out.logits[0, -1].log_softmax(-1)[ids[:, 0]]  # (C,) each choice's first token, after the prompt
    rest = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # (C, width - 1) each next token
    return first + (rest * mask[:, 1:]).sum(1)


def closed_set_accuracy(model, tokenizer, prompts: list[str], test_set: list[Example], choices: list[str]) -> float:
    """Multiple choice over every module name: the answer is the choice with the highest summed log-probability
    of its tokens after the prompt (GPT-3's ranking for multiple-choice tasks)."""
    was_training = model.training
    model.eval()
    correct = sum(choices[int(choice_scores(model, tokenizer, prompt, choices).argmax())] == q.completion.strip()
                  for prompt, q in zip(prompts, test_set))
    model.train(was_training)
    return correct / len(test_set)


def scores(model, tokenizer, prompts: list[str], test_set: list[Example], choices: list[str],
           new_tokens: int) -> dict[str, float]:
    """{"exact_match": greedy generation's first word, "closed_set": ranking the module names}."""
    generated = generate_completions(model, tokenizer, prompts, max_new_tokens=new_tokens)
    return {"exact_match": accuracy(generated, test_set),
            "closed_set": closed_set_accuracy(model, tokenizer, prompts, test_set, choices)}


def qlora_scores(model_path, train_set, test_set, choices, n: int, args) -> dict[str, float]:
    """Train a fresh LoRA on the 4-bit base with the first n questions, then score it 0-shot (+ "seconds")."""
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(model_path, quantize="nf4")
    lk.add_adapter(model, lk.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
    config = TrainConfig(steps=args.steps, batch_size=min(args.batch_size, n), lr=args.lr, warmup_ratio=0.1,
                         seed=args.seed, log_every=max(args.steps, 1), device="cpu")
    train(model, tokenizer, train_set[:n], config, progress=False)
    result = scores(model, tokenizer, [q.prompt for q in test_set], test_set, choices, args.new_tokens)
    return {**result, "seconds": round(time.perf_counter() - start, 1)}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric, title in ((axes[0], "closed_set", "multiple choice over the module names"),
                              (axes[1], "exact_match", "free generation (greedy, first word)")):
        for name, key in (("k-shot prompting (frozen base)", "prompting"), ("QLoRA (NF4 base + LoRA), 0-shot", "qlora")):
            rows = results[key]
            ax.plot([max(r["n"], 0.5) for r in rows], [r[metric] for r in rows], marker="o", label=name)
        ax.axhline(results["majority_accuracy"], color="grey", ls="--", lw=1, label="majority class")
        ax.axhline(1 / results["n_choices"], color="grey", ls=":", lw=1, label="chance (1 / #modules)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k examples (shots / training questions); k=0 at 0.5")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("accuracy on held-out functions")
    axes[0].legend(fontsize=8)
    fig.suptitle("Which stdlib module defines f? Bundled 5.4M base, 256 positions", fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    plt.close(fig)


def markdown(results: dict) -> str:
    rows = {(key, r["n"]): r for key in ("prompting", "qlora") for r in results[key]}
    lines = [f"test questions: {results['n_test']} | train pool: {results['n_train']} | choices: "
             f"{results['n_choices']} modules | majority class: {results['majority_accuracy']:.3f} | "
             f"largest k that fits 256 positions: {results['max_shots']}", "",
             "| k | prompting: multiple choice | prompting: generation | QLoRA: multiple choice | QLoRA: generation |",
             "|---:|---:|---:|---:|---:|"]
    for n in sorted({n for _, n in rows}):
        cells = [f"{rows[(key, n)][metric]:.3f}" if (key, n) in rows else "n/a"
                 for key in ("prompting", "qlora") for metric in ("closed_set", "exact_match")]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from lorakit.cli_parser import DefaultsFormatter, seed_arg

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    p.add_argument("--model", default=None, help="causal LM folder (default: lorakit's bundled base)")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 2, 8, 16, 24],
                   help="demonstrations in the prompt, one row each")
    p.add_argument("--train-sizes", type=int, nargs="*", default=[4, 32, 10000], help="capped at the train pool")
    p.add_argument("--steps", type=int, default=100, help="QLoRA optimizer steps per run (same for every n)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3, help="QLoRA learning rate")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    p.add_argument("--test-size", type=int, default=None, help="first N test questions (default: all)")
    p.add_argument("--new-tokens", type=int, default=6, help="tokens generated per answer")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the split, demonstrations and training")
    p.add_argument("--out", default="results", help="folder for fewshot_vs_qlora.{json,md,png}")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = p.parse_args(argv)
    for flag, values, low in (("--shots", args.shots, 0), ("--train-sizes", args.train_sizes, 1),
                              ("--steps", [args.steps], 1), ("--batch-size", [args.batch_size], 1), ("--r", [args.r], 1),
                              ("--new-tokens", [args.new_tokens], 1),
                              ("--test-size", [] if args.test_size is None else [args.test_size], 1)):
        if any(v < low for v in values):  # said before the model loads, not after the prompting runs
            p.error(f"{flag} takes integers >= {low}, got {' '.join(map(str, values))}")
    if not 0 < args.lr < float("inf"):
        p.error(f"--lr must be > 0 and finite, got {args.lr}")
    if args.quick:
        args.shots, args.train_sizes, args.steps, args.test_size = [0, 2], [4], 3, 8
    torch.manual_seed(args.seed)

    train_set, test_set = build_qa(args.seed)
    test_set = test_set[: args.test_size] if args.test_size else test_set
    choices = sorted({e.completion.strip() for e in train_set + test_set})
    majority = Counter(e.completion for e in train_set).most_common(1)[0][0]
    results = {"task": TASK, "n_train": len(train_set), "n_test": len(test_set), "n_choices": len(choices),
               "majority_answer": majority.strip(),
               "majority_accuracy": sum(e.completion == majority for e in test_set) / len(test_set),
               "config": {k: v for k, v in vars(args).items() if k != "quick"}, "prompting": [], "qlora": []}
    model, tokenizer = load_model_and_tokenizer(args.model)
    results["max_shots"] = fit = max_shots(tokenizer, train_set, test_set, model.config.max_position_embeddings,
                                            max(args.new_tokens, 8))
    print(f"{len(train_set)} train / {len(test_set)} test questions, {len(choices)} modules; majority class "
          f"{majority.strip()!r} = {results['majority_accuracy']:.3f}; at most {fit} shots fit in "
          f"{model.config.max_position_embeddings} positions")
    for k in sorted({min(k, fit) for k in args.shots}):  # a k that does not fit is measured at the largest that does
        result = scores(model, tokenizer, [kshot_prompt(train_set[:k], q) for q in test_set], test_set, choices,
                        args.new_tokens)
        results["prompting"].append({"n": k, **result})
        print(f"prompting k={k:3d}: multiple choice {result['closed_set']:.3f}, generation {result['exact_match']:.3f}",
              flush=True)
    for n in args.train_sizes:
        n = min(n, len(train_set))
        result = qlora_scores(args.model, train_set, test_set, choices, n, args)
        results["qlora"].append({"n": n, **result})
        print(f"QLoRA     n={n:3d}: multiple choice {result['closed_set']:.3f}, generation {result['exact_match']:.3f}"
              f"  ({result['seconds']:.0f} s)", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # each file is written whole or not at all (temp file + rename)
    atomic_write_bytes(out / "fewshot_vs_qlora.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(out / "fewshot_vs_qlora.md", markdown(results).encode())
    plot(results, out / "fewshot_vs_qlora.png")
    print(markdown(results))
    print(f"wrote {out}/fewshot_vs_qlora.{{json,md,png}}")
    return results


if __name__ == "__main__":
    main()
