"""Pretrain the small Llama-architecture base model that lorakit bundles.

One plain loop: build the corpus, train a tokenizer on it, pack the tokens into fixed-length blocks, train
``LlamaForCausalLM`` with AdamW and a warmup + cosine schedule, then save a Hugging Face model folder
atomically (written beside the target, then renamed into place) with a ``pretrain_info.json`` recording how
it was made. Everything is seeded, so the same config on the same library versions gives the same model.

With ``checkpoint_every`` > 0 the loop's whole state (weights, AdamW moments, schedule, data order and position,
RNG states, losses so far) is saved every that many steps to ``OUT.checkpoint/`` beside the output folder
(safetensors + JSON, nothing pickled; written atomically), and the same command run again resumes from it: the
data and tokenizer are rebuilt from the seed, so the resumed run gives the model an uninterrupted run gives.
The checkpoint folder is removed once the model is saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, get_type_hints

import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit.assets import BASE_MODEL_PATH
from lorakit.cli_parser import CommandParser, check_output_dir, seed_arg
from lorakit.core.config import check_non_negative, check_positive, field_error
from lorakit.core.errors import FIELD, ConfigError, LorakitError, did_you_mean
from lorakit.core.threads import resolve_num_threads
from lorakit.io.files import atomic_write_json, load_tensors, read_json, save_tensors, write_dir_atomically
from lorakit.pretrain.corpus import Corpus, CorpusConfig, TaskTextsFn, build_corpus
from lorakit.pretrain.domains import mixture_training_data, parse_mixture
from lorakit.pretrain.mixln import MixLNForCausalLM, check_alpha, mixln_config
from lorakit.pretrain.tokenizer import save_tokenizer, train_tokenizer, wrap_tokenizer

BASE_MODEL_DIR = BASE_MODEL_PATH

# An objective turns a batch of packed token blocks (B, T) into the model's forward kwargs. Denoising or
# other objectives register here; ``generator`` is the run's seeded source for any corruption they draw. One
# that needs tokens of its own (UL2's mode tokens and sentinels) has ``prepare(tokenizer, seq_len)``, called
# before the model is built, which adds them to the tokenizer and returns the batch function to use.
Objective = Callable[[torch.Tensor, torch.Generator], dict]
OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str) -> Callable[[Objective], Objective]:
    def register(fn: Objective) -> Objective:
        OBJECTIVES[name] = fn
        return fn
    return register


@register_objective("causal")
def causal_objective(blocks: torch.Tensor, generator: torch.Generator) -> dict:
    """Next-token prediction on every position; the model shifts labels itself."""
    return {"input_ids": blocks, "labels": blocks}


def prepare_objective(name: str, tokenizer: PreTrainedTokenizerFast, seq_len: int) -> Objective:
    """The batch function of objective ``name``; one with ``prepare`` first adds its tokens to ``tokenizer``."""
    objective = OBJECTIVES[name]
    prepare = getattr(objective, "prepare", None)
    return prepare(tokenizer, seq_len) if prepare is not None else objective


# Layer-norm placement (Mix-LN, arXiv 2412.13795): "pre" is plain Llama; "post" and "mix" build the registered
# lorakit-mixln model with Post-LN in the first floor(alpha * L) layers (alpha 1 for "post").
NORMS = ("pre", "post", "mix")


@dataclass
class PretrainConfig:
    """One pretraining run of a small base model; each field's ``help`` is its ``lorakit pretrain-base`` flag's
    text (an empty-string default says there what leaving it empty does)."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    objective: str = field(default="causal", metadata={"help": "pretraining objective"})
    mixture: str = field(default="", metadata={"help": "data mixture over lorakit.pretrain.domains: natural | uniform "
                         "| regmix (read from --regmix-dir) | domain=weight,... (default: none, the stdlib + tasks corpus)"})
    mixture_scale: float = field(default=1.0, metadata={"help": "times each domain's natural character budget (with "
                                                                "--mixture)"})
    regmix_dir: str = field(default="", metadata={"help": "folder of `lorakit regmix` whose regmix.json --mixture "
                                                          "regmix reads (default: none; needed by --mixture regmix)"})
    norm: str = field(default="pre", metadata={"help": "norm placement (mix: Mix-LN, Post-LN in the first "
                                                       "floor(mix_ln_alpha * num_layers) layers)"})
    # read only with norm="mix"; another value with "pre" or "post" is an error
    mix_ln_alpha: float = field(default=0.25, metadata={"help": "share of layers in Post-LN with --norm mix"})
    # a reused tokenizer (e.g. the bundled base's) gives a second base the same token ids
    tokenizer: str = field(default="", metadata={"help": "a model folder whose tokenizer is reused as is, e.g. the "
                           "bundled base's (default: none, a new one of --vocab-size tokens is trained)"})
    vocab_size: int = field(default=4096, metadata={"help": "tokens of a newly trained tokenizer"})
    hidden_size: int = field(default=256, metadata={"help": "model width"})
    num_layers: int = field(default=6, metadata={"help": "decoder layers"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    num_kv_heads: int = field(default=2, metadata={"help": "key/value heads (grouped-query attention)"})
    intermediate_size: int = field(default=688, metadata={"help": "MLP width"})
    max_position_embeddings: int = field(default=256, metadata={"help": "longest sequence the model takes"})
    seq_len: int = field(default=128, metadata={"help": "training sequence length in tokens"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    steps: int = field(default=1500, metadata={"help": "optimizer steps"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of --lr (cosine "
                                                               "decay)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    # weights and optimizer stay fp32. Off by default: without native bf16 matmuls (AVX2 only, as on this project's
    # machines) it is several times slower than fp32 (benchmarks/pretrain_bf16). It may pay on CPUs with
    # AVX512-BF16 or AMX; measure there with that script.
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast of the matmuls (slower without native bf16 "
                                                        "CPU matmuls)"})
    eval_fraction: float = field(default=0.02, metadata={"help": "share of the corpus held out for the eval loss"})
    seed: int = field(default=0, metadata={"help": "seed of the model and the data order"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: as every lorakit command's "
                             "default, OMP_NUM_THREADS if set, else half the CPUs (1 to 8); a resume needs the same "
                             "count, as the weights differ across counts (default: 0)"})
    log_every: int = field(default=25, metadata={"help": "steps between log lines"})
    checkpoint_every: int = field(default=0, metadata={"help": "save the loop's state every N steps to "
                                  "OUT.checkpoint/, which the same command resumes from, this and --log-every may change on resume (0: never)"})

    def check_steps(self) -> None:
        """ConfigError naming ``checkpoint_every`` when the run would never checkpoint: the loop saves after every
        N-th step but the last (``train_steps``), so N >= ``steps`` saves nothing. ``lorakit pretrain-base``
        refuses it before any data is built; :func:`pretrain_base` warns with the message (as ``lorakit train``'s
        schedules, ``TrainConfig.check_steps``)."""
        if self.checkpoint_every and self.checkpoint_every >= self.steps:
            raise field_error(self, "checkpoint_every", f"={self.checkpoint_every} with steps={self.steps}: the loop "
                              "saves its state after every checkpoint_every-th step but the last, so this run would "
                              "write no checkpoint to resume from; lower checkpoint_every below steps, or use 0.")

    def __post_init__(self) -> None:
        check_non_negative(self, "seed")  # numpy's and Python's seeding refuse a negative seed
        if isinstance(self.corpus, dict):
            self.corpus = CorpusConfig(**self.corpus)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"Unknown pretraining objective {self.objective!r}; choose one of "
                              f"{sorted(OBJECTIVES)}.{did_you_mean(self.objective, OBJECTIVES)}",
                              field="PretrainConfig.objective")
        check_seq_len = getattr(OBJECTIVES[self.objective], "check_seq_len", None)  # before any data is built
        if check_seq_len is not None and self.seq_len > 0:
            check_seq_len(self.seq_len)
        if self.norm not in NORMS:
            raise ConfigError(f"Unknown norm placement {self.norm!r}; choose one of {list(NORMS)}."
                              f"{did_you_mean(self.norm, NORMS)}", field="PretrainConfig.norm")
        check_alpha(self.mix_ln_alpha)
        default_alpha = next(f.default for f in dataclasses.fields(self) if f.name == "mix_ln_alpha")
        if self.norm != "mix" and self.mix_ln_alpha != default_alpha:
            layout = "plain Pre-LN" if self.norm == "pre" else "Post-LN in every layer (alpha 1)"
            raise ConfigError(f"--mix-ln-alpha {self.mix_ln_alpha} is read only with --norm mix; --norm {self.norm} "
                              f"builds {layout} and would ignore it. Use --norm mix, or drop --mix-ln-alpha.",
                              field="PretrainConfig.mix_ln_alpha")
        if self.norm == "mix" and math.floor(self.mix_ln_alpha * self.num_layers) < 1:
            raise ConfigError(f"--norm mix with --mix-ln-alpha {self.mix_ln_alpha} and {self.num_layers} layers puts "
                              f"floor(alpha * layers) = 0 layers in Post-LN: that is plain Pre-LN. Raise alpha or the "
                              "layer count, or use --norm pre.", field="PretrainConfig.mix_ln_alpha")
        # counts first: a 0 there would otherwise fail as a divisibility or a length below
        for name in ("steps", "batch_size", "seq_len", "num_layers", "log_every", "hidden_size", "num_heads",
                     "num_kv_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise field_error(self, name, f" must be > 0, got {getattr(self, name)}.")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{FIELD} ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}).",
                              field="hidden_size")
        if (self.hidden_size // self.num_heads) % 2:  # transformers' RoPE raised it after the corpus was built
            raise ConfigError(f"{FIELD} ({self.hidden_size}) / num_heads ({self.num_heads}) = "
                              f"{self.hidden_size // self.num_heads} per head; rotary embeddings need an even head "
                              "width: change hidden_size or num_heads.", field="hidden_size")
        if self.seq_len < 2:  # one token per block predicts nothing: every loss was NaN and a NaN model was saved
            raise ConfigError(f"{FIELD} must be >= 2 (a block's first token has nothing before it to predict it "
                              f"from), got {self.seq_len}.", field="seq_len")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{FIELD} ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads}).",
                              field="num_heads")
        if self.seq_len > self.max_position_embeddings:
            raise ConfigError(f"{FIELD} ({self.seq_len}) exceeds max_position_embeddings "
                              f"({self.max_position_embeddings}); lower seq_len or raise the other.",
                              field="seq_len")
        if self.tokenizer and not (Path(self.tokenizer) / "tokenizer.json").is_file():
            raise field_error(self, "tokenizer", f"={self.tokenizer!r} is not a folder with a tokenizer.json; "
                              "pass a model folder (e.g. the bundled base's) or leave it empty to train one.")
        if self.vocab_size < 300:
            raise ConfigError(f"{FIELD} must be >= 300 (256 bytes + special tokens), got {self.vocab_size}.",
                              field="vocab_size")
        check_non_negative(self, "checkpoint_every", note=" (0: no checkpoints)")
        # AdamW raised on a NaN or negative lr only after the corpus and tokenizer were built; a NaN weight decay or
        # clip trained a NaN model that was saved, and a clip of 0 zeroes every gradient
        check_positive(self, "lr", "grad_clip", finite=True)
        check_non_negative(self, "weight_decay", finite=True)
        check_non_negative(self, "warmup_steps")
        check_non_negative(self, "num_threads", note=" (0: OMP_NUM_THREADS if set, else half the CPUs)")
        if not 0.0 <= self.eval_fraction < 0.5:
            raise ConfigError(f"{FIELD} must be in [0, 0.5), got {self.eval_fraction}.",
                              field="eval_fraction")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{FIELD} must be in [0, 1], got {self.min_lr_ratio}.", field="min_lr_ratio")
        if self.mixture:
            parse_mixture(self.mixture)
            check_positive(self, "mixture_scale", finite=True, note="; it multiplies each domain's natural character "
                                                                    "budget")
            if self.mixture == "regmix" and not self.regmix_dir:
                raise ConfigError(f"mixture='regmix' needs {FIELD}, the folder `lorakit regmix --out` wrote.",
                                  field="regmix_dir")
        # like mix_ln_alpha without norm="mix": an option the run would not read is refused, not ignored
        if not self.mixture and self.mixture_scale != 1.0:
            raise ConfigError(f"mixture_scale {self.mixture_scale} is read only with a mixture; without mixture the "
                              "corpus is the stdlib + tasks one (its size: stdlib_chars). Give a mixture, or drop "
                              "mixture_scale.", field="PretrainConfig.mixture_scale")
        if self.regmix_dir and self.mixture != "regmix":
            raise ConfigError(f"regmix_dir {self.regmix_dir!r} is read only with mixture='regmix', not "
                              f"mixture={self.mixture!r}. Give mixture='regmix', or drop regmix_dir.",
                              field="PretrainConfig.regmix_dir")


def pack_corpus(corpus: Corpus, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int) -> torch.Tensor:
    """Documents as ``<s> text </s>`` in a seeded order, concatenated and cut into (N, seq_len) blocks."""
    docs = list(corpus.documents)
    random.Random(seed).shuffle(docs)
    encodings = tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = []
    for enc in encodings:
        stream.append(bos)
        stream.extend(enc.ids)
        stream.append(eos)
    n_blocks = len(stream) // seq_len
    if n_blocks < 2:
        raise ConfigError(f"The corpus gives {len(stream)} tokens, fewer than two blocks of seq_len={seq_len}; "
                          "raise CorpusConfig.stdlib_chars.")
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)  # (N, T)


def load_pretrained_tokenizer(folder: str | Path, model_max_length: int) -> PreTrainedTokenizerFast:
    """The tokenizer saved in ``folder`` (its ``tokenizer.json``), wrapped as ``train_tokenizer`` wraps a new one."""
    from tokenizers import Tokenizer

    file = Path(folder) / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library's parse error is a bare Exception
        raise ConfigError(f"{FIELD} {folder}: {file} cannot be loaded ({e}); give a model folder with a valid "
                          f"tokenizer.json, or leave {FIELD} empty to train one.", field="tokenizer") from None
    return wrap_tokenizer(tokenizer, model_max_length)


def build_model(config: PretrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if config.norm == "pre":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        model = MixLNForCausalLM(mixln_config(1.0 if config.norm == "post" else config.mix_ln_alpha, **shape))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    return model


def lr_lambda(config: PretrainConfig) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine down to ``min_lr_ratio`` at the last step."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_optimizer(model: torch.nn.Module, config: PretrainConfig) -> torch.optim.AdamW:
    # Norm gains are not decayed: pulling them to zero shrinks activations rather than regularising.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate_loss(model: LlamaForCausalLM, blocks: torch.Tensor, config: PretrainConfig) -> float | None:
    if len(blocks) == 0:
        return None
    model.eval()
    losses = []
    for i in range(0, len(blocks), config.batch_size):
        batch = blocks[i: i + config.batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            losses.append(model(input_ids=batch, labels=batch).loss.float().item() * len(batch))
    model.train()
    return sum(losses) / len(blocks)


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, train_blocks: torch.Tensor,
                config: PretrainConfig, objective: Objective, generator: torch.Generator,
                log: Callable[[str], None] = print, *, resume: dict | None = None, checkpoint_every: int = 0,
                save_checkpoint: Callable[[dict], None] | None = None) -> tuple[list[float], list[list]]:
    """``config.steps`` optimizer steps over ``train_blocks`` (N, T) in seeded epochs of ``config.batch_size``
    blocks, with CPU bf16 autocast if ``config.bf16`` and gradient clipping; (per-step losses, logged curve of
    [step, mean loss]). Shared by ``pretrain_base`` and LoRAM's alignment of a pruned model (``pretrain/loram_align.py``).

    ``save_checkpoint(position)`` is called after every ``checkpoint_every``-th step but the last, with the loop's
    position: ``step`` (steps done), ``permutation`` (N,) and ``cursor`` (the data order and place in it),
    ``losses`` and ``curve``; ``resume`` (such a position, with model, optimizer, scheduler and ``generator``
    already restored) continues from there."""
    if len(train_blocks) < config.batch_size:  # a batch took every block, and tokens_seen / tok/s counted batch_size
        raise ConfigError(f"batch_size={config.batch_size} exceeds the {len(train_blocks)} training blocks of the "
                          f"corpus ({config.seq_len} tokens each); lower batch_size or give more text (stdlib_chars).",
                          field="batch_size")
    window_start = time.perf_counter()
    if resume is None:
        losses, curve, start = [], [], 0
        permutation, cursor = torch.randperm(len(train_blocks), generator=generator), 0
    else:
        losses, curve, start = list(resume["losses"]), [list(c) for c in resume["curve"]], resume["step"]
        permutation, cursor = resume["permutation"], resume["cursor"]
    for step in range(start, config.steps):
        if cursor + config.batch_size > len(permutation):  # new epoch, new order
            permutation, cursor = torch.randperm(len(train_blocks), generator=generator), 0
        batch = train_blocks[permutation[cursor: cursor + config.batch_size]]  # (B, T)
        cursor += config.batch_size
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = model(**objective(batch, generator)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            window = losses[-config.log_every:]
            elapsed = time.perf_counter() - window_start
            mean = sum(window) / len(window)
            curve.append([step + 1, round(mean, 4)])
            log(f"step {step + 1}/{config.steps} loss {mean:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                f"{len(window) * batch.numel() / elapsed:.0f} tok/s")
            window_start = time.perf_counter()
        if save_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 \
                and step + 1 < config.steps:
            save_checkpoint({"step": step + 1, "permutation": permutation, "cursor": cursor, "losses": losses,
                             "curve": curve})
    return losses, curve


CHECKPOINT_FORMAT = "lorakit-pretrain-checkpoint/1"
# How often the loop logs and saves: a run may be resumed with these changed, as they leave the weights alone
# (log_every sets the loss curve's points and the final_loss window of pretrain_info.json, not a step).
CADENCE_FIELDS = frozenset({"log_every", "checkpoint_every"})
# The thread count is compared as used (``threads`` in state.json), not as asked: num_threads 0 means
# OMP_NUM_THREADS or half the CPUs, so the same option may give another count, and another option the same one.
# Another count is refused: torch's CPU kernels split their sums (matmuls, reductions) by thread, so the weights are
# not bit-identical across counts (the bundled base's size, 4 steps: 1 vs 2, 3 or 4 threads differ by up to 6e-4).
THREADS_FIELD = "num_threads"


def checkpoint_dir(out_dir: str | Path) -> Path:
    """Where ``pretrain_base`` keeps the loop's state for ``out_dir``: ``OUT.checkpoint`` beside it."""
    out = Path(out_dir).resolve()
    return out.with_name(out.name + ".checkpoint")


def _optimizer_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (its state is keyed by that index)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def save_pretrain_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                             generator: torch.Generator, position: dict, config: PretrainConfig,
                             train_seconds: float, train_cpu_seconds: float) -> None:
    """Write the loop's state to ``folder`` atomically: ``state.safetensors`` (parameters ``param.<name>``, AdamW
    moments ``optimizer.<name>.<slot>``, ``permutation``, RNG states) and ``state.json`` (step, cursor, losses,
    curve, schedule, config)."""
    names = _optimizer_names(model, optimizer)
    tensors = {f"param.{name}": p for name, p in model.named_parameters()}  # tied weights once
    for index, slots in optimizer.state_dict()["state"].items():
        for slot, value in slots.items():
            tensors[f"optimizer.{names[index]}.{slot}"] = torch.as_tensor(value)
    tensors.update({"permutation": position["permutation"], "rng.cpu": torch.get_rng_state(),
                    "rng.generator": generator.get_state()})
    schedule = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    record = {"format": CHECKPOINT_FORMAT, "step": position["step"], "cursor": position["cursor"],
              "losses": position["losses"], "curve": position["curve"], "scheduler": schedule,
              "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
              "threads": torch.get_num_threads(), "config": json.loads(json.dumps(dataclasses.asdict(config)))}

    def write(tmp: Path) -> None:
        save_tensors(tmp / "state.safetensors", tensors)
        atomic_write_json(tmp / "state.json", record)

    write_dir_atomically(folder, write)


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"corpus": {"seed": 0}} -> {"corpus.seed": 0}"""
    out = {}
    for key, value in d.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def load_pretrain_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                             generator: torch.Generator, config: PretrainConfig) -> dict:
    """Restore what ``save_pretrain_checkpoint`` wrote, in place; returns the loop position for ``train_steps``
    plus ``train_seconds`` and ``train_cpu_seconds``. ConfigError when the checkpoint was made with another config
    or cannot be read (a file cut off or edited: saves are atomic, so not by a killed run)."""
    try:
        return _load_pretrain_checkpoint(folder, model, optimizer, scheduler, generator, config)
    except (LorakitError, KeyError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, ConfigError):
            raise
        why = f"no {e}" if isinstance(e, KeyError) else str(e)
        raise ConfigError(f"The checkpoint {folder} cannot be read ({why}); delete the folder to start over.") from None


def _load_pretrain_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                              generator: torch.Generator, config: PretrainConfig) -> dict:
    record = read_json(folder / "state.json")  # a JSON object (read_json refuses anything else)
    if record.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{folder / 'state.json'} has format {record.get('format')!r}, not {CHECKPOINT_FORMAT!r}; "
                          "delete the folder to start over.")
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    before, after = _flatten(record["config"]), _flatten(now)
    diff = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
            if k not in CADENCE_FIELDS | {THREADS_FIELD} and before.get(k) != after.get(k)]
    if diff:
        raise ConfigError(f"The checkpoint {folder} was made with other settings ({'; '.join(diff)}); rerun with the "
                          "same options to resume, or delete the folder to start over.")
    threads = record.get("threads", before.get(THREADS_FIELD) or None)  # (older checkpoints: the option, if not 0)
    if threads is not None and threads != torch.get_num_threads():
        raise ConfigError(f"The checkpoint {folder} was trained with {threads} CPU thread(s), this run has "
                          f"{torch.get_num_threads()} ({FIELD}={config.num_threads}"
                          f"{': OMP_NUM_THREADS, else half the CPUs' if not config.num_threads else ''}): torch's CPU "
                          f"kernels split their sums by thread, so the resumed model would differ from the one an "
                          f"uninterrupted run gives. Rerun with {FIELD}={threads} to resume, or delete the folder to "
                          f"start over.", field=THREADS_FIELD)
    tensors = load_tensors(folder / "state.safetensors")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[f"param.{name}"])
    index_of = {name: i for i, name in enumerate(_optimizer_names(model, optimizer))}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            name, slot = key[len("optimizer."):].rsplit(".", 1)
            state.setdefault(index_of[name], {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    scheduler.load_state_dict({**record["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    for group, lr in zip(optimizer.param_groups, record["scheduler"]["_last_lr"]):
        group["lr"] = lr  # the lr the next step uses, as the scheduler left it
    torch.set_rng_state(tensors["rng.cpu"])
    generator.set_state(tensors["rng.generator"])
    return {"step": record["step"], "cursor": record["cursor"], "permutation": tensors["permutation"],
            "losses": record["losses"], "curve": record["curve"], "train_seconds": record["train_seconds"],
            "train_cpu_seconds": record["train_cpu_seconds"]}


def pretrain_base(config: PretrainConfig, out_dir: str | Path, *, task_source: TaskTextsFn | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Pretrain a base model per ``config`` and save it to ``out_dir``; returns what ``pretrain_info.json`` holds.

    ``task_source(n_per_task, seed)`` replaces ``lorakit.data.tasks.pretraining_texts`` as the task half of
    the corpus when given.
    """
    try:
        config.check_steps()  # a checkpoint cadence the run ends before (lorakit pretrain-base refuses it)
    except ConfigError as e:
        warnings.warn(str(e), stacklevel=2)
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(resolve_num_threads(config.num_threads))
    try:
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        if config.mixture:
            if config.tokenizer:
                raise ConfigError("pretrain-base: --tokenizer (reuse a tokenizer) and --mixture (train one on the "
                                  "mixture's domains) cannot be combined yet; drop one of them")
            generator = torch.Generator().manual_seed(config.seed)
            tokenizer, train_blocks, eval_sets, corpus_stats = mixture_training_data(config, generator, task_source, log)
        else:
            corpus = build_corpus(config.corpus, task_source)
            tokenizer = (load_pretrained_tokenizer(config.tokenizer, config.max_position_embeddings) if config.tokenizer
                         else train_tokenizer(corpus.documents, config.vocab_size,
                                              model_max_length=config.max_position_embeddings))
            blocks = pack_corpus(corpus, tokenizer, config.seq_len, config.seed)
            generator = torch.Generator().manual_seed(config.seed)
            order = torch.randperm(len(blocks), generator=generator)
            n_eval = int(len(blocks) * config.eval_fraction)
            eval_sets, train_blocks = {"all": blocks[order[:n_eval]]}, blocks[order[n_eval:]]
            corpus_stats = {**corpus.stats(), "tokens": blocks.numel(), "train_blocks": len(train_blocks),
                            "eval_blocks": n_eval}
        objective = prepare_objective(config.objective, tokenizer, config.seq_len)  # may add tokens: before the model
        log(f"corpus: {json.dumps(corpus_stats)}")

        model = build_model(config, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
        optimizer = make_optimizer(model, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))

        model.train()
        ckpt, resume, done_seconds, done_cpu = checkpoint_dir(out_dir), None, 0.0, 0.0
        if (ckpt / "state.json").is_file():  # also with --checkpoint-every 0 now: the saved steps are not lost
            resume = load_pretrain_checkpoint(ckpt, model, optimizer, scheduler, generator, config)
            done_seconds, done_cpu = resume["train_seconds"], resume["train_cpu_seconds"]
            log(f"resumed from {ckpt} at step {resume['step']}/{config.steps}")
        train_start, cpu_start = time.perf_counter(), time.process_time()

        def save(position: dict) -> None:
            save_pretrain_checkpoint(ckpt, model, optimizer, scheduler, generator, position, config,
                                     done_seconds + time.perf_counter() - train_start,
                                     done_cpu + time.process_time() - cpu_start)
            log(f"checkpoint at step {position['step']}: {ckpt}")

        losses, curve = train_steps(model, optimizer, scheduler, train_blocks, config, objective, generator, log,
                                    resume=resume, checkpoint_every=config.checkpoint_every, save_checkpoint=save)
        train_time = done_seconds + time.perf_counter() - train_start
        train_cpu = done_cpu + time.process_time() - cpu_start  # CPU seconds of this process: on a shared machine
        # the step cost without the wait for a core (one thread: about the wall time on an idle core)
        final = losses[-config.log_every:]
        eval_losses = {name: evaluate_loss(model, blocks, config) for name, blocks in eval_sets.items()}
        # with a mixture, the unweighted mean over domains, so mixtures are compared on the same held-out text
        eval_loss = None if None in eval_losses.values() else sum(eval_losses.values()) / len(eval_losses)
        info = {
            "config": dataclasses.asdict(config),
            "seed": config.seed,
            "steps": config.steps,
            "first_loss": round(losses[0], 4),
            "final_loss": round(sum(final) / len(final), 4),
            "eval_loss": None if eval_loss is None else round(eval_loss, 4),
            **({"eval_loss_per_domain": {k: None if v is None else round(v, 4) for k, v in eval_losses.items()}}
               if config.mixture else {}),  # None: the domain had no held-out block (eval_fraction 0, or too small)
            "n_params": n_params,
            "tokens_seen": config.steps * config.batch_size * config.seq_len,
            **({"resumed_from_step": resume["step"]} if resume else {}),
            "train_time_s": round(train_time, 1),
            "train_cpu_s": round(train_cpu, 1),
            "tokens_per_s": round(config.steps * config.batch_size * config.seq_len / train_time),
            "num_threads": torch.get_num_threads(),
            "corpus": corpus_stats,
            "loss_curve": curve,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": __import__("tokenizers").__version__},
        }

        def write(folder: Path) -> None:
            model.save_pretrained(folder, safe_serialization=True)
            save_tokenizer(tokenizer, folder)
            info["wall_time_s"] = round(time.perf_counter() - start, 1)
            (folder / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")

        saved = write_dir_atomically(Path(out_dir).resolve(), write)
        if ckpt.exists():
            shutil.rmtree(ckpt)
        log(f"saved to {saved}: final loss {info['final_loss']}, eval loss {info['eval_loss']}, "
            f"{info['wall_time_s']} s")
        return info
    finally:
        torch.set_num_threads(previous_threads)


def _add_dataclass_arguments(parser: CommandParser, cls: type, taken: set[str], prefix: str = "") -> None:
    """One ``--flag`` per scalar field of ``cls``, so new config fields reach the CLI without edits here (a field
    whose name an earlier class took gets ``prefix``; its errors ``cls.field`` name that flag)."""
    hints = get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if kind not in (int, float, str, bool):
            continue
        dest = f.name if f.name not in taken else prefix + f.name
        taken.add(dest)
        flag = "--" + dest.replace("_", "-")
        if dest != f.name:
            parser.field_flags[f"{cls.__name__}.{f.name}"] = flag
        default = getattr(defaults, f.name)
        text = str(f.metadata.get("help", ""))  # the field's own help (cli_options.field_help reads it too)
        # an empty default's meaning is in its help text; every other default is shown
        shown = text if "(default:" in text else f"{text} (default: {default})".strip()
        if kind is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=shown)
        elif f.name in ("objective", "norm"):  # validated by the config, which names near matches
            options = sorted(OBJECTIVES) if f.name == "objective" else list(NORMS)
            parser.add_argument(flag, dest=dest, default=default, help=f"{text}: one of {options} (default: {default})")
        else:
            parser.add_argument(flag, dest=dest, type=seed_arg if f.name == "seed" else kind, default=default,
                                help=shown)


def build_parser() -> CommandParser:
    parser = CommandParser(prog="lorakit pretrain-base", description="Pretrain the small base model lorakit bundles.")
    parser.add_argument("--out", type=Path, default=BASE_MODEL_DIR,
                        help=f"output folder, replaced atomically (default: the bundled {BASE_MODEL_DIR}; replacing a "
                             f"bundled base needs --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing non-empty --out folder (a bundled base folder of the installed "
                             "package too: rebuild it)")
    taken: set[str] = set()
    _add_dataclass_arguments(parser, PretrainConfig, taken)
    _add_dataclass_arguments(parser, CorpusConfig, taken, prefix="corpus_")
    return parser


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    values = vars(args)
    corpus_fields = {f.name for f in dataclasses.fields(CorpusConfig)}
    train_fields = {f.name for f in dataclasses.fields(PretrainConfig)} - {"corpus"}
    corpus = CorpusConfig(**{name: values[name if name not in train_fields else "corpus_" + name]
                             for name in corpus_fields})
    return PretrainConfig(corpus=corpus, **{name: values[name] for name in train_fields})


def _checkpoint_step(state: Path) -> int | None:
    """The step of the checkpoint whose ``state.json`` is ``state``; None when there is none (or it is unreadable)."""
    try:
        step = read_json(state).get("step")  # as _load_pretrain_checkpoint reads it
    except (LorakitError, OSError):  # missing, not JSON, not an object (read_json), unreadable
        return None
    return step if isinstance(step, int) else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (status := parser.file_in_the_way(args.out, "--out")) is not None:  # before the training, not at the save
        return status
    bundled = Path(BASE_MODEL_DIR).resolve().parent  # the package's assets folder: both bundled bases live there
    if not args.overwrite and Path(args.out).resolve().parent == bundled and Path(args.out).exists():
        return parser.fail(f"--out {args.out} is a base model bundled with lorakit (the default --out); pass "
                           f"--overwrite to rebuild it, or --out DIR for a new base")
    # the files this run reads: an --out holding one would be deleted with it (--out runs/regmix --overwrite with
    # --regmix-dir runs/regmix replaced the sweep's proxies, hours of training, with the new model)
    reads = [args.tokenizer or None, Path(args.regmix_dir) / "regmix.json" if args.regmix_dir else None]
    try:  # as every lorakit command's output: a non-empty --out is replaced (whole) only with --overwrite
        check_output_dir(args.out, "--out", overwrite=args.overwrite, reads=reads)
    except LorakitError as err:
        return parser.fail(err)
    try:
        config = config_from_args(args)
        config.check_steps()  # --checkpoint-every at or past --steps: refused before any data is built
        info = pretrain_base(config, args.out, log=lambda line: print(line, flush=True))
    except LorakitError as err:  # the flags, or found while preparing the data (a regmix.json, a checkpoint, ...)
        return parser.fail(err)
    except KeyboardInterrupt:  # Ctrl-C: what is kept and how to go on, not a traceback
        state = checkpoint_dir(args.out) / "state.json"
        step = _checkpoint_step(state)  # (an earlier run's too: it resumes with --checkpoint-every 0 as well)
        kept = (f"the checkpoint of step {step} in {state.parent} is kept: run the same command again to resume"
                if step is not None else "nothing was saved (--checkpoint-every N makes a run resumable)")
        print(f"\n{parser.prog}: interrupted; {kept}", file=sys.stderr)
        return 130
    print(json.dumps({k: info[k] for k in ("steps", "final_loss", "eval_loss", "n_params", "wall_time_s")}))
    return 0
