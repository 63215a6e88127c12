"""CUDA check of QLoRA (lorakit.quantize), LoRAPrune and LoRAM: run on a GPU machine from the repository root,

    PYTHONPATH=src python scripts/device/qlora_cuda.py [--out DIR]

It asserts (exit code 1 on failure) and prints one JSON summary:
1. quantize_model on CUDA gives the same NF4 codes as transformers' BitsAndBytesConfig loading;
2. LoRA on the 4-bit base equals PEFT + bitsandbytes (outputs and LoRA gradients), compute dtype float32 and
   bfloat16; files load both ways; dequantize_model + merge_and_unload reproduces the unmerged output;
3. the training loop runs QLoRA, LoRAPrune and LoRAM on the bundled model on CUDA;
4. ``lorakit bench perf --only qlora --device cuda`` (full profile): step-time ratios and CUDA peak memory of
   lorakit QLoRA vs PEFT QLoRA vs LoRA, also both QLoRAs with gradient checkpointing (QLoRA's own setting),
   written to DIR/perf.{json,md}.
Takes about 2-4 minutes on one GPU.
"""

import argparse
import copy
import json
import sys
import tempfile
import time

import torch

sys.path.insert(0, "tests")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/device-qlora")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of parts 1-3 (no perf row)")
    args = parser.parse_args()
    assert args.device == "cpu" or torch.cuda.is_available(), "needs CUDA"
    import peft
    from transformers import LlamaForCausalLM

    import lorakit as lk
    from lk_models import tiny_llama
    from lorakit.quantize import QuantizeConfig, dequantize_model, quantize_model

    dev, report, t0 = args.device, {}, time.time()
    targets = "all-linear"
    with tempfile.TemporaryDirectory() as folder:
        tiny_llama(seed=3).save_pretrained(folder)
        for dtype in ("float32", "bfloat16"):
            config = QuantizeConfig(compute_dtype=dtype)
            ours = quantize_model(LlamaForCausalLM.from_pretrained(folder).to(dev), config)
            ref = LlamaForCausalLM.from_pretrained(folder, quantization_config=config.to_transformers(),
                                                   device_map={"": dev})
            same = all(torch.equal(a.data, b.data) for a, b in zip(ours.parameters(), ref.parameters()))
            torch.manual_seed(0)
            lk.add_adapter(ours, lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
            theirs = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
            peft.set_peft_model_state_dict(theirs, lk.adapter_state_dict(ours))
            ids = torch.randint(0, 96, (2, 9), device=dev)
            ours.train(), theirs.train()
            lo, lt = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
            out_diff = (lo.logits - lt.logits).abs().max().item()
            lo.loss.backward(), lt.loss.backward()
            go = [p.grad for p in ours.parameters() if p.requires_grad]
            gt = [p.grad for p in theirs.parameters() if p.requires_grad]
            grad_diff = max((a - b).abs().max().item() for a, b in zip(go, gt))
            with tempfile.TemporaryDirectory() as ad:
                lk.save_adapter(ours, ad)
                back = peft.PeftModel.from_pretrained(
                    LlamaForCausalLM.from_pretrained(folder, quantization_config=config.to_transformers(),
                                                     device_map={"": dev}), ad).eval()
                ours.eval()
                with torch.no_grad():
                    file_diff = (ours(input_ids=ids).logits - back(input_ids=ids).logits).abs().max().item()
                    before = ours(input_ids=ids).logits
                    merged = lk.merge_and_unload(dequantize_model(ours))
                    merge_diff = (merged(input_ids=ids).logits - before).abs().max().item()
            tol = 1e-4 if dtype == "float32" else 2e-2
            report[dtype] = {"same_codes": same, "out_diff": out_diff, "grad_diff": grad_diff, "file_diff": file_diff,
                             "merge_diff": merge_diff}
            assert same and out_diff <= tol and file_diff <= tol and merge_diff <= tol, report[dtype]

    from lorakit.data import load_examples
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.prune.loram import LoramConfig, loram_prune
    from lorakit.training import TrainConfig, train

    examples = load_examples("reverse", "train", n=64, seed=0)
    for name in ("qlora", "loraprune", "loram"):
        model, tok = load_model_and_tokenizer(None, quantize="nf4" if name == "qlora" else None, device=dev)
        if name == "loram":
            model = loram_prune(model, LoramConfig(ratio=0.5))[0]
        lk.add_adapter(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        proc = {"procedure": "loraprune", "procedure_args": {"prune_freq": 2}} if name == "loraprune" else {}
        result = train(model, tok, examples, TrainConfig(steps=10, batch_size=8, lr=2e-3, device=dev, **proc),
                       progress=False)
        report[f"train_{name}"] = {"loss_first": result.losses[0], "loss_last": result.losses[-1],
                                   "peak_memory_mb": result.peak_memory_mb}
        assert result.losses[-1] == result.losses[-1], name  # not NaN

    from lorakit.bench.cli import main as bench
    if dev == "cpu":
        print(json.dumps(report, indent=1, default=str))
        return 0
    assert bench(["perf", "--only", "qlora", "--device", "cuda", "--output", args.out]) == 0
    report["perf"] = [{k: r.get(k) for k in ("model", "lorakit/peft", "qlora/lora", "memory qlora/peft_qlora",
                                             "lorakit/peft (checkpointing)", "memory qlora_gc/peft_qlora_gc",
                                             "cuda_peak_mb", "max_abs_diff_vs_peft")}
                      for r in json.load(open(f"{args.out}/perf.json"))["rows"]]
    report["wall_s"] = time.time() - t0
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
