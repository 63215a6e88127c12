"""Recipe: controllable generation (after controllable protein generation with a small LM + LoRA).

    python examples/controllable_generation/run.py       # the bundled base model, CPU, offline

A small causal LM (lorakit's bundled base, pretrained on stdlib text) is fine-tuned with LoRA
(``lorakit train``) to generate a sequence conditioned on a property tag: ``<tag=class>`` then a name. The sequences
are real Python standard-library identifiers and the property is their naming style, checked exactly by a regular
expression (``identifiers.py``). For each tag the script samples names (temperature 1) and measures:

- **property**: the share of samples that have the requested property (the checker);
- **novel**: the share of samples with the property that are not training names (generation, not recall);
- **real**: the share of those novel ones that the standard library really defines (held-out names);
- **unique**: distinct samples / samples.

Rows: the base model prompted with the tag, the base model prompted with ``--shots`` training names of the tag
before the tag (few-shot), and the LoRA model prompted with the tag. Writes ``--out``/results.json and results.md.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch

from lorakit.io.files import atomic_write_bytes, atomic_write_json

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from identifiers import TAGS, has_property, is_train, prompt_for, stdlib_identifiers  # noqa: E402


def build_data(out: Path, per_tag: int, seed: int) -> tuple[dict[str, list[str]], set[str]]:
    """train.jsonl ({"prompt": "<tag=T>", "completion": " name"}), at most ``per_tag`` names per tag, shuffled; returns
    the training names per tag and every stdlib name of any split."""
    found = stdlib_identifiers()
    rng = random.Random(seed)
    train = {tag: sorted(n for n in names if is_train(n)) for tag, names in found.items()}
    for tag in TAGS:
        rng.shuffle(train[tag])
        train[tag] = train[tag][:per_tag]
    rows = [{"prompt": prompt_for(tag), "completion": " " + name} for tag in TAGS for name in train[tag]]
    rng.shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return train, set().union(*found.values())


@torch.no_grad()
def sample(model, tokenizer, prompt: str, n: int, max_new_tokens: int, seed: int) -> list[str]:
    """``n`` sampled continuations of ``prompt`` (temperature 1, full distribution), each cut at the first newline or
    EOS and stripped: the generated name."""
    from lorakit.data import encode_prompt

    ids = torch.tensor([encode_prompt(tokenizer, prompt)] * n)  # (n, T): one prompt, no padding needed
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return [(t.strip().split("\n")[0].split() or [""])[0] for t in texts]


COUNTS = ("samples", "with_property", "novel_count", "real_count", "distinct")


def score(samples: list[str], tag: str, train_names: set[str], stdlib: set[str]) -> dict:
    ok = [s for s in samples if has_property(s, tag)]
    novel = [s for s in ok if s not in train_names]
    counts = dict(zip(COUNTS, (len(samples), len(ok), len(novel), sum(s in stdlib for s in novel), len(set(samples)))))
    return {**rates(counts), **counts, "examples": sorted(set(novel))[:5]}


def rates(c: dict) -> dict:
    """property / novel / real / unique from counts (a rate over nothing is 0)."""
    return {"property": c["with_property"] / c["samples"], "novel": c["novel_count"] / max(c["with_property"], 1),
            "real": c["real_count"] / max(c["novel_count"], 1), "unique": c["distinct"] / c["samples"]}


def evaluate(model, tokenizer, prompts: dict[str, str], args, train_names, stdlib) -> dict:
    """Per-tag scores and the rates over all tags' samples pooled."""
    model.eval()
    per_tag = {tag: score(sample(model, tokenizer, prompts[tag], args.samples, args.max_new_tokens, args.seed + i),
                          tag, train_names, stdlib) for i, tag in enumerate(TAGS)}
    return {"per_tag": per_tag, **rates({k: sum(r[k] for r in per_tag.values()) for k in COUNTS})}


def table(rows: dict[str, dict]) -> str:
    lines = ["| model | " + " | ".join(f"property: {t}" for t in TAGS) + " | property (all) | novel | real | unique |",
             "|---" * (len(TAGS) + 5) + "|"]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{r['per_tag'][t]['property']:.2f}" for t in TAGS)
                     + f" | {r['property']:.2f} | {r['novel']:.2f} | {r['real']:.2f} | {r['unique']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    from lorakit.cli_parser import CommandParser, DefaultsFormatter, non_negative_int, positive_int, seed_arg

    # counts checked by their flags before any work (was: --samples 0 an IndexError traceback after training,
    # --max-new-tokens 0 transformers' ValueError, --shots -1 prompts of "-" shown as results)
    parser = CommandParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--model", default=None, help="causal LM folder (default: lorakit's bundled base)")
    parser.add_argument("--out", default="runs/controllable_generation", help="output folder")
    parser.add_argument("--per-tag", type=positive_int, default=400, help="training names per tag (at most)")
    parser.add_argument("--steps", type=positive_int, default=300, help="LoRA optimizer steps")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="examples per optimizer step")
    parser.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate")
    parser.add_argument("--r", type=positive_int, default=8, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--samples", type=positive_int, default=100, help="samples per tag")
    parser.add_argument("--shots", type=non_negative_int, default=5,
                        help="names of the tag in the few-shot base prompt")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16,
                        help="tokens generated per sample (greedy stops at the end of a name)")
    parser.add_argument("--seed", type=seed_arg, default=0, help="seed of the data, training and sampling")
    args = parser.parse_args(argv)

    from lorakit import load_adapter
    from lorakit.cli import main as lorakit_main
    from lorakit.hub import load_model_and_tokenizer

    out = Path(args.out)
    train, stdlib = build_data(out / "data", args.per_tag, args.seed)
    train_names = set().union(*train.values())
    print(f"data: {len(train_names)} training names ({', '.join(f'{t} {len(v)}' for t, v in train.items())}); "
          f"{len(stdlib)} stdlib names in all")
    tag_prompts = {tag: prompt_for(tag) for tag in TAGS}
    few_shot = {tag: "".join(f"{prompt_for(tag)} {name}\n" for name in train[tag][: args.shots]) + prompt_for(tag)
                for tag in TAGS}

    rows = {}
    model, tokenizer = load_model_and_tokenizer(args.model)
    rows["base, tag prompt"] = evaluate(model, tokenizer, tag_prompts, args, train_names, stdlib)
    rows[f"base, {args.shots}-shot prompt"] = evaluate(model, tokenizer, few_shot, args, train_names, stdlib)

    argv = ["train", "--data", str(out / "data" / "train.jsonl"), "--eval-examples", "32", "--steps",
            str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--r", str(args.r),
            "--lora-alpha", str(2 * args.r), "--max-length", "32", "--seed", str(args.seed),
            "--output", str(out / "lora"), "--overwrite", "--quiet"] + (["--model", args.model] if args.model else [])
    print("$ lorakit " + " ".join(argv), flush=True)
    if lorakit_main(argv) != 0:
        raise SystemExit("lorakit train failed")
    load_adapter(model, out / "lora" / "adapter")
    rows[f"LoRA r={args.r}, tag prompt"] = evaluate(model, tokenizer, tag_prompts, args, train_names, stdlib)

    text = table(rows)
    print(text)
    for label, r in rows.items():
        print(f"{label}: novel names with the property, e.g. " +
              "; ".join(f"{t}: {', '.join(r['per_tag'][t]['examples'][:3]) or '-'}" for t in TAGS))
    atomic_write_json(out / "results.json", {"rows": rows, "args": vars(args)})
    atomic_write_bytes(out / "results.md", (text + "\n").encode())
    return rows


if __name__ == "__main__":
    main()
