"""``lorakit bench perf``: lorakit vs PEFT on the same model, batch, dtype and adapter weights, as ratios.

Rows: forward with one adapter / base forward; training step (forward + backward + AdamW) with the
activation memory saved for backward; later rows (mixed-adapter batches, mixtures, serving) register
themselves in ``EXTRA_ROWS``.
"""

from __future__ import annotations

import copy
import platform
from dataclasses import dataclass
from typing import Callable

import torch

from .timing import SavedActivations, ratio, time_interleaved

# name -> fn(profile: PerfProfile, device) -> list[dict]; other modules add rows here.
EXTRA_ROWS: dict[str, Callable[..., list[dict]]] = {}
# Rows that start other processes (minutes on a small machine): ``--quick`` runs them only when ``--only`` names them.
QUICK_ONLY_WHEN_NAMED: set[str] = set()


@dataclass
class PerfProfile:
    batch: int = 8
    seq: int = 128
    r: int = 16
    repeats: int = 7
    models: tuple[str, ...] = ("bundled", "llama-8x512")


QUICK = PerfProfile(batch=2, seq=16, r=4, repeats=2, models=("llama-tiny",))
FULL = PerfProfile()


def build_model(name: str, device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "bundled":
        from ..hub import load_model_and_tokenizer
        return load_model_and_tokenizer(None)[0].to(device)
    sizes = {"llama-8x512": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                                 num_key_value_heads=8, vocab_size=4096),
             "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=256)}
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, **sizes[name])).to(device).eval()


def _pair(name: str, r: int, device):
    """The same base and the same adapter weights under lorakit and under PEFT."""
    import peft

    import lorakit as lk

    base = build_model(name, device)
    ours = lk.add_adapter(copy.deepcopy(base), lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                              init_lora_weights=False))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=2 * r,
                                                                       target_modules="all-linear"))
    state = lk.adapter_state_dict(ours)
    peft.set_peft_model_state_dict(theirs, state)
    return base, ours, theirs


def forward_and_train_rows(profile: PerfProfile, device) -> list[dict]:
    rows = []
    for name in profile.models:
        try:
            base, ours, theirs = _pair(name, profile.r, device)
        except Exception as e:  # the bundled model may be absent in a bare checkout
            rows.append({"row": "forward", "model": name, "error": str(e)})
            continue
        vocab = base.config.vocab_size
        ids = torch.randint(0, vocab, (profile.batch, profile.seq), device=device)
        with torch.inference_mode():
            diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
            t = time_interleaved({"base": lambda: base(input_ids=ids), "lorakit": lambda: ours(input_ids=ids),
                                  "peft": lambda: theirs(input_ids=ids)}, repeats=profile.repeats)
        rows.append({"row": "forward, one adapter", "model": name, "batch": profile.batch, "seq": profile.seq,
                     "r": profile.r, "max_abs_diff_vs_peft": diff, "times": t,
                     "lorakit/base": ratio(t["lorakit"], t["base"]), "peft/base": ratio(t["peft"], t["base"]),
                     "lorakit/peft": ratio(t["lorakit"], t["peft"])})

        opts = {}
        for key, m in (("lorakit", ours), ("peft", theirs)):
            m.train()
            opts[key] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m, opt):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = time_interleaved({"lorakit": lambda: step(ours, opts["lorakit"]),
                              "peft": lambda: step(theirs, opts["peft"])}, repeats=profile.repeats)
        mem = {}
        for key, m in (("lorakit", ours), ("peft", theirs)):
            with SavedActivations() as saved:
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            m.zero_grad(set_to_none=True)
            mem[key] = saved.bytes / 2**20
        rows.append({"row": "training step", "model": name, "batch": profile.batch, "seq": profile.seq, "r": profile.r,
                     "times": t, "lorakit/peft": ratio(t["lorakit"], t["peft"]),
                     "saved_activations_mb": mem, "memory lorakit/peft": mem["lorakit"] / max(mem["peft"], 1e-9)})
    return rows


def row_names() -> tuple[str, ...]:
    """The rows ``only`` can name: ``forward`` (forward and training step) and the registered ``EXTRA_ROWS``."""
    return ("forward", *EXTRA_ROWS)


def run_perf(profile: PerfProfile, device: str | None = None, only: list[str] | None = None) -> dict:
    """The rows named in ``only`` (of ``row_names()``; ConfigError for another name), else every row (``--quick``:
    but the ``QUICK_ONLY_WHEN_NAMED`` ones)."""
    import peft
    import transformers

    from ..core.errors import check_names

    check_names(only or (), row_names(), "bench perf row")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict] = []
    if not only or "forward" in only:
        rows += forward_and_train_rows(profile, device)
    for key, fn in EXTRA_ROWS.items():
        if (key in only) if only else not (profile is QUICK and key in QUICK_ONLY_WHEN_NAMED):
            rows += fn(profile, device)
    return {"machine": machine_description(device), "versions": {"torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}, "profile": profile.__dict__,
            "rows": rows}


def machine_description(device) -> dict:
    import os

    d = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
         "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if str(device).startswith("cuda"):
        d["gpu"] = torch.cuda.get_device_name()
    return d


def perf_markdown(result: dict) -> str:
    lines = ["| row | model | lorakit/base | peft/base | lorakit/peft (min / median) | notes |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['model']} | | | | error: {r['error'][:60]} |")
            continue
        f = lambda k: f"{r[k]['min']:.3f} / {r[k]['median']:.3f}" if k in r else ""  # noqa: E731
        note = ""
        if "saved_activations_mb" in r:
            m = r["saved_activations_mb"]
            note = f"activations saved: lorakit {m['lorakit']:.1f} MB, peft {m['peft']:.1f} MB"
        if "max_abs_diff_vs_peft" in r:
            note = f"max |Δ| vs PEFT {r['max_abs_diff_vs_peft']:.1e}"
        note = r.get("note", note)
        lines.append(f"| {r['row']} | {r['model']} | {f('lorakit/base')} | {f('peft/base')} | {f('lorakit/peft')} | {note} |")
    return "\n".join(lines) + "\n"
