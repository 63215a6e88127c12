"""``lorakit bench gamma_mod``: compute saved vs metric lost by γ-MoD (arXiv:2410.13859) on the bundled base.

LoRA and γ-MoD (the same LoRA on the same modules, plus mixture-of-depth blocks, ``capacity_factor`` of the
routable tokens kept in training) are trained with the same data, steps and seed. Rows: ``gamma_mod`` is the
method's defaults (ARank among the blocks of the official ``arank_mod`` rule, answer tokens always kept, the
official inference thresholds); ``gamma_mod_arank_mod`` names the official blocks explicitly (``llava_llama_mod.py``
lines 554-558: every block but the first three and the last); ``gamma_mod_unmasked`` routes the answer tokens too
(``keep_supervised=False``). ``variants`` picks rows. Reported: exact match of greedy generation (KV cache) on the
tasks' test split, the test-text loss (next-token NLL of prompt + completion), and forward FLOPs per token of the
decoder blocks + head (``methods.gamma_mod.flops_per_token``) with the share of tokens each MoD block kept on the
test texts, as a ratio to the dense model's; for γ-MoD rows also the share kept in training and in generation,
and the same metrics with the training top-k at inference (``inference_threshold=None``, the trained model).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("lora", "gamma_mod", "gamma_mod_arank_mod", "gamma_mod_unmasked")


def arank_mod_layers(num_layers: int) -> list[int]:
    """The official ``mod_mode="arank_mod"`` blocks: all but 0, 1, 2 and the last (llava_llama_mod.py l. 554-558)."""
    return [i for i in range(num_layers) if i not in {0, 1, 2, num_layers - 1}]


@dataclass(frozen=True)
class GammaModProfile:
    tasks: str = "reverse,add"
    steps: int = 80
    batch_size: int = 8
    lr: float = 2e-3
    r: int = 8
    capacity_factor: float = 0.5
    num_mod_layers: int | None = None
    train_examples: int = 640
    eval_examples: int = 40
    seed: int = 0
    variants: tuple[str, ...] = VARIANTS


FULL = GammaModProfile()
QUICK = GammaModProfile(tasks="reverse", steps=2, batch_size=2, train_examples=8, eval_examples=2)


def _test_loss(model, tokenizer, examples) -> tuple[float, int]:
    """Mean next-token NLL over the test texts (prompt + completion), and their mean length in tokens."""
    total, count, lengths = 0.0, 0, []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([tokenizer(ex.prompt + ex.completion, add_special_tokens=False)["input_ids"]])
            logits = model(input_ids=ids, use_cache=False).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
            lengths.append(ids.shape[1])
    return total / max(count, 1), round(sum(lengths) / len(lengths))


def _scores(model, tokenizer, examples, mod: bool) -> dict:
    """Exact match (greedy generation), test loss, FLOPs per token at the test texts' kept shares, and the share
    of tokens each MoD block kept while generating (prefill + decoded tokens)."""
    from ..data import evaluate_examples
    from ..methods.gamma_mod import flops_per_token, keep_fractions
    from ..mixtures import record_routing, reset_router_stats

    reset_router_stats(model)
    with record_routing(model, "default") as traces:
        loss, seq_len = _test_loss(model, tokenizer, examples)
    keep = keep_fractions(model, "default") if mod else {}
    # The keep probabilities r of the tokens the MoD blocks kept on the test texts (all of them when nothing is
    # skipped): how far the router is from the official 0.005 / 0.5 inference thresholds.
    kept_r = [e["weights"][..., 1][e["selected"][..., 1]] for entries in traces.values() for e in entries]
    kept_r = torch.cat(kept_r) if kept_r else torch.zeros(0)
    reset_router_stats(model)
    exact = evaluate_examples(model, tokenizer, examples)["exact_match"]
    return {"exact_match": exact, "test_loss": loss, "seq_len": seq_len, "keep": keep,
            "generation_keep": keep_fractions(model, "default") if mod else {},
            "kept_r_quantiles": torch.quantile(kept_r.float(), torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])).tolist()
            if kept_r.numel() else [],
            "flops_per_token": flops_per_token(model, seq_len, keep), "dense_flops_per_token": flops_per_token(model, seq_len)}


def run_gamma_mod(profile: GammaModProfile, progress: bool = False) -> dict:
    import lorakit as lk
    from ..core.errors import check_names
    from ..data import load_examples
    from ..hub import load_model_and_tokenizer
    from ..methods.gamma_mod import GammaModConfig, flops_per_token, gamma_mod_blocks, keep_fractions
    from ..training import TrainConfig, train

    check_names(profile.variants, VARIANTS, "bench gamma_mod variant")
    base, tokenizer = load_model_and_tokenizer(None)
    train_ex = load_examples(profile.tasks, "train", n=profile.train_examples, seed=profile.seed)
    eval_ex = load_examples(profile.tasks, "test", n=profile.eval_examples, seed=1234)
    mod = dict(r=profile.r, lora_alpha=2 * profile.r, target_modules=TARGETS, capacity_factor=profile.capacity_factor)
    configs = {"lora": lambda: lk.LoraConfig(r=profile.r, lora_alpha=2 * profile.r, target_modules=TARGETS),
               "gamma_mod": lambda: GammaModConfig(num_mod_layers=profile.num_mod_layers, **mod),
               "gamma_mod_arank_mod": lambda: GammaModConfig(
                   mod_layers=arank_mod_layers(base.config.num_hidden_layers), **mod),
               "gamma_mod_unmasked": lambda: GammaModConfig(num_mod_layers=profile.num_mod_layers,
                                                            keep_supervised=False, **mod)}
    rows = []
    for name in profile.variants:
        config = configs[name]()
        model = copy.deepcopy(base)
        torch.manual_seed(profile.seed)
        lk.add_adapter(model, config)
        tc = TrainConfig(steps=profile.steps, batch_size=profile.batch_size, lr=profile.lr,
                         warmup_ratio=0.1 if profile.steps >= 10 else 0.0, lr_schedule="cosine", seed=profile.seed,
                         max_length=128)
        t0 = time.perf_counter()
        result = train(model, tokenizer, train_ex, tc, progress=progress)
        seconds = time.perf_counter() - t0
        trained_keep = keep_fractions(model, "default") if name != "lora" else {}
        model.eval()
        row = {"method": name, **_scores(model, tokenizer, eval_ex, name != "lora"),
               "final_train_loss": result.losses[-1], "train_seconds": seconds, "train_keep": trained_keep}
        if name != "lora":
            blocks = gamma_mod_blocks(model, "default")
            for block in blocks:  # the same trained model, with the training top-k at inference
                block.inference_threshold = None
            row["topk_inference"] = _scores(model, tokenizer, eval_ex, True)
            row["topk_inference"]["flops_ratio"] = (row["topk_inference"]["flops_per_token"]
                                                    / row["topk_inference"]["dense_flops_per_token"])
            row["train_flops_ratio"] = flops_per_token(model, row["seq_len"], trained_keep) / row["dense_flops_per_token"]
        stored = model.lorakit.configs["default"]
        rows.append({**row, "mod_layers": getattr(stored, "mod_layers", None), "aranks": stored.__dict__.get("aranks")})
    for row in rows:
        row["flops_ratio"] = row["flops_per_token"] / row["dense_flops_per_token"]
    return {"profile": asdict(profile), "rows": rows}


def gamma_mod_markdown(result: dict) -> str:
    p = result["profile"]
    share = lambda keep: "/".join(f"{f:.2f}" for _, f in sorted(keep.items())) or "—"  # noqa: E731
    lines = [f"Bundled base, tasks {p['tasks']}, {p['steps']} steps × batch {p['batch_size']}, LoRA r={p['r']} on "
             f"{', '.join(TARGETS)}; γ-MoD capacity {p['capacity_factor']} in training (one run, seed {p['seed']}). "
             "FLOPs ÷ dense at the test texts' kept shares; kept shares per MoD block on the test texts / while "
             "generating / in training; the last three columns: the same trained model with the training top-k at "
             "inference.", "",
             "| method | MoD blocks | exact match | test loss | FLOPs ÷ dense | kept test / gen / train | train FLOPs ÷ "
             "dense | top-k: exact match | top-k: test loss | top-k: FLOPs ÷ dense | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        topk = row.get("topk_inference")
        mod = ", ".join(str(i) for i in row["mod_layers"]) if row.get("mod_layers") else "—"
        kept = f"{share(row['keep'])} / {share(row['generation_keep'])} / {share(row['train_keep'])}"
        tail = (f"{topk['exact_match']:.3f} | {topk['test_loss']:.3f} | {topk['flops_ratio']:.3f}" if topk
                else "— | — | —")
        lines.append(f"| {row['method']} | {mod} | {row['exact_match']:.3f} | {row['test_loss']:.3f} | "
                     f"{row['flops_ratio']:.3f} | {kept} | {row.get('train_flops_ratio', 1.0):.3f} | {tail} | "
                     f"{row['train_seconds']:.0f} |")
    for row in result["rows"]:
        if row.get("kept_r_quantiles"):
            q = row["kept_r_quantiles"]
            lines.append(f"\n{row['method']}: keep probability r of the kept test tokens, min {q[0]:.3f}, 10% {q[1]:.3f}, "
                         f"median {q[2]:.3f}, 90% {q[3]:.3f}, max {q[4]:.3f} (inference thresholds 0.005 / 0.5).")
    aranks = next((r["aranks"] for r in result["rows"] if r.get("aranks")), None)
    if aranks:
        lines += ["", "ARank per block (mean attention-map rank over heads and init batches): "
                  + ", ".join(f"{i}: {a:.1f}" for i, a in enumerate(aranks))]
    return "\n".join(lines) + "\n"
