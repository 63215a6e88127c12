"""Trans-LoRA's synthetic data (arXiv:2405.17258, Fig. 1 steps 1-2): few-shot sampling of candidate prompts, the
discriminator LoRA that tells real prompts from synthesized ones, and the rejection sampling that keeps what it
calls real. The pipeline, its config and the distillation are in :mod:`lorakit.compose.translora` (its docstring
has the few-shot format and the discriminator's score ``p = exp ℓ_T / (exp ℓ_T + exp ℓ_F)``).
"""

from __future__ import annotations

import random
import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError, LorakitError
from ..core.model import add_adapter, disable_adapters, set_adapter
from ..data.collate import encode_prompt
from ..data.evaluate import completion_ids
from ..data.example import Example

if TYPE_CHECKING:
    from .translora import TransLoraConfig

DISCRIMINATOR = "translora_discriminator"
DISC_QUESTION = "Is this a real example? {text}\nAnswer:"
REAL, SYNTHETIC = " True", " False"  # one token each in the bundled tokenizer: no length bias


def default_prompt_end(seeds: Sequence[Example]) -> str:
    """The longest common suffix of the seed prompts ("" when they share none)."""
    prompts = [s.prompt for s in seeds]
    end = 0
    while end < min(map(len, prompts)) and len({p[len(p) - end - 1] for p in prompts}) == 1:
        end += 1
    return prompts[0][len(prompts[0]) - end:] if end else ""


def few_shot_context(seeds: Sequence[Example], separator: str) -> str:
    """The seeds as ``prompt + completion`` lines, each ended by ``separator``."""
    for s in seeds:
        if separator in s.prompt + s.completion:
            raise ConfigError(f"seed example {s.prompt!r} contains the few-shot separator {separator!r}; pass a "
                              "separator no seed contains (TransLoraConfig.separator / --separator).")
    return "".join(s.prompt + s.completion + separator for s in seeds)


def cut_candidate(text: str, separator: str, prompt_end: str) -> str | None:
    """The prompt in a sampled line: the text up to and including the first ``prompt_end`` (the whole line when
    ``prompt_end`` is ""); None when the line ends (``separator``) first or the prompt is blank."""
    line = text.split(separator, 1)[0]
    if prompt_end:
        at = line.find(prompt_end)
        if at < 0:
            return None
        line = line[: at + len(prompt_end)]
    return line if line.strip() and line.strip() != prompt_end.strip() else None


@torch.no_grad()
def sample_candidates(model: nn.Module, tokenizer: Any, seeds: Sequence[Example], n: int, config: TransLoraConfig,
                      rng: random.Random) -> tuple[list[str], int]:
    """``n`` samples from ``model`` few-shot prompted with ``seeds`` (shuffled per row), cut into prompts.

    Returns (candidate prompts, number sampled): rows whose line holds no ``prompt_end`` are dropped.
    """
    prompt_end = default_prompt_end(seeds) if config.prompt_end is None else config.prompt_end
    separator = config.separator or (tokenizer.eos_token or "") + (tokenizer.bos_token or "")
    if not separator:
        raise ConfigError("the tokenizer has no EOS/BOS token to separate few-shot examples; set "
                          "TransLoraConfig.separator (e.g. '\\n').")
    contexts = []
    for _ in range(n):
        order = list(seeds)
        rng.shuffle(order)
        contexts.append(encode_prompt(tokenizer, few_shot_context(order, separator)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, contexts))
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, context in enumerate(contexts):  # left padding: every row continues at the same column
        ids[row, width - len(context):] = torch.tensor(context)
        mask[row, width - len(context):] = 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(rng.randrange(2**31))
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                             temperature=config.temperature, top_p=config.top_p, top_k=0,
                             max_new_tokens=config.max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(completion_ids(model, out, width), skip_special_tokens=True)
    cut = (cut_candidate(t, separator, prompt_end) for t in texts)
    return [c for c in cut if c is not None], n


def _disc_example(text: str, real: bool) -> Example:
    return Example(DISC_QUESTION.format(text=text), REAL if real else SYNTHETIC)


