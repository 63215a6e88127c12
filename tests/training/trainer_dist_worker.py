"""Runs under ``python -m torch.distributed.run --nproc-per-node 2 trainer_dist_worker.py OUT`` (gloo, CPU) for
tests/training/test_training_trainer_init.py: transformers.Trainer + LorakitCallback on a tiny Llama whose adapter's
config names a data-driven init (CorDA). Each rank writes ``OUT/rank<k>.json``: the error it got (or none) and
whether the adapter was left as add_adapter made it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import lorakit
from lorakit.data import CausalLMCollator, TokenizedDataset, load_examples
from lorakit.training import LorakitCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lk_models import tiny_llama_for, word_level_tokenizer  # noqa: E402


def main(out: Path) -> None:
    examples = load_examples("reverse", "train", n=16, seed=0)
    tokenizer = word_level_tokenizer(examples)
    model = lorakit.add_adapter(tiny_llama_for(tokenizer), lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="corda"))
    before = {k: v.clone() for k, v in lorakit.adapter_state_dict(model).items()}
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=1, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", use_cpu=True, ddp_backend="gloo", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenizedDataset(examples, tokenizer, max_length=64),
                      data_collator=CausalLMCollator.from_tokenizer(tokenizer), callbacks=[LorakitCallback()])
    error = None
    try:
        trainer.train()
    except lorakit.ConfigError as e:
        error = str(e)
    after = lorakit.adapter_state_dict(model)
    record = {"world_size": args.world_size, "error": error, "global_step": trainer.state.global_step,
              "adapter_unchanged": all(torch.equal(after[k], before[k]) for k in before)}
    (out / f"rank{args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
