"""Step time of `lorakit pretrain-base`'s training step on this CPU: fp32 vs bf16 autocast, side by side.

One process, one thread; fp32 and bf16 steps are interleaved round by round (two models with the same
initialisation, each kept across rounds) so machine load hits both alike. The step is the loop's own:
forward under ``torch.autocast("cpu", bfloat16, enabled=bf16)``, backward, clip, AdamW, schedule. Token ids are
random (a step's cost does not depend on them). Reports the median wall and process-CPU seconds per step and
the bf16 / fp32 ratios.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 15 python benchmarks/pretrain_bf16/step_time.py \
        --out benchmarks/pretrain_bf16/step_time.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lorakit.assets import BASE_MODEL_PATH
from lorakit.pretrain.train import (
    PretrainConfig, build_model, load_pretrained_tokenizer, lr_lambda, make_optimizer,
)

SHAPES = {  # the RegMix proxy's shape and the bundled base's (src/lorakit/assets/base_model/pretrain_info.json)
    "proxy": dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=172, seq_len=64),
    "bundled": dict(hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=688, seq_len=128),
}


def make_step(config: PretrainConfig, tokenizer, generator: torch.Generator):
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    model.train()
    vocab = len(tokenizer)

    def step() -> None:
        batch = torch.randint(vocab, (config.batch_size, config.seq_len), generator=generator)  # (B, T)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(shape: str, rounds: int, steps: int, batch_size: int) -> dict:
    tokenizer = load_pretrained_tokenizer(BASE_MODEL_PATH, 256)
    steppers = {}
    for bf16 in (False, True):
        config = PretrainConfig(**SHAPES[shape], max_position_embeddings=256, batch_size=batch_size, bf16=bf16,
                                num_threads=1, warmup_steps=1)
        steppers["bf16" if bf16 else "fp32"] = make_step(config, tokenizer, torch.Generator().manual_seed(0))
    for step in steppers.values():  # warm-up: allocator, autocast caches
        step()
    wall = {k: [] for k in steppers}
    cpu = {k: [] for k in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            for _ in range(steps):
                w0, c0 = time.perf_counter(), time.process_time()
                step()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    row = {"shape": shape, **SHAPES[shape], "batch_size": batch_size, "steps_each": rounds * steps}
    for name in steppers:
        row[f"{name}_wall_s"] = round(med(wall[name]), 4)
        row[f"{name}_cpu_s"] = round(med(cpu[name]), 4)
    row["bf16_over_fp32_wall"] = round(row["bf16_wall_s"] / row["fp32_wall_s"], 2)
    row["bf16_over_fp32_cpu"] = round(row["bf16_cpu_s"] / row["fp32_cpu_s"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="proxy,bundled")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="steps per mode per round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for shape in args.shapes.split(","):
        rows.append(measure(shape, args.rounds, args.steps, args.batch_size))
        print(json.dumps(rows[-1]), flush=True)
    report = {"rows": rows, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
