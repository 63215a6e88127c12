"""``lorakit bench perf`` row: a MixLoRA training step vs a plain LoRA step at the same active rank.

Registered in ``perf.EXTRA_ROWS`` when this module is imported (by ``lorakit bench perf``), so importing
lorakit or its methods loads no benchmark code.
"""

from __future__ import annotations

import copy

import torch

from ..core.model import add_adapter
from ..methods.lora import LoraConfig
from ..methods.mixlora import MixLoraConfig, mixlora_extra_loss
from .perf import EXTRA_ROWS, build_model
from .timing import ratio, time_interleaved

ROW = "MixLoRA training step / LoRA step (same active rank)"


def mixlora_perf_row(profile, device) -> list[dict]:
    """Training step (forward + balance loss + backward + AdamW) of MixLoRA top-2 of 8 experts at expert rank
    r/2 vs plain LoRA at rank r on the same projections (attention q/k/v/o at r in both), same batch."""
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    rows = []
    for name in profile.models:
        try:
            base = build_model(name, device)
        except Exception as e:  # the bundled model may be absent in a bare checkout
            rows.append({"row": ROW, "model": name, "error": str(e)})
            continue
        r = profile.r
        models = {
            "mixlora": add_adapter(copy.deepcopy(base), MixLoraConfig(
                r=r, lora_alpha=2 * r, expert_r=max(r // 2, 1), expert_lora_alpha=r, lora_dropout=0.0,
                target_modules=attention + ["mlp"])),
            "lora": add_adapter(copy.deepcopy(base), LoraConfig(
                r=r, lora_alpha=2 * r, target_modules=attention + ["gate_proj", "up_proj", "down_proj"])),
        }
        ids = torch.randint(0, base.config.vocab_size, (profile.batch, profile.seq), device=device)
        steps = {}
        for key, m in models.items():
            m.train()
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            extra = mixlora_extra_loss if key == "mixlora" else None

            def step(m=m, opt=opt, extra=extra):
                loss = m(input_ids=ids, labels=ids).loss
                if extra is not None:
                    loss = loss + extra(m, "default")
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            steps[key] = step
        t = time_interleaved(steps, repeats=profile.repeats)
        rel = ratio(t["mixlora"], t["lora"])
        rows.append({"row": ROW, "model": name,
                     "batch": profile.batch, "seq": profile.seq,
                     "active_rank": r, "mixlora": f"top-2 of 8 experts, expert r={max(r // 2, 1)}", "times": t,
                     "mixlora/lora": rel,
                     "note": f"mixlora/lora {rel['min']:.2f} / {rel['median']:.2f} (min / median)"})
    return rows


EXTRA_ROWS["mixlora"] = mixlora_perf_row
