"""``lorakit bench quantize``: perplexity of the bundled base after post-training weight quantization, CBQ
(arXiv:2312.07950) against round-to-nearest, at W4A16 and W2A16, in one run on the same calibration and test rows.

Rows: the full-precision model, RTN, CBQ without its outlier pre-processing (CFP) and CBQ. Calibration rows come
from the bundled tasks' train split, test rows from their test split (``quantize.task_token_rows``); the table
gives perplexity, its ratio to RTN's (< 1: better than RTN), the mean KL divergence of the next-token
distributions from the full-precision model's (perplexity on these synthetic tasks is dominated by tokens no model
can predict, such as random digits, so it moves little; the KL shows the damage) and the quantization wall time.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

from ..hub import load_model_and_tokenizer
from ..quantize import next_token_kl, perplexity, quantize_weights, task_token_rows


@dataclass(frozen=True)
class QuantizeProfile:
    bits: tuple[int, ...] = (4, 2)
    calib_rows: int = 16
    eval_rows: int = 32
    seq_len: int = 128
    steps: int = 40  # CBQ optimisation steps per window
    r: int = 8
    seed: int = 0


FULL = QuantizeProfile()
QUICK = QuantizeProfile(bits=(2,), calib_rows=2, eval_rows=2, seq_len=32, steps=2)

VARIANTS = (("rtn", {}), ("cbq (no CFP)", {"cfp": False}), ("cbq", {}))
PARTS = ("cfp",)  # ``--only cfp``: the CFP diagnosis alone (cfp_diagnosis), instead of the table


def run_quantize(profile: QuantizeProfile, progress: bool = False) -> dict:
    model, tokenizer = load_model_and_tokenizer(None)
    calib = task_token_rows(tokenizer, "train", profile.calib_rows, profile.seq_len, profile.seed)
    test = task_token_rows(tokenizer, "test", profile.eval_rows, profile.seq_len, profile.seed)
    rows = [{"bits": 32, "method": "full precision", "perplexity": perplexity(model, test), "kl": 0.0, "seconds": 0.0}]
    for bits in profile.bits:
        for label, options in VARIANTS:
            quantized = copy.deepcopy(model)
            t0 = time.perf_counter()
            if label == "rtn":
                summary = quantize_weights(quantized, "rtn", bits=bits)
            else:
                summary = quantize_weights(quantized, "cbq", calib, bits=bits, steps=profile.steps, r=profile.r,
                                         seed=profile.seed, progress=print if progress else None, **options)
            rows.append({"bits": bits, "method": label, "perplexity": perplexity(quantized, test),
                         "kl": next_token_kl(model, quantized, test),
                         "seconds": time.perf_counter() - t0,
                         "windows": summary.get("windows"), "truncated_weights": sum(summary.get("truncated_weights", {}).values())})
    for row in rows:
        ref = next((r for r in rows if r["bits"] == row["bits"] and r["method"] == "rtn"), None)
        row["vs_rtn"] = row["perplexity"] / ref["perplexity"] if ref else None
    return {"profile": profile.__dict__, "rows": rows}


def cfp_diagnosis(profile: QuantizeProfile, calib_rows: int = 4) -> dict:
    """Why CBQ's weight CFP helps or hurts: per bit width, the summed relative layer-output error
    ``‖X(W − Q(W'))ᵀ‖² / ‖XWᵀ‖²`` of per-channel round-to-nearest over every block linear of the bundled base
    (X: the layer's inputs on ``calib_rows`` calibration rows) for W' = W, W truncated by CFP's rule, and W'
    from ``cfp_truncate`` (truncation kept only where it lowers ``Σ h_j (W − Q(·))²_ij``, h_j = mean x_j²); with the
    weights truncated and
    each layer's largest |w| in standard deviations."""
    import torch

    from ..quantize import QuantSpec, cfp_threshold, rtn
    from ..quantize.cbq import cfp_truncate
    from ..quantize.model import block_linears, decoder_blocks

    model, tokenizer = load_model_and_tokenizer(None)
    calib = task_token_rows(tokenizer, "train", calib_rows, profile.seq_len, profile.seed)
    inputs, hooks = {}, []
    for i, block in enumerate(decoder_blocks(model)):
        for name, layer, _ in block_linears(block):
            hooks.append(layer.register_forward_hook(
                lambda m, args, out, key=f"{i}.{name}": inputs.__setitem__(key, args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=calib)
    for h in hooks:
        h.remove()
    rows, spread = [], []
    for bits in profile.bits:
        spec, totals = QuantSpec(bits), {"none": [0.0, 0], "cfp": [0.0, 0], "cfp, kept where it helps": [0.0, 0]}
        for i, block in enumerate(decoder_blocks(model)):
            for name, layer, _ in block_linears(block):
                w, x = layer.weight.detach().float(), inputs[f"{i}.{name}"]
                ref = (x @ w.T).pow(2).sum()
                t = cfp_threshold(w)
                variants = {"none": (w, 0), "cfp": (w, 0) if t is None else (w.clamp(-t, t), int((w.abs() > t).sum())),
                            "cfp, kept where it helps": cfp_truncate(w, spec, col_power=x.pow(2).mean(0))}
                for label, (w2, cut) in variants.items():
                    totals[label][0] += float((x @ (w - rtn(w2, spec)).T).pow(2).sum() / ref)
                    totals[label][1] += cut
                if bits == profile.bits[0]:
                    spread.append(float(w.abs().max() / w.std()))
        rows += [{"bits": bits, "weights": label, "output_error": err, "truncated": cut}
                 for label, (err, cut) in totals.items()]
    return {"rows": rows, "max_abs_over_std": [min(spread), max(spread)], "calib_rows": calib_rows}


def cfp_markdown(result: dict) -> str:
    lo, hi = result["max_abs_over_std"]
    lines = [f"Per-channel RTN, every block linear of the bundled base; inputs from {result['calib_rows']} calibration "
             f"rows; largest |w| per layer: {lo:.1f}–{hi:.1f} standard deviations.", "",
             "| weights | CFP | summed relative layer-output error | weights truncated |", "|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| W{row['bits']}A16 | {row['weights']} | {row['output_error']:.4f} | {row['truncated']} |")
    return "\n".join(lines) + "\n"


def quantize_markdown(result: dict) -> str:
    p = result["profile"]
    lines = [f"Bundled base, calibration {p['calib_rows']}×{p['seq_len']} tokens (tasks' train split), perplexity on "
             f"{p['eval_rows']}×{p['seq_len']} tokens (test split); CBQ: windows of 2 blocks overlapping by 1, "
             f"{p['steps']} steps per window, LoRA-Rounding rank {p['r']}.", "",
             "| weights | method | perplexity | ÷ RTN | KL to full precision (nats/token) | weights truncated (CFP) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        vs = f"{row['vs_rtn']:.3f}" if row["vs_rtn"] is not None else "—"
        cut = row.get("truncated_weights")
        fmt = "fp32" if row["bits"] == 32 else f"W{row['bits']}A16"
        lines.append(f"| {fmt} | {row['method']} | {row['perplexity']:.3f} | {vs} | {row['kl']:.4f} | "
                     f"{cut if cut else '—'} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