@torch.no_grad()
def discriminator_scores(model: nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """P(real) of each prompt under the model's active adapters, (len(prompts),) float32 in [0, 1].

    ``ℓ_a`` is the summed log-probability of answer ``a`` (its tokens, EOS excluded) after the discriminator
    question; P(real) = softmax(ℓ_yes, ℓ_no)[0]."""
    device = next(model.parameters()).device
    answers = [list(tokenizer.encode(a, add_special_tokens=False)) for a in (REAL, SYNTHETIC)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    scores = []
    try:
        for start in range(0, len(prompts), batch_size):
            questions = [encode_prompt(tokenizer, DISC_QUESTION.format(text=p)) for p in prompts[start: start + batch_size]]
            loglik = []
            for answer in answers:
                rows = [q + answer for q in questions]
                width = max(map(len, rows))
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, row in enumerate(rows):  # right padding: the answer sits right after its question
                    ids[r, : len(row)] = torch.tensor(row)
                    mask[r, : len(row)] = 1
                logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
                total = torch.zeros(len(rows), device=device)
                for r, q in enumerate(questions):  # logits at t predict token t + 1
                    positions = torch.arange(len(q) - 1, len(q) - 1 + len(answer), device=device)
                    total[r] = logp[r, positions, torch.tensor(answer, device=device)].sum()
                loglik.append(total)
            scores.append(torch.stack(loglik, dim=-1).softmax(-1)[:, 0].cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


def filter_candidates(prompts: Sequence[str], scores: torch.Tensor, threshold: float) -> list[str]:
    """The prompts the discriminator judges real: ``scores[i] > threshold`` (paper: keep what it calls real)."""
    return [p for p, s in zip(prompts, scores.tolist()) if s > threshold]


def train_discriminator(model: nn.Module, tokenizer: Any, real: Sequence[Example], config: TransLoraConfig,
                        rng: random.Random) -> dict[str, Any]:
    """Add adapter ``DISCRIMINATOR`` to the source base ``model`` and train it on equal numbers of real prompts
    (label yes) and prompts the base, few-shot prompted with the first ``n_seeds`` of ``real``, writes (no).

    Balance: equal numbers of real and synthetic prompts, as translora.py's docstring reads the paper's
    discriminator training (arXiv:2405.17258, Sec. 3 and Fig. 1 step 2-3: real task samples against samples the
    source model synthesises). No official code exists to check it against: the code, docs and pages corpora hold
    no Trans-LoRA repository, and ``fetch github:IBM/Trans-LoRA`` has no snapshot (searched 2026-11-30). Sampling
    runs until it has one synthetic prompt per real one or ``max_rounds`` are spent; when it got fewer, as many of
    the real prompts, drawn with ``rng`` without replacement, are used (the others are not trained on), so the two
    classes stay the same size and the classifier is not pushed towards "real" by the counts alone.

    Run with the source LoRA inactive (the paper's synthetic data for the discriminator comes from the source
    *model*). Returns its accuracy on its training set and the counts: ``real`` and ``synthetic`` (equal, the
    examples trained on) and ``real_available`` (``len(real)``).
    """
    from ..methods.lora import LoraConfig
    from ..training import TrainConfig, train

    seeds = list(real[: config.n_seeds])
    synthetic: list[str] = []
    for _ in range(config.max_rounds):
        if len(synthetic) >= len(real):
            break
        with disable_adapters(model):  # the source *base* imitates the seeds (paper Fig. 1, step 2)
            synthetic += sample_candidates(model, tokenizer, seeds, config.candidates_per_round, config, rng)[0]
    synthetic = synthetic[: len(real)]
    if not synthetic:
        raise LorakitError(no_whole_prompt_message("to train the discriminator, the source base",
                                                   config.max_rounds * config.candidates_per_round, config, seeds))
    used = list(real) if len(synthetic) == len(real) else rng.sample(list(real), len(synthetic))  # equal classes
    if len(used) < len(real):
        warnings.warn(f"Trans-LoRA discriminator: sampling wrote {len(synthetic)} whole synthetic prompts in "
                      f"max_rounds={config.max_rounds} rounds, fewer than the {len(real)} real ones; it trains on "
                      f"{len(used)} of each (raise max_rounds or candidates_per_round for more).", stacklevel=2)
    examples = [_disc_example(ex.prompt, True) for ex in used] + [_disc_example(p, False) for p in synthetic]
    rng.shuffle(examples)
    disc = LoraConfig(r=config.disc_r, lora_alpha=2 * config.disc_r, target_modules="all-linear")
    add_adapter(model, disc, DISCRIMINATOR)
    set_adapter(model, DISCRIMINATOR)
    result = train(model, tokenizer, examples, TrainConfig(steps=config.disc_steps, batch_size=config.disc_batch_size,
                                                             lr=config.disc_lr, seed=config.seed, output_dir=None,
                                                             lr_schedule="cosine"), adapter_name=DISCRIMINATOR,
                   progress=False)
    texts = [ex.prompt for ex in used] + synthetic
    labels = torch.tensor([1.0] * len(used) + [0.0] * len(synthetic))
    accuracy = ((discriminator_scores(model, tokenizer, texts) > 0.5).float() == labels).float().mean().item()
    return {"real": len(used), "synthetic": len(synthetic), "real_available": len(real),
            "train_accuracy": round(accuracy, 4), "final_loss": round(result.losses[-1], 4)}


def synthesize(sample: Callable[[int], tuple[list[str], int]], score: Callable[[list[str]], torch.Tensor],
               config: TransLoraConfig) -> tuple[list[str], int, int]:
    """Rejection sampling: rounds of ``sample(candidates_per_round)`` (candidate prompts, number sampled), kept where
    ``score`` (the discriminator's P(real)) exceeds ``threshold``, until ``n_synthetic`` are kept or ``max_rounds``
    are spent. Returns (kept prompts, candidates sampled, rounds run)."""
    kept: list[str] = []
    sampled = rounds = 0
    while len(kept) < config.n_synthetic and rounds < config.max_rounds:
        candidates, n = sample(config.candidates_per_round)
        sampled, rounds = sampled + n, rounds + 1
        if candidates:
            kept += filter_candidates(candidates, score(candidates), config.threshold)
    if kept and len(kept) < config.n_synthetic:
        warnings.warn(f"Trans-LoRA synthesis: {len(kept)} of the n_synthetic={config.n_synthetic} prompts asked were "
                      f"kept after max_rounds={config.max_rounds} rounds ({sampled} candidates); the target LoRA "
                      f"trains on those {len(kept)} (raise max_rounds or lower threshold for more).", stacklevel=2)
    return kept[: config.n_synthetic], sampled, rounds


def no_whole_prompt_message(who: str, sampled: int, config: TransLoraConfig, seeds: Sequence[Example]) -> str:
    """Error for sampling that yielded no candidate prompt (``who`` wrote the samples), naming the flags to change."""
    end = default_prompt_end(seeds) if config.prompt_end is None else config.prompt_end
    return (f"{who} wrote no whole prompt in {sampled} samples (text ending in the prompt end {end!r} before the "
            f"few-shot separator, within --max-new-tokens {config.max_new_tokens} tokens), so nothing reached the "
            f"discriminator; raise --max-new-tokens so a prompt fits, set --prompt-end / --separator to match your "
            f"prompts' format, or raise --max-rounds (now {config.max_rounds}).")


def nothing_kept_message(sampled: int, scored: int, config: TransLoraConfig, seeds: Sequence[Example]) -> str:
    """Why rejection sampling kept no prompt, naming the ``lorakit transfer`` flags to change: either no sampled
    line held a whole prompt (so the discriminator never saw one), or the discriminator rejected all it scored."""
    if scored == 0:
        return no_whole_prompt_message(f"for the transfer set, the {config.generator} model", sampled, config, seeds)
    return (f"the discriminator rejected all {scored} candidate prompts it scored ({sampled} sampled): none had "
            f"P(real) > --threshold {config.threshold}; lower --threshold, raise --max-rounds (now {config.max_rounds})"
            f" or --disc-steps, or give more real examples (--real-examples).")
