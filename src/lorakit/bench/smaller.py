"""Smaller bases around LoRA: QLoRA (4-bit base), LoRAPrune, LoRAM — against LoRA on the full-precision base.

``qlora_perf_rows`` (a ``lorakit bench perf`` row, in ``perf.EXTRA_ROWS["qlora"]``): one training step of LoRA on
the float32 base, lorakit QLoRA and PEFT QLoRA on the *same* bitsandbytes NF4 weights (and PEFT LoRA), timed
interleaved in one run; and both QLoRAs again with gradient checkpointing on (``_gc``: QLoRA's own setting, and what
PEFT's ``prepare_model_for_kbit_training`` turns on by default). Activations accounted under checkpointing are those
saved outside the checkpointed blocks. Memory is accounted (parameters with 4-bit weights at their packed size plus constants,
gradients held, optimizer state, activations saved for backward); on CUDA each variant's measured peak
(``torch.cuda.max_memory_allocated`` over one step from a clean start) is reported beside it.

``run_smaller`` (``lorakit bench smaller``): the same tasks, steps and seeds for LoRA, QLoRA, LoRAPrune and
LoRAM (without and with its alignment pre-training of the pruned base, ``loram_aligned``) on the bundled model;
exact match after training, base size during training, parameters removed.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

from ..core.checkpointing import replay_routing_in_checkpoints
from .perf import EXTRA_ROWS, build_model
from .timing import ratio, step_memory, time_interleaved

ROW = "QLoRA training step (4-bit NF4 base) vs LoRA and PEFT"


def _qlora_variants(base, r: int, device):
    import peft

    import lorakit as lk
    from ..quantize import quantize_model

    def ours(model):
        torch.manual_seed(0)  # the same adapter init on both bases
        return lk.add_adapter(model, lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                   init_lora_weights=False))

    lora = ours(copy.deepcopy(base))
    qlora = ours(quantize_model(copy.deepcopy(base), "nf4"))
    # QLoRA's setting (Dettmers et al. 2023, §4 and their qlora.py): gradient checkpointing on, as PEFT's
    # prepare_model_for_kbit_training turns it on by default; lorakit's as ``TrainConfig(gradient_checkpointing=True)``
    qlora_gc = ours(quantize_model(copy.deepcopy(base), "nf4"))
    qlora_gc.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    replay_routing_in_checkpoints(qlora_gc)
    state = lk.adapter_state_dict(lora)
    out = {"lora": lora, "qlora": qlora, "qlora_gc": qlora_gc}
    for key, model in (("peft_lora", copy.deepcopy(base)), ("peft_qlora", quantize_model(copy.deepcopy(base), "nf4")),
                       ("peft_qlora_gc", quantize_model(copy.deepcopy(base), "nf4"))):
        if key.endswith("_gc"):  # what prepare_model_for_kbit_training does for a model transformers loaded in 4 bits
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        out[key] = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
        peft.set_peft_model_state_dict(out[key], state)
    return {k: (m.to(device).train(), torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4))
            for k, m in out.items()}


def _step(model, opt, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def qlora_perf_rows(profile, device) -> list[dict]:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return [{"row": ROW, "model": "-", "error": "bitsandbytes is not installed (pip install 'lorakit[quantize]')"}]
    from ..quantize import quantized_bytes

    rows = []
    for name in profile.models:
        base = build_model(name, "cpu")
        ids = torch.randint(0, base.config.vocab_size, (profile.batch, profile.seq), device=device)
        variants = _qlora_variants(base, profile.r, device)
        with torch.no_grad():  # before any update: the same adapter on the same NF4 weights
            diff = (variants["qlora"][0](input_ids=ids).logits - variants["peft_qlora"][0](input_ids=ids).logits)
        memory, peaks = {}, {}
        for key, (model, opt) in variants.items():
            memory[key] = step_memory(model, opt, ids, param_bytes=quantized_bytes(model))
        if str(device).startswith("cuda"):
            for key, (model, opt) in variants.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                _step(model, opt, ids)
                torch.cuda.synchronize()
                peaks[key] = torch.cuda.max_memory_allocated() / 2**20
        t = time_interleaved({k: (lambda m=m, o=o: _step(m, o, ids)) for k, (m, o) in variants.items()},
                             repeats=profile.repeats)
        total = {k: v["total_mb"] for k, v in memory.items()}
        rows.append({"row": ROW, "model": name, "batch": profile.batch, "seq": profile.seq, "r": profile.r,
                     "times": t, "memory": memory, "cuda_peak_mb": peaks or None,
                     "max_abs_diff_vs_peft": diff.abs().max().item(),
                     "lorakit/peft": ratio(t["qlora"], t["peft_qlora"]), "qlora/lora": ratio(t["qlora"], t["lora"]),
                     "lorakit/peft (checkpointing)": ratio(t["qlora_gc"], t["peft_qlora_gc"]),
                     "memory qlora/peft_qlora": total["qlora"] / total["peft_qlora"],
                     "memory qlora/lora": total["qlora"] / total["lora"],
                     "memory qlora_gc/peft_qlora_gc": total["qlora_gc"] / total["peft_qlora_gc"],
                     "note": "; ".join(f"{k} {v:.1f} MB" for k, v in (peaks or total).items())
                             + (" (CUDA peak)" if peaks else " (accounted)")})
    return rows


EXTRA_ROWS["qlora"] = qlora_perf_rows


# -- lorakit bench smaller: metric after the same steps ------------------------------------------------------
VARIANTS = ("lora", "qlora", "loraprune", "loram", "loram_aligned")


@dataclass
class SmallerProfile:
    tasks: str = "reverse,upper"
    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    r: int = 8
    ratio: float = 0.5  # LoRAPrune's final ratio and LoRAM's pruning ratio
    train_examples: int = 1000
    eval_examples: int = 50
    seeds: tuple[int, ...] = (0,)
    # LoRAM's alignment of the pruned base before training (variant "loram_aligned"): steps of 16 × 128 tokens
    align_steps: int = 200
    align_lr: float = 1e-3
    align_corpus_chars: int = 1_000_000
    variants: tuple[str, ...] = VARIANTS


QUICK = SmallerProfile(steps=4, batch_size=4, train_examples=16, eval_examples=4, tasks="reverse", align_steps=2,
                       align_corpus_chars=60_000)
FULL = SmallerProfile()


def _run_one(variant: str, profile: SmallerProfile, seed: int, train_ex, eval_ex) -> dict:
    import lorakit as lk
    from ..data import evaluate_examples
    from ..hub import load_model_and_tokenizer
    from ..pretrain.loram_align import AlignConfig, align_pruned, alignment_blocks
    from ..prune.loram import LoramConfig, loram_prune, recover_state_dict
    from ..quantize import quantized_bytes
    from ..training import TrainConfig, train

    torch.manual_seed(seed)
    model, tokenizer = load_model_and_tokenizer(None, quantize="nf4" if variant == "qlora" else None)
    full_params = sum(p.numel() for p in model.parameters())
    trained, plan, aligned = model, None, {}
    if variant.startswith("loram"):
        trained, plan = loram_prune(model, LoramConfig(ratio=profile.ratio, seed=seed))
    if variant == "loram_aligned":
        from ..pretrain.train import PretrainConfig, evaluate_loss
        config = AlignConfig(steps=profile.align_steps, lr=profile.align_lr, corpus_chars=profile.align_corpus_chars,
                             warmup_steps=min(20, profile.align_steps // 10),
                             eval_blocks=min(32, profile.align_corpus_chars // 4096), seed=seed)
        blocks = alignment_blocks(tokenizer, config)
        aligned = align_pruned(trained, tokenizer, config, blocks=blocks,  # progress on stderr: it is the long part
                               log=lambda line: print(f"loram_aligned: {line}", file=sys.stderr, flush=True))
        aligned["eval_loss_full_model"] = evaluate_loss(model, blocks[1], PretrainConfig(batch_size=16))
        aligned.pop("train_loss_curve")
    lk.add_adapter(trained, lk.LoraConfig(r=profile.r, lora_alpha=2 * profile.r, target_modules="all-linear"))
    procedure = {}
    if variant == "loraprune":
        procedure = {"procedure": "loraprune", "procedure_args": {"ratio": profile.ratio, "save_pruned": False,
                                                                  "prune_freq": max(1, profile.steps // 15)}}
    config = TrainConfig(steps=profile.steps, batch_size=profile.batch_size, lr=profile.lr, seed=seed, **procedure)
    result = train(trained, tokenizer, train_ex, config, progress=False)
    row = {"variant": variant, "seed": seed, "base_weights_mb": quantized_bytes(lk.unload(copy.deepcopy(trained))) / 2**20,
           "trainable_params": result.trainable_params, "train_tokens_per_s": result.tokens_per_s,
           "peak_memory_mb": result.peak_memory_mb if result.device.startswith("cuda") else None,
           "params_removed_fraction": 0.0, **{f"align_{k}": v for k, v in aligned.items()}}
    if variant == "loraprune":
        from ..training.procedures.loraprune import export_pruned
        small = export_pruned(trained, trained.lorakit_prune_masks)
        row["params_removed_fraction"] = 1 - sum(p.numel() for p in small.parameters()) / full_params
        model = trained  # evaluated with its masks: the pruned model's answers
    elif variant.startswith("loram"):
        row["params_removed_fraction_during_training"] = 1 - sum(p.numel() for p in lk.unload(copy.deepcopy(trained))
                                                                 .parameters()) / full_params
        row["exact_match_pruned"] = evaluate_examples(trained, tokenizer, eval_ex, batch_size=64)["exact_match"]
        tensors = recover_state_dict(lk.adapter_state_dict(trained), plan)
        with tempfile.TemporaryDirectory() as folder:
            lk.save_adapter(trained, folder)
            from ..io.files import save_tensors
            save_tensors(f"{folder}/adapter_model.safetensors", tensors)
            lk.load_adapter(model, folder)  # the full model, with the recovered adapter
    row["exact_match"] = evaluate_examples(model, tokenizer, eval_ex, batch_size=64)["exact_match"]
    return row


def run_smaller(profile: SmallerProfile) -> dict:
    from ..core.errors import check_names
    from ..data import load_examples

    check_names(profile.variants, VARIANTS, "bench smaller variant")
    runs = []
    tasks = profile.tasks.split(",")
    for seed in profile.seeds:
        train_ex = [ex for t in tasks for ex in load_examples(t, "train", n=profile.train_examples, seed=seed)]
        eval_ex = [ex for t in tasks for ex in load_examples(t, "test", n=profile.eval_examples, seed=seed)]
        for variant in profile.variants:
            try:
                runs.append(_run_one(variant, profile, seed, train_ex, eval_ex))
            except Exception as e:  # a missing optional library fails one row, not the table
                runs.append({"variant": variant, "seed": seed, "error": f"{type(e).__name__}: {e}"})
    return {"profile": asdict(profile), "runs": runs}


def smaller_markdown(result: dict) -> str:
    lines = ["| variant | exact match (mean over seeds) | base weights MB in training | base MB ÷ LoRA | params removed | "
             "trainable params | train tok/s | tok/s ÷ LoRA | notes |", "|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for run in result["runs"]:
        by.setdefault(run["variant"], []).append(run)
    lora = [r for r in by.get("lora", []) if "error" not in r]  # the reference row of the same run, if it ran
    reference = {k: statistics.mean(r[k] for r in lora) for k in ("base_weights_mb", "train_tokens_per_s")} if lora \
        else {}
    ratio = lambda k, value: f"{value / reference[k]:.2f}" if reference.get(k) else "—"  # noqa: E731
    for variant, runs in by.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            lines.append(f"| {variant} | | | | | | | | error: {runs[0]['error'][:80]} |")
            continue
        mean = lambda k: statistics.mean(r[k] for r in ok)  # noqa: E731
        loram = variant.startswith("loram")
        removed = mean("params_removed_fraction_during_training") if loram else mean("params_removed_fraction")
        note = ""
        if loram:
            note = f"trained on the pruned base (exact match there {mean('exact_match_pruned'):.3f}); evaluated on the full base"
        if variant == "loram_aligned":
            note += (f"; aligned {mean('align_tokens'):,.0f} tokens ({mean('align_seconds'):.0f}s): held-out LM loss of the "
                     f"pruned base {mean('align_eval_loss_before'):.3f} -> {mean('align_eval_loss_after'):.3f} "
                     f"(full base {mean('align_eval_loss_full_model'):.3f})")
        if variant == "loraprune":
            note = "evaluated pruned (masks); removed = exported model vs full"
        if ok[0]["peak_memory_mb"] is not None:
            note += f"; CUDA peak {mean('peak_memory_mb'):.0f} MB"
        lines.append(f"| {variant} | {mean('exact_match'):.3f} | {mean('base_weights_mb'):.1f} | "
                     f"{ratio('base_weights_mb', mean('base_weights_mb'))} | {removed:.1%} | "
                     f"{int(mean('trainable_params')):,} | {mean('train_tokens_per_s'):,.0f} | "
                     f"{ratio('train_tokens_per_s', mean('train_tokens_per_s'))} | {note} |")
    return "\n".join(lines) + "\n"
