"""Benchmarks of the training procedures against LoRA and full fine-tuning.

``procedure_runs`` (``lorakit bench methods --procedures NAME ...``): each named procedure on a LoRA adapter (the
methods profile's LoRA: r, all-linear), plus full fine-tuning, trained with the same tasks, data, steps and seeds
as the plain LoRA row, as rows of the methods table. Full fine-tuning is lorakit's loop with every base weight
trained by AdamW (LISA with every block active and the adapter frozen at B = 0, i.e. no adapter effect) at
``full_lr``. Flexora runs its two stages: the search (``steps`` steps, its validation split held out) and a fresh
LoRA on the selected layers (``steps`` steps); its row reports the layers it chose.

``procedures_perf_rows`` (a ``lorakit bench perf`` row, registered in ``perf.EXTRA_ROWS``): one training step
(forward + backward + optimizer) of full fine-tuning (AdamW), LoRA (all linear layers, AdamW), lorakit GaLore
(per-layer hooks, and one optimizer step), galore-torch's ``GaLoreAdamW`` and LISA, interleaved in one run.
Memory is accounted, not sampled (CPU has no allocator peak): parameters + gradients held when backward ends
+ optimizer state (bytes of the tensors after a step) + activations saved for backward.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .perf import EXTRA_ROWS, build_model
from .timing import ratio, step_memory, time_interleaved

ROW = "procedure training step (GaLore, LISA, LoRA, full)"


def _variants(base: nn.Module, r: int, galore_rank: int):
    """name -> (model, optimizer) for the same base weights."""
    import lorakit as lk
    from galore_torch import GaLoreAdamW
    from ..training import TrainConfig, get_procedure, make_optimizer

    out = {}
    full = copy.deepcopy(base).train()
    out["full"] = (full, torch.optim.AdamW(full.parameters(), lr=1e-4))
    lora = lk.add_adapter(copy.deepcopy(base), lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")).train()
    out["lora"] = (lora, torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4))
    galore_args = {"rank": galore_rank, "update_proj_gap": 10_000, "scale": 0.25, "train_adapter": False}
    for key, args in (("galore", {**galore_args, "per_layer": True}),
                      ("galore_one_step", {**galore_args, "per_layer": False}),
                      ("lisa", {"lisa_activated_layers": 2, "lisa_interval_steps": 10_000, "train_adapter": False})):
        name = key.split("_")[0]
        model = lk.add_adapter(copy.deepcopy(base), lk.LoraConfig(r=1, target_modules=["q_proj"])).train()
        config = TrainConfig(lr=1e-4, max_grad_norm=None, procedure=name, procedure_args=args)
        out[key] = (model, make_optimizer(model, "default", config, procedure=get_procedure(name).build(config))[0])
    ref = copy.deepcopy(base).train()
    galore = [m.weight for n, m in ref.named_modules() if isinstance(m, nn.Linear) and ("attn" in n or "mlp" in n)]
    ids = {id(p) for p in galore}
    out["galore_torch"] = (ref, GaLoreAdamW([{"params": [p for p in ref.parameters() if id(p) not in ids]},
                                             {"params": galore, "rank": galore_rank, "update_proj_gap": 10_000,
                                              "scale": 0.25, "proj_type": "std"}], lr=1e-4))
    return out


def procedures_perf_rows(profile, device) -> list[dict]:
    rows = []
    for name in profile.models:
        if name == "bundled":
            continue
        base = build_model(name, device)
        ids = torch.randint(0, base.config.vocab_size, (profile.batch, profile.seq), device=device)
        galore_rank = max(base.config.hidden_size // 4, 1)
        variants = _variants(base, profile.r, galore_rank)
        memory = {}
        for key, (model, opt) in variants.items():
            memory[key] = step_memory(model, opt, ids)

        def step(model, opt):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = time_interleaved({k: (lambda m=m, o=o: step(m, o)) for k, (m, o) in variants.items()},
                             repeats=profile.repeats)
        rows.append({"row": ROW, "model": name, "batch": profile.batch, "seq": profile.seq, "lora_r": profile.r,
                     "galore_rank": galore_rank, "lisa": "2 active blocks", "times": t, "memory": memory,
                     "galore/galore_torch": ratio(t["galore"], t["galore_torch"]),
                     "galore_one_step/galore_torch": ratio(t["galore_one_step"], t["galore_torch"]),
                     **{f"{k}/full": ratio(t[k], t["full"]) for k in ("galore", "lisa", "lora")},
                     "note": "; ".join(f"{k} {v['total_mb']:.0f} MB" for k, v in memory.items())})
    return rows


EXTRA_ROWS["procedures"] = procedures_perf_rows


def _train_row(model, tokenizer, train_ex, eval_ex, config, label: str, seed: int, steps: int, progress: bool,
               extra: dict | None = None) -> dict:
    from ..data import evaluate_examples
    from ..training import train

    t0 = time.perf_counter()
    result = train(model, tokenizer, train_ex, config, progress=progress)
    wall = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # as the run left them
    after = evaluate_examples(model, tokenizer, eval_ex)
    return {"method": label, "variant": "procedure", "seed": seed, "trainable_params": trainable,
            "after": after["exact_match"], "per_task": {k: v["exact_match"] for k, v in after["per_task"].items()},
            "final_loss": result.losses[-1], "s_per_step": wall / steps, "peak_memory_mb": result.peak_memory_mb,
            **(extra or {})}


# The adapter a procedure's paper prescribes, where it differs from the rows' LoRA (r, alpha 2r, all-linear):
# ALLoRA (arXiv:2410.09692) drops the scaling factor and dropout, i.e. lora_alpha = r.
PAPER_ADAPTER = {"allora": lambda r: {"lora_alpha": r, "lora_dropout": 0.0}}


def procedure_runs(profile, base, tokenizer, train_ex: dict, eval_ex, progress: bool = False) -> list[dict]:
    """Rows ``lora+<procedure>`` for ``profile.procedures`` and ``full`` (full fine-tuning), per seed."""
    import lorakit as lk
    from ..training import TrainConfig, get_procedure, train

    def lora(model, **kw):
        kw = {"lora_alpha": 2 * profile.r, **kw}
        return lk.add_adapter(model, lk.LoraConfig(r=profile.r, target_modules="all-linear", **kw))

    def config(seed, lr=None, **kw):
        return TrainConfig(steps=profile.steps, batch_size=profile.batch_size, lr=lr or profile.lr,
                           warmup_ratio=0.1 if profile.steps >= 10 else 0.0, lr_schedule="cosine", seed=seed,
                           max_length=128, **kw)

    runs = []
    for seed in profile.seeds:
        data = train_ex[seed]
        if profile.full_finetune:
            model = copy.deepcopy(base)
            torch.manual_seed(seed)
            model = lk.add_adapter(model, lk.LoraConfig(r=1, target_modules=["q_proj"]))
            blocks = len(model.model.layers)
            cfg = config(seed, lr=profile.full_lr, procedure="lisa", procedure_args={
                "lisa_activated_layers": blocks, "lisa_interval_steps": 10**9, "train_adapter": False})
            row = _train_row(model, tokenizer, data, eval_ex, cfg, "full", seed, profile.steps, progress)
            runs.append({**row, "variant": f"full fine-tuning (lr {profile.full_lr})"})
        for name in profile.procedures:
            get_procedure(name)  # a clear error for a wrong name before any training
            model = copy.deepcopy(base)
            torch.manual_seed(seed)
            if name != "flexora":
                adapter = lora(model, **PAPER_ADAPTER.get(name, lambda r: {})(profile.r))
                runs.append(_train_row(adapter, tokenizer, data, eval_ex, config(seed, procedure=name),
                                       f"lora+{name}", seed, profile.steps, progress))
                continue
            # Flexora: stage 1 searches, stage 2 trains a fresh LoRA on the layers it selected.
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                search = config(seed, procedure="flexora", output_dir=tmp,  # official val_size 200, at most 1/5
                                procedure_args={"val_size": min(200, len(data) // 5)})
                train(lora(model), tokenizer, data, search, progress=progress)
                report = json.loads((Path(tmp) / "flexora.json").read_text())
                search_s = time.perf_counter() - t0
            chosen = report["selected_layers"] or report["layers"]
            model = copy.deepcopy(base)
            torch.manual_seed(seed)
            row = _train_row(lora(model, layers_to_transform=chosen), tokenizer, data, eval_ex, config(seed),
                             "lora+flexora", seed, profile.steps, progress,
                             extra={"selected_layers": chosen, "search_s_per_step": search_s / profile.steps})
            runs.append(row)
    return runs


def procedures_markdown(result: dict) -> str:
    """A table of ``procedures_perf_rows`` output: accounted memory and step time per variant, and the ratios."""
    lines = []
    for row in result["rows"]:
        lines += [f"### {row['row']} — {row['model']}, batch {row['batch']} × seq {row['seq']}, LoRA r={row['lora_r']}, "
                  f"GaLore rank {row['galore_rank']}, LISA {row['lisa']}", "",
                  "| variant | step time min / median (s) | params MB | grads held MB | optimizer state MB | "
                  "saved activations MB | total MB |", "|---|---|---|---|---|---|---|"]
        for key, m in row["memory"].items():
            t = row["times"][key]
            lines.append(f"| {key} | {t['min_s']:.3f} / {t['median_s']:.3f} | {m['params_mb']:.1f} | {m['grads_mb']:.1f} | "
                         f"{m['optimizer_state_mb']:.1f} | {m['activations_mb']:.1f} | {m['total_mb']:.1f} |")
        lines += ["", "| ratio (same run) | min | median |", "|---|---|---|"]
        for key in ("galore/galore_torch", "galore_one_step/galore_torch", "galore/full", "lisa/full", "lora/full"):
            lines.append(f"| {key} | {row[key]['min']:.2f} | {row[key]['median']:.2f} |")
        lines.append("")
    return "\n".join(lines)
