"""Trans-LoRA: "Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning", Wang, Ghosh, Cox,
Antognini, Oliva, Feris, Karlinsky, NeurIPS 2024, arXiv:2405.17258.

Move a LoRA trained on a source base S to a target base T without the data it was trained on (paper Fig. 1):

  1. discriminator, built on the source side while real data exists: S, few-shot prompted with seed examples,
     writes synthetic prompts; a LoRA on S learns to answer `` True`` after a real prompt and `` False`` after a
     synthetic one (equal numbers of each). Its score is P(real | x) = softmax over the two answers'
     log-likelihoods, ``p = exp ℓ_T / (exp ℓ_T + exp ℓ_F)``, ``ℓ_a = Σ_t log p_S+disc(a_t | x, a_<t)``.
  2. synthesis: T (the paper's generator; ``generator="source"`` uses S, ``"teacher"`` S + the source LoRA),
     few-shot prompted with the same seeds,
     samples candidate prompts; a candidate is kept when the discriminator judges it real, ``p > threshold``
     (rejection sampling, in rounds, until ``n_synthetic`` are kept or ``max_rounds`` are spent).
  3. distillation: the teacher S + source LoRA labels every kept prompt with its greedy completion, and a fresh
     LoRA on T (the source adapter's config) is trained on them. ``distill="completions"`` (default) trains on
     the teacher's text with the usual completion-only cross-entropy, the paper's choice as we read it: its
     transfers cross tokenizers (Llama-2 -> Gemma), where only text can pass. ``distill="logits"`` instead
     matches the teacher's next-token distributions on those completion tokens, ``τ² · KL(p_S/τ ‖ p_T/τ)``
     (Hinton et al. 2015), which needs the same tokenizer on both sides (checked; a clear error otherwise).

Few-shot prompt format (ours; the paper prompts instruction-tuned LLMs in words, which ~5M-parameter bases
cannot follow): the seeds as ``prompt + completion`` examples, each ended by ``separator`` (default: the
tokenizer's EOS + BOS, the document boundary the bases were pretrained with, so the next document the model
writes is a new example; ``"\n"`` suits models that read lists of lines); a sampled example is cut after
the first ``prompt_end`` (default: the longest common suffix of the seed prompts, e.g. ``" =>"``) and what comes
before is a candidate prompt. The discriminator sees the prompt alone (what the teacher will answer).

Provenance: no official code was found (the search and code corpora hold no Trans-LoRA repository; the paper's
project link gave none), so this follows the paper's text and Fig. 1: the discriminator is a LoRA on the
*source* base trained on real vs source-synthesized data, transfer data is synthesized by the *target* base
and filtered by it, and the source model + LoRA is the teacher.

Steps 1-2 (few-shot sampling, the discriminator, rejection sampling) are in :mod:`.translora_synthesis`; this
file has the config, step 3 and the pipeline (``transfer_models`` on loaded models, ``transfer`` on files).
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import check_non_negative, check_positive, check_positive_ints, check_range, field_error
from ..core.errors import LorakitError, did_you_mean
from ..core.threads import NUM_THREADS_HELP
from ..core.model import adapter_names, adapter_state, add_adapter, delete_adapter, disable_adapters, set_adapter
from ..data.evaluate import generate_completions
from ..data.example import Example
from . import translora_synthesis as synthesis
from .translora_synthesis import (DISCRIMINATOR, discriminator_scores, nothing_kept_message, synthesize,
                                  train_discriminator)

GENERATORS = ("target", "source", "teacher")
DISTILL = ("completions", "logits")


@dataclass
class TransLoraConfig:
    """How to transfer one adapter.

    - ``n_seeds``: real examples shown in every few-shot prompt (the paper keeps 5 with the LoRA).
    - ``n_synthetic``: filtered synthetic prompts to distill on; ``candidates_per_round`` sampled per round,
      at most ``max_rounds`` rounds. ``temperature``/``top_p``: sampling of candidates; ``max_new_tokens``:
      tokens sampled per candidate. ``separator``/``prompt_end``: the few-shot format (module docstring).
    - ``generator``: which model writes the transfer candidates: "target" (the target base, paper), "source" (the
      source base) or "teacher" (the source base + the source adapter).
    - ``disc_r``, ``disc_steps``, ``disc_lr``, ``disc_batch_size``: the discriminator LoRA and its training;
      ``threshold``: keep a candidate when P(real) > threshold (paper: classified real, 0.5).
    - ``distill``: "completions" (paper) or "logits" (same tokenizer only); ``kd_temperature``: τ of the
      logit KD. ``steps``, ``batch_size``, ``lr``: training of the target adapter. ``seed``: every draw.
    """

    n_seeds: int = 5
    n_synthetic: int = 200
    candidates_per_round: int = 64
    max_rounds: int = 20
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 48
    separator: str | None = None
    prompt_end: str | None = None
    generator: str = "target"
    disc_r: int = 8
    disc_steps: int = 100
    disc_lr: float = 1e-3
    disc_batch_size: int = 16
    threshold: float = 0.5
    distill: str = "completions"
    kd_temperature: float = 1.0
    steps: int = 200
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_non_negative(self, "seed")  # numpy's and Python's seeding refuse a negative seed
        check_positive_ints(self, "n_seeds", "n_synthetic", "candidates_per_round", "max_rounds", "max_new_tokens",
                            "disc_r", "disc_steps", "disc_batch_size", "steps", "batch_size")
        for name, choices in (("generator", GENERATORS), ("distill", DISTILL)):
            value = getattr(self, name)
            if value not in choices:
                raise field_error(self, name, f"={value!r} is not one of {choices}.{did_you_mean(str(value), choices)}")
        check_range(self, "threshold", 0, 1, high_open=True, note=" (keep when P(real) > threshold)")
        check_positive(self, "temperature", "kd_temperature", "lr", "disc_lr", finite=True)  # inf: NaN sampling, NaN weights
        check_range(self, "top_p", 0, 1, low_open=True)
        if self.separator is not None and not self.separator:
            raise field_error(self, "separator", " must be a non-empty string (it ends each few-shot example) or None "
                                                 "(the tokenizer's EOS + BOS, the document boundary of pretraining).")


@dataclass
class TransferResult:
    """What ``transfer`` did: the kept synthetic set, the rounds of rejection sampling, the discriminator."""

    adapter_dir: Path | None
    examples: list[Example]
    candidates: int = 0
    kept: int = 0
    rounds: int = 0
    discriminator: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "kept": self.kept, "rounds": self.rounds,
                "keep_rate": round(self.kept / max(1, self.candidates), 4), "discriminator": self.discriminator,
                "train": self.train, "adapter_dir": None if self.adapter_dir is None else str(self.adapter_dir)}


def check_same_tokenizer(source_tokenizer: Any, target_tokenizer: Any) -> None:
    """Raise LorakitError unless both tokenizers map every token to the same id (with the same specials)."""
    vs, vt = source_tokenizer.get_vocab(), target_tokenizer.get_vocab()
    if vs != vt:
        only_s, only_t = sorted(set(vs) - set(vt))[:3], sorted(set(vt) - set(vs))[:3]
        moved = sorted(k for k in set(vs) & set(vt) if vs[k] != vt[k])[:3]
        raise LorakitError(
            f"the source and target tokenizers differ (vocab {len(vs)} vs {len(vt)}; only in source: {only_s}, "
            f"only in target: {only_t}, other ids: {moved}); logit distillation compares the two models token by "
            "token, so it needs one tokenizer. Use distill='completions' (text labels, as the paper) instead.")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(source_tokenizer, name) != getattr(target_tokenizer, name):
            raise LorakitError(f"the source and target tokenizers disagree on {name} "
                               f"({getattr(source_tokenizer, name)} vs {getattr(target_tokenizer, name)}).")


def _distill_logits(teacher: nn.Module, student: nn.Module, tokenizer: Any, examples: Sequence[Example],
                    config: TransLoraConfig) -> dict[str, Any]:
    """Train the student's active adapter on ``τ² · KL(softmax(z_S/τ) ‖ softmax(z_T/τ))`` averaged over the
    completion tokens of ``examples`` (the teacher's greedy answers + EOS); AdamW, cosine decay."""
    from ..data.collate import CausalLMCollator, tokenize_example

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / config.steps)).item()))
    rows = [tokenize_example(ex, tokenizer) for ex in examples]
    collate = CausalLMCollator.from_tokenizer(tokenizer)
    device = next(student.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    tau, losses = config.kd_temperature, []
    teacher.eval()
    student.train()
    for _ in range(config.steps):
        pick = torch.randint(len(rows), (min(config.batch_size, len(rows)),), generator=generator).tolist()
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in pick]).items() if torch.is_tensor(v)}
        with torch.no_grad():
            z_s = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        z_t = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        on = batch["labels"][:, 1:] != -100  # (B, T-1): positions whose next token is a completion token
        kl = F.kl_div((z_t[on] / tau).log_softmax(-1), (z_s[on] / tau).log_softmax(-1), log_target=True,
                      reduction="batchmean") * tau**2
        kl.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(kl.item())
    student.eval()
    return {"steps": config.steps, "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4)}


def transfer_models(source: nn.Module, source_tokenizer: Any, target: nn.Module, target_tokenizer: Any,
                    real_examples: Sequence[Example], config: TransLoraConfig | None = None, *,
                    adapter_name: str = "default", target_adapter_config=None) -> TransferResult:
    """Trans-LoRA on loaded models: ``source`` carries the trained adapter ``adapter_name``; a fresh adapter of the
    same config (or ``target_adapter_config``) named ``adapter_name`` is added to ``target`` and trained.

    ``real_examples``: the real data the discriminator is trained on (the paper: the source LoRA's training data,
    available on the source side); its first ``n_seeds`` are the few-shot seeds. Only these seeds and the
    discriminator are used at transfer time. ``target`` ends with the trained adapter active.
    Raises LorakitError for mismatched tokenizers under ``distill="logits"``, an empty ``real_examples``, or a
    synthesis that kept nothing; ConfigError for a bad config.
    """
    from ..training import TrainConfig, train

    config = config or TransLoraConfig()
    real_examples = list(real_examples)
    _check_real_examples(real_examples, config)
    if adapter_name not in adapter_names(source):
        raise LorakitError(f"the source model has no adapter {adapter_name!r} (it has {adapter_names(source)}).")
    if config.distill == "logits":
        check_same_tokenizer(source_tokenizer, target_tokenizer)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    seeds = real_examples[: config.n_seeds]
    active = list(adapter_state(source).active)
    try:  # the discriminator adapter is the source's only while it scores: gone, the active ones back, on any exit
        stats = train_discriminator(source, source_tokenizer, real_examples, config, rng)  # source LoRA off
        kept, sampled, rounds, scored = _synthesize_scored(source, source_tokenizer, target, target_tokenizer,
                                                          adapter_name, seeds, config, rng)
    finally:
        set_adapter(source, active)
        if DISCRIMINATOR in adapter_names(source):
            delete_adapter(source, DISCRIMINATOR)
    if not kept:
        raise LorakitError(nothing_kept_message(sampled, scored, config, seeds))
    set_adapter(source, adapter_name)
    answers = generate_completions(source, source_tokenizer, kept, max_new_tokens=config.max_new_tokens)
    examples = [Example(p, a) for p, a in zip(kept, answers)]
    # the source's config, minus its base: the saved file names the target (PEFT's AutoPeftModel loads that base)
    fresh = target_adapter_config or dataclasses.replace(adapter_state(source).configs[adapter_name],
                                                         inference_mode=False, base_model_name_or_path=None)
    add_adapter(target, fresh, adapter_name)
    set_adapter(target, adapter_name)
    if config.distill == "completions":
        run = train(target, target_tokenizer, examples, TrainConfig(steps=config.steps, batch_size=config.batch_size,
                                                                   lr=config.lr, seed=config.seed, output_dir=None,
                                                                   lr_schedule="cosine"),
                    adapter_name=adapter_name, progress=False)
        summary = {"steps": run.steps, "first_loss": round(run.losses[0], 4), "final_loss": round(run.losses[-1], 4)}
    else:
        summary = _distill_logits(source, target, target_tokenizer, examples, config)
    return TransferResult(None, examples, candidates=sampled, kept=len(kept), rounds=rounds, discriminator=stats,
                          train=summary)


def _check_real_examples(real_examples: Sequence[Example], config: TransLoraConfig) -> None:
    if len(real_examples) < config.n_seeds:
        raise LorakitError(f"Trans-LoRA needs at least n_seeds={config.n_seeds} real examples (the few-shot seeds), "
                           f"got {len(real_examples)}.")


def _synthesize_scored(source: nn.Module, source_tokenizer: Any, target: nn.Module, target_tokenizer: Any,
                       adapter_name: str, seeds: list[Example], config: TransLoraConfig,
                       rng: random.Random) -> tuple[list[str], int, int, int]:
    """``synthesize`` with ``config.generator``'s sampler and the trained discriminator as the scorer:
    (kept prompts, candidates sampled, rounds, prompts scored)."""
    def sample(n: int) -> tuple[list[str], int]:
        if config.generator == "target":
            return synthesis.sample_candidates(target, target_tokenizer, seeds, n, config, rng)
        if config.generator == "teacher":
            set_adapter(source, adapter_name)
            return synthesis.sample_candidates(source, source_tokenizer, seeds, n, config, rng)
        with disable_adapters(source):
            return synthesis.sample_candidates(source, source_tokenizer, seeds, n, config, rng)

    scored = 0

    def score(prompts: list[str]) -> torch.Tensor:
        nonlocal scored
        scored += len(prompts)
        set_adapter(source, DISCRIMINATOR)
        return discriminator_scores(source, source_tokenizer, prompts)

    kept, sampled, rounds = synthesize(sample, score, config)
    return kept, sampled, rounds, scored


def check_inputs(adapter: str | os.PathLike, source_model: str | os.PathLike | None,
                 target_model: str | os.PathLike | None) -> None:
    """What :func:`transfer` reads, checked before either model loads: the adapter folder (config + safetensors
    header) and both model names (``lorakit.hub.check_model``); errors name the flag (--adapter, --source-model,
    --target-model)."""
    from ..hub import check_model
    from ..io.peft_format import check_adapter_folder

    check_adapter_folder(adapter)
    check_model(source_model, "--source-model")
    check_model(target_model, "--target-model")


def transfer(adapter: str | os.PathLike, source_model: str | os.PathLike | None, target_model: str | os.PathLike | None,
             real_examples: Sequence[Example], output: str | os.PathLike, config: TransLoraConfig | None = None, *,
             device: str = "cpu", overwrite: bool = False) -> TransferResult:
    """Trans-LoRA from files: load ``adapter`` onto ``source_model`` (a model name as ``lorakit.hub`` takes:
    None/"bundled", "bundled-small", a folder or cached hub id), transfer it to ``target_model`` and write the new
    adapter (PEFT layout) plus ``translora.json`` (what was done) to ``output`` atomically.

    Raises AdapterLoadError for a missing/invalid adapter folder and LorakitError for a model name that names no
    model (:func:`check_inputs`) or for ``output`` a non-empty folder without ``overwrite=True`` (as ``lorakit
    transfer`` refuses ``--output`` without ``--overwrite``), a file, or a folder holding the adapter — all before
    any model loads; LorakitError for a model that cannot be loaded and for the conditions ``transfer_models`` lists.
    """
    import json

    from ..hub import load_model_and_tokenizer
    from ..io.peft_format import load_adapter, save_adapter
    from ..io.files import write_dir_atomically

    from ..cli_parser import check_output_dir

    check_inputs(adapter, source_model, target_model)
    check_output_dir(output, "output", overwrite=overwrite, reads=[adapter, source_model, target_model],
                     switch="overwrite=True")
    real_examples = list(real_examples)
    _check_real_examples(real_examples, config or TransLoraConfig())  # before either model loads
    source, source_tokenizer = load_model_and_tokenizer(source_model, device=device)
    target, target_tokenizer = load_model_and_tokenizer(target_model, device=device)
    load_adapter(source, adapter)
    result = transfer_models(source, source_tokenizer, target, target_tokenizer, real_examples, config)

    def write(folder: Path) -> None:
        save_adapter(target, folder)
        info = {"method": "trans-lora", "paper": "arXiv:2405.17258", "source_adapter": str(adapter),
                "source_model": str(source_model or "bundled"), "target_model": str(target_model or "bundled"),
                "config": dataclasses.asdict(config or TransLoraConfig()), **result.summary(),
                "synthetic_examples": [dataclasses.asdict(ex) for ex in result.examples[:20]]}
        (folder / "translora.json").write_text(json.dumps(info, indent=2) + "\n")

    result.adapter_dir = write_dir_atomically(output, write)
    return result


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    r"""``\n``, ``\t``, ``\r`` and ``\\`` typed in a shell as the characters they name (``--separator "\n"`` is
    a newline, as docs/transfer.md means it); any other text, non-ASCII included, is returned as it is."""
    import re

    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def build_parser():
    from ..cli_parser import CommandParser, DefaultsFormatter

    p = CommandParser(prog="lorakit transfer", formatter_class=DefaultsFormatter, description="Trans-LoRA (arXiv:2405.17258): move an adapter "
                                "to a new base model without its training data (synthetic prompts from the target "
                                "base, filtered by a discriminator LoRA, labelled by the source model + adapter).")
    p.add_argument("--adapter", required=True,
                   help="the trained adapter folder on the source model (a training run folder: its adapter/)")
    p.add_argument("--source-model", default=None, help="the adapter's base (default: bundled)")
    p.add_argument("--target-model", required=True, help="the new base: bundled-small, bundled, a folder or hub id")
    p.add_argument("--data", required=True, help="real examples for the discriminator (the first --n-seeds are the "
                   "few-shot seeds): built-in task name(s) or a JSONL file")
    p.add_argument("--real-examples", type=int, default=100, help="how many of --data (task train split)")
    p.add_argument("--output", required=True, help="folder for the new adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    p.add_argument("--num-threads", type=int, default=0, help=f"torch CPU threads ({NUM_THREADS_HELP}; default: 0)")
    defaults = TransLoraConfig()
    unset = {"separator": "ends each few-shot example; \\n for a newline (default: the tokenizer's EOS + BOS)",
             "prompt_end": "where a sampled example's prompt ends (default: the longest common suffix of the seed "
                           "prompts)"}
    for f in dataclasses.fields(TransLoraConfig):
        kind = type(getattr(defaults, f.name)) if getattr(defaults, f.name) is not None else str
        if f.name in ("separator", "prompt_end"):
            kind = unescape
        default = getattr(defaults, f.name)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                       help=unset[f.name] if default is None else f"default: {default!r}")
    return p

