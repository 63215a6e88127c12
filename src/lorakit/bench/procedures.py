"""Benchmarks of the training procedures (GaLore, LISA) against LoRA and full fine-tuning.

``procedures_perf_rows`` (a ``lorakit bench perf`` row, registered in ``perf.EXTRA_ROWS``): one training step
(forward + backward + optimizer) of full fine-tuning (AdamW), LoRA (all linear layers, AdamW), lorakit GaLore
(per-layer hooks, and one optimizer step), galore-torch's ``GaLoreAdamW`` and LISA, interleaved in one run.
Memory is accounted, not sampled (CPU has no allocator peak): parameters + gradients held when backward ends
+ optimizer state (bytes of the tensors after a step) + activations saved for backward.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .perf import EXTRA_ROWS, build_model
from .timing import SavedActivations, ratio, time_interleaved

ROW = "procedure training step (GaLore, LISA, LoRA, full)"


def _bytes(tensors) -> int:
    """Bytes of the tensors (galore-torch keeps its projection matrix in a projector object: counted too)."""
    tensors = [getattr(t, "ortho_matrix", t) for t in tensors]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


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
            for _ in range(2):  # optimizer state exists after the first steps
                with SavedActivations() as saved:
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                grads = _bytes(p.grad for p in model.parameters())
                opt.step()
                opt.zero_grad(set_to_none=True)
            state = _bytes(v for s in opt.state.values() for v in s.values())
            params = _bytes(model.parameters())
            memory[key] = {"params_mb": params / 2**20, "grads_mb": grads / 2**20, "optimizer_state_mb": state / 2**20,
                           "activations_mb": saved.bytes / 2**20,
                           "total_mb": (params + grads + state + saved.bytes) / 2**20}

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
