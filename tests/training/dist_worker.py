"""Runs under ``python -m torch.distributed.run --nproc-per-node 2 dist_worker.py OUT [resume-checkpoint]`` (gloo, CPU)
for tests/training/test_training_distributed.py: trains the scenarios of ``SCENARIOS`` with 2 processes and writes
what each rank ended with under OUT (rank 0: ``<name>.safetensors`` + ``<name>.json``; every rank: its records).
The same builders make the single-process references in the test, so both sides start from identical models."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import lorakit
from lorakit.core.model import adapter_layers
from lorakit.data import load_examples
from lorakit.io.files import save_tensors
from lorakit.io.peft_format import adapter_state_dict
from lorakit.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lk_models import tiny_llama_for, word_level_tokenizer  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]


def data():
    train_examples = load_examples("reverse", "train", n=32, seed=0)
    eval_examples = load_examples("reverse", "test", n=5, seed=0)
    return train_examples, eval_examples, word_level_tokenizer(train_examples + eval_examples)


def build(tokenizer, kind: str, layers: int = 2):
    """A tiny Llama (seed 0, ``layers`` blocks) with adapter "default" of ``kind``."""
    model = tiny_llama_for(tokenizer, seed=0, num_hidden_layers=layers)
    if kind == "lora":
        config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian")
    elif kind == "mixlora":
        from lorakit.methods.mixlora import MixLoraConfig
        config = MixLoraConfig(target_modules=["mlp"], num_experts=4, top_k=2, r=4, lora_dropout=0.0,
                               router_aux_loss_coef=0.5)
    elif kind == "dylora":
        from lorakit.methods.dylora import DyLoraConfig
        config = DyLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.3)
    elif kind == "smora":  # no dropout: the router sees the same rows as one process's
        from lorakit.methods.smora import SmoraConfig
        config = SmoraConfig(r=8, top_k=2, lora_alpha=4, lora_dropout=0.0, bias_update_rate=1e-2,
                             target_modules=TARGETS)
    elif kind == "increlora":
        from lorakit.methods.increlora import IncreLoraConfig
        config = IncreLoraConfig(r=2, target_rank=4, init_warmup=2, incre_interval=2, top_h=2, target_modules=TARGETS)
    elif kind == "ffa_lora":  # A frozen at its init
        from lorakit.methods.ffa_lora import FfaLoraConfig
        config = FfaLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian")
    else:
        raise ValueError(kind)
    return lorakit.add_adapter(model, config)


def train_config(per_process_batch: int, **overrides) -> TrainConfig:
    """The runs compared: 2 processes at batch 2 against 1 process at batch 4 (same global batch)."""
    base = dict(steps=3, batch_size=per_process_batch, grad_accum=2, lr=1e-2, max_length=32, seed=0, log_every=1,
                warmup_steps=0, lr_schedule="linear", device="cpu")
    return TrainConfig(**{**base, **overrides})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_state_dict(model, "default").items()}


def blocks_trainable(model) -> list[bool]:
    return [any(p.requires_grad for n, p in block.named_parameters() if ".adapters." not in n)
            for block in model.model.layers]


def main(out: Path, resume: str | None) -> None:
    train_examples, eval_examples, tokenizer = data()
    rank = int(os.environ["RANK"])
    records: dict[str, object] = {}

    def finish(name: str, model, result=None, **extra) -> None:
        state = weights(model)
        # every rank holds the same adapter (replicated training): compare with rank 0's
        gathered = [None, None]
        dist.all_gather_object(gathered, {k: v for k, v in state.items()})
        same = all(torch.equal(gathered[0][k], gathered[1][k]) for k in state)
        records[name] = {"ranks_identical": same, **extra}
        if result is not None:
            records[name].update(losses=result.losses, final_metrics=result.final_metrics,
                                 router_stats=result.router_stats, adapter_dir=result.adapter_dir,
                                 checkpoints=result.checkpoints)
        if rank == 0:
            save_tensors(out / f"{name}.safetensors", state)

    import lorakit.data.collate as collate

    tokenize, tokenized = collate.tokenize_example, []

    def counting(example, *args, **kwargs):  # which training examples this process tokenizes (lazily)
        tokenized.append(example.prompt)
        return tokenize(example, *args, **kwargs)

    for mode in ("ddp", "fsdp"):
        collate.tokenize_example, tokenized[:] = counting, []
        model = build(tokenizer, "lora")
        result = train(model, tokenizer, train_examples, train_config(2, distributed=mode, eval_every=3),
                       eval_examples=eval_examples, progress=False)
        collate.tokenize_example = tokenize
        train_prompts = {ex.prompt for ex in train_examples}
        finish(mode, model, result, tokenized=sorted({p for p in tokenized if p in train_prompts}))

    # checkpoint at step 2 of 4, written by 2 processes (the test resumes it with 1)
    model = build(tokenizer, "lora")
    result = train(model, tokenizer, train_examples, train_config(2, steps=4, save_every=2, output_dir=str(out / "run2")),
                   progress=False)
    finish("ddp_4steps", model, result)

    if resume is not None:  # a checkpoint written by 1 process, resumed here by 2
        model = build(tokenizer, "lora")
        result = train(model, tokenizer, train_examples, train_config(2, steps=4, resume_from=resume), progress=False)
        finish("resumed_1to2", model, result)

    model = build(tokenizer, "mixlora")
    result = train(model, tokenizer, train_examples, train_config(2), progress=False)
    finish("mixlora", model, result)

    # DyLoRA with dropout: the ranks' RNG streams drift apart (different shapes draw different amounts), yet the
    # sampled rank of every step must be the same everywhere.
    model = build(tokenizer, "dylora")
    drawn: list[int] = []
    layer = next(layer for _, layer in adapter_layers(model))
    result = train(model, tokenizer, train_examples, train_config(2, steps=6), progress=False,
                   on_log=[lambda record: drawn.append(int(layer.adapters["default"].train_rank))])
    own_draws = torch.rand(4).tolist()  # this rank's global RNG after training
    finish("dylora", model, result, drawn=drawn, own_rng=own_draws)

    model = build(tokenizer, "lora", layers=4)  # 4 blocks: LISA's draws for seed 0 vary (2 blocks: always block 1)
    active: list[list[bool]] = []
    result = train(model, tokenizer, train_examples,
                   train_config(2, steps=4, procedure="lisa",
                                procedure_args={"lisa_activated_layers": 1, "lisa_interval_steps": 1}),
                   progress=False, on_log=[lambda record: active.append(blocks_trainable(model))])
    finish("lisa", model, result, active=active,
           blocks={n: p.detach().clone().tolist() for n, p in model.model.layers.named_parameters()
                   if ".adapters." not in n and "q_proj" in n})

    # 2 processes × batch 2 × grad_accum 1: the test compares with 1 process × batch 2 × grad_accum 2 (same 4 rows)
    model = build(tokenizer, "lora")
    result = train(model, tokenizer, train_examples, train_config(2, grad_accum=1), progress=False)
    finish("accum1", model, result)

    # dropout masks of one LoRA layer's first forwards; max_length 4 truncates every row to 4 tokens, so both ranks
    # draw masks of one shape (same shapes and one seed drew the same masks on both)
    model = tiny_llama_for(tokenizer, seed=0, num_hidden_layers=2)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.5))
    dropout = next(layer for _, layer in adapter_layers(model)).adapters["default"].lora_dropout
    masks: list[list[bool]] = []
    dropout.register_forward_hook(lambda m, i, o: masks.append((o != 0).flatten().tolist()) if m.training else None)
    train(model, tokenizer, train_examples, train_config(2, steps=2, grad_accum=1, max_length=4), progress=False)
    records["dropout_masks"] = masks

    # SMoRA moves its balancing bias by every forward's per-rank token counts: counted over both processes, the bias
    # stays one (max_length 10: every row is 10 tokens, so the padding positions it counts are one process's too)
    model = build(tokenizer, "smora")
    result = train(model, tokenizer, train_examples, train_config(2, max_length=10), progress=False)
    finish("smora", model, result)

    # IncreLoRA allocates ranks by importance scores read from each process's own gradient
    model = build(tokenizer, "increlora")
    result = train(model, tokenizer, train_examples, train_config(2, steps=6), progress=False)
    from lorakit.methods.increlora import rank_pattern
    finish("increlora", model, result, ranks=rank_pattern(model, "default"))

    # FSDP with a tensor the method freezes (FFA-LoRA's A): the saved adapter holds it whole
    model = build(tokenizer, "ffa_lora")
    result = train(model, tokenizer, train_examples,
                   train_config(2, distributed="fsdp", save_every=3, output_dir=str(out / "ffa_fsdp")), progress=False)
    records["ffa_fsdp"] = {"adapter_dir": result.adapter_dir}

    # GaLore's per-layer mode steps inside backward, before gradients are averaged: refused on every process
    from lorakit.core.errors import ConfigError
    try:
        train_config(2, procedure="galore")
        records["galore_per_layer"] = None
    except ConfigError as error:
        records["galore_per_layer"] = str(error)

    try:  # LoRAPrune edits base weights whole: FSDP's sharded base is refused by name
        train_config(2, distributed="fsdp", procedure="loraprune")
        records["loraprune_fsdp"] = None
    except ConfigError as error:
        records["loraprune_fsdp"] = str(error)

    # a process started with another option, or reading another copy of the data: refused on every process
    for name, options, examples in (("other_lr", {"lr": 1e-2 if rank == 0 else 2e-2}, train_examples),
                                    ("other_data", {}, train_examples if rank == 0 else train_examples[:-1])):
        try:
            train(build(tokenizer, "lora"), tokenizer, examples, train_config(2, steps=1, **options), progress=False)
            records[name] = None
        except ConfigError as error:
            records[name] = str(error)

    # a process whose copy of the data fails a check of the loop (here: it is empty): the comparison comes first,
    # so every process is refused by it (was: that process raised alone, the others waited in the comparison)
    try:
        train(build(tokenizer, "lora"), tokenizer, train_examples if rank == 0 else [], train_config(2, steps=1),
              progress=False)
        records["empty_data"] = None
    except (ConfigError, ValueError) as error:
        records["empty_data"] = f"{type(error).__name__}: {error}"

    (out / f"records-{rank}.json").write_text(json.dumps(records))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
