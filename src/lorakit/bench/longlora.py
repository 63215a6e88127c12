"""LongLoRA at 4× the base context (a ``lorakit bench perf`` row, ``--only longlora``).

On one model, at ``context = 4 × max_position_embeddings`` tokens (batch 1), side by side in one run:

- step time (forward + backward + AdamW, interleaved) and activations saved for backward of LongLoRA's
  S²-Attn vs the same model, adapter, RoPE scaling and trainable embeddings/norms with full attention;
- perplexity at that context on held-out text after ``steps`` training steps of each, evaluated with full
  attention (``model.eval()``): LongLoRA (S²-Attn, LoRA + embeddings + norms), the same with full attention while
  training, LongLoRA with LoRA only (``trainable_params=""``: the paper's claim is that LoRA alone extends context
  poorly), and the untrained base with and without the RoPE interpolation.

On the bundled model the base context is the 128 tokens it was pretrained on (its ``max_position_embeddings``
of 256 is set to 128 here, so the run extends it to 512 with RoPE factor 4); the text is standard-library
source cut into blocks of ``context`` tokens (training and held-out blocks disjoint), ``STEPS`` training steps.
Random models (``llama-tiny``, ``llama-8x512``) get a base context of the profile's ``seq``, random tokens and 3
steps: timing and memory only, their perplexities carry no meaning.
"""

from __future__ import annotations

import copy
import math

import torch

from .perf import EXTRA_ROWS, build_model
from .timing import SavedActivations, ratio, time_interleaved

ROW = "LongLoRA S²-Attn vs full attention at 4× context"
STEPS, LR = 20, 5e-4
BUNDLED_CONTEXT = 128  # the bundled model was pretrained on 128-token blocks (its max_position_embeddings is 256)


def _blocks(model, name: str, context: int, n: int) -> torch.Tensor:
    """(n, context) token blocks: stdlib source for the bundled model, random tokens otherwise."""
    if name != "bundled":
        return torch.randint(0, model.config.vocab_size, (n, context), generator=torch.Generator().manual_seed(0))
    from ..hub import load_model_and_tokenizer
    from ..pretrain.corpus import stdlib_texts

    tokenizer = load_model_and_tokenizer(None)[1]
    stream: list[int] = []
    for text in stdlib_texts(n * context * 5, chunk_chars=8_192, seed=7):
        stream += [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        if len(stream) >= n * context:
            break
    return torch.tensor(stream[: n * context]).view(n, context)


def _variant(base, r: int, args: dict, full_attention: bool):
    import lorakit as lk
    from ..training import TrainConfig, get_procedure, make_optimizer

    model = lk.add_adapter(copy.deepcopy(base), lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj"])).train()  # the official targets
    context = 4 * base.config.max_position_embeddings
    config = TrainConfig(lr=LR, max_length=context, max_grad_norm=None, procedure="longlora", procedure_args=args)
    optimizer = make_optimizer(model, "default", config, procedure=get_procedure("longlora").build(config))[0]
    if full_attention:  # everything else as LongLoRA (RoPE scaling, trainable embeddings and norms)
        model.set_attn_implementation("sdpa")
    return model, optimizer


@torch.no_grad()
def _perplexity(model, blocks: torch.Tensor) -> float:
    model.eval()
    losses = [float(model(input_ids=b[None], labels=b[None]).loss) for b in blocks]
    model.train()
    return math.exp(sum(losses) / len(losses))


def longlora_perf_rows(profile, device) -> list[dict]:
    from ..training.procedures.longlora import apply_rope_linear_scaling

    rows = []
    for name in profile.models:
        base = build_model(name, device)
        base.set_attn_implementation("sdpa")
        steps = STEPS
        base.config.max_position_embeddings = BUNDLED_CONTEXT
        if name != "bundled":  # random weights: no trained context to extend
            base.config.max_position_embeddings, steps = profile.seq, 3
        context = 4 * base.config.max_position_embeddings
        blocks = _blocks(base, name, context, steps + 4).to(device)
        train_blocks, held_out = blocks[:steps], blocks[steps:]
        variants = {"s2_attn": _variant(base, profile.r, {}, False),
                    "full_attn": _variant(base, profile.r, {}, True),
                    "s2_attn_lora_only": _variant(base, profile.r, {"trainable_params": ""}, False)}
        ids = train_blocks[:1]

        def step(model, opt, batch=ids):
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        timed = {k: variants[k] for k in ("s2_attn", "full_attn")}
        activations = {}
        for key, (model, _) in timed.items():
            with SavedActivations() as saved:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            activations[key] = saved.bytes / 2**20
        times = time_interleaved({k: (lambda m=m, o=o: step(m, o)) for k, (m, o) in timed.items()},
                                 repeats=profile.repeats, warmup=1)
        # Fresh copies for the perplexity runs, trained on the same blocks in the same order.
        variants = {k: _variant(base, profile.r, a, f) for k, (a, f) in (
            ("s2_attn", ({}, False)), ("full_attn", ({}, True)), ("s2_attn_lora_only", ({"trainable_params": ""}, False)))}
        ppl = {}
        for key, (model, opt) in variants.items():
            for block in train_blocks:
                step(model, opt, block[None])
            ppl[key] = _perplexity(model, held_out)
        untrained = copy.deepcopy(base)
        ppl["base_no_interpolation"] = _perplexity(untrained, held_out)
        apply_rope_linear_scaling(untrained, context)
        ppl["base_interpolated"] = _perplexity(untrained, held_out)
        rows.append({"row": ROW, "model": name, "context": context, "base_context": base.config.max_position_embeddings,
                     "group_size": context // 4, "lora_r": profile.r, "train_steps": steps, "lr": LR,
                     "times": times, "activations_mb": activations, "perplexity": ppl,
                     "s2_attn/full_attn": ratio(times["s2_attn"], times["full_attn"]),
                     "note": f"activations {activations['s2_attn']:.0f} vs {activations['full_attn']:.0f} MB; "
                             + ", ".join(f"ppl {k} {v:.2f}" for k, v in ppl.items())})
    return rows


EXTRA_ROWS["longlora"] = longlora_perf_rows


def longlora_markdown(result: dict) -> str:
    lines = []
    for row in result["rows"]:
        if row.get("row") != ROW:
            continue
        t, a, p = row["times"], row["activations_mb"], row["perplexity"]
        lines += [f"### {row['row']} — {row['model']}, context {row['context']} (base {row['base_context']}), "
                  f"S²-Attn group {row['group_size']}, LoRA r={row['lora_r']} on q/k/v/o + embeddings + norms", "",
                  "| variant | step time min / median (s) | saved activations MB |", "|---|---|---|"]
        for key in ("s2_attn", "full_attn"):
            lines.append(f"| {key} | {t[key]['min_s']:.3f} / {t[key]['median_s']:.3f} | {a[key]:.1f} |")
        r = row["s2_attn/full_attn"]
        lines += ["", f"s2_attn/full_attn step time: {r['min']:.2f} (min) / {r['median']:.2f} (median)", "",
                  f"Perplexity at {row['context']} tokens on held-out blocks (full attention), after "
                  f"{row['train_steps']} steps × 1 block, lr {row['lr']}:", "", "| model | perplexity |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in p.items()] + [""]
    return "\n".join(lines)
