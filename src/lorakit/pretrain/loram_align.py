"""LoRAM's alignment — "Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language Models", Zhang
et al., ICLR 2025, arXiv:2502.13533, pipeline step 1 (the rest is ``lorakit.prune.loram``).

Before any LoRA training the publisher continues pre-training the pruned model once on general text, to close the
knowledge gap between pruned and original model; the adapter is then trained on the *aligned* pruned model and still recovered into and merged with the *original* weights. As in
the official ``loram/1_pruned_full_rank_weight_alignment.py``: every parameter of the pruned model is trained
except ``lm_head`` (lines 69–73; with the bundled model's tied embeddings that freezes the shared embedding too),
causal LM loss on general text (lines 82–94: FineWeb 0.5 + OpenWebMath 0.25 + 0.25 interleaved), AdamW with a
100-step linear warmup and a cosine decay to zero (lines 104–108), no weight decay (Trainer default), gradient
clipping at 1.0 (Trainer default), bf16, one pass (lines 139–142: batch 128, lr 5e-5 for the 70B model). Here the
general text is lorakit's offline pretraining corpus (``pretrain/corpus.py``: Python stdlib source + the tasks'
pretraining split, the bundled base's own pretraining mixture) and the loop is ``pretrain.train.train_steps``
(AdamW betas 0.9/0.95 as lorakit's pretraining, where the Trainer uses 0.9/0.999). ``AlignConfig.lr`` defaults to
1e-3, a third of the bundled base's peak pretraining lr (3e-3), the official 5e-5 : LLaMA-2-70B's 1.5e-4.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import check_non_negative, check_positive, field_error
from ..core.errors import ConfigError, LorakitError
from ..core.layer import AdapterLayer
from .corpus import CorpusConfig, build_corpus
from .train import PretrainConfig, causal_objective, evaluate_loss, lr_lambda, make_optimizer, pack_corpus, train_steps


@dataclass(frozen=True)
class AlignConfig:
    """LoRAM's alignment of the pruned model: ``steps`` AdamW steps of ``batch_size`` × ``seq_len`` tokens at peak
    ``lr`` (``warmup_steps`` linear warmup, cosine to 0) on ``corpus_chars`` characters of lorakit's pretraining
    corpus (half stdlib source, half task pretraining text), of which ``eval_blocks`` blocks are held out for the
    before/after loss; ``freeze_lm_head`` as the official script; ``bf16``: CPU autocast for the matmuls (off on
    CUDA); ``seed`` of the corpus order, the held-out split and the batch order.
    ConfigError on bad values."""

    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16
    seq_len: int = 128
    warmup_steps: int = 20
    corpus_chars: int = 1_000_000
    eval_blocks: int = 32
    freeze_lm_head: bool = True
    bf16: bool = False  # the official script trains in bf16 on GPUs; CPU autocast to bf16 is 7-13x slower here
                        # (benchmarks/pretrain_bf16), as for pretrain-base, whose default is fp32 too
    seed: int = 0

    def __post_init__(self) -> None:
        check_non_negative(self, "seed")  # numpy's and Python's seeding refuse a negative seed
        check_positive(self, "steps", "batch_size", "seq_len", "corpus_chars", "eval_blocks")
        check_positive(self, "lr", finite=True)  # AdamW takes inf and trains the base to NaN
        if not 0 <= self.warmup_steps <= self.steps:
            raise field_error(self, "warmup_steps", f" must be in 0..steps ({self.steps}), got {self.warmup_steps}.")


def alignment_blocks(tokenizer, config: AlignConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train blocks (N, seq_len), held-out blocks (eval_blocks, seq_len)) of token ids from lorakit's offline
    pretraining corpus; LorakitError when the corpus is too small for the held-out part plus one batch."""
    corpus = build_corpus(CorpusConfig(stdlib_chars=config.corpus_chars // 2, seed=config.seed))
    blocks = pack_corpus(corpus, tokenizer, config.seq_len, config.seed)  # (N, T)
    if len(blocks) < config.eval_blocks + config.batch_size:
        raise LorakitError(f"AlignConfig.corpus_chars={config.corpus_chars} gives {len(blocks)} blocks of "
                           f"{config.seq_len} tokens, fewer than eval_blocks + batch_size; raise corpus_chars")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(config.seed))
    return blocks[order[config.eval_blocks:]], blocks[order[:config.eval_blocks]]


def align_pruned(model: nn.Module, tokenizer, config: AlignConfig = AlignConfig(), *, log=print,
                 blocks: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """LoRAM step 1: continue pre-training the pruned ``model`` in place (all weights but ``lm_head``) on general
    text; call it between ``loram_prune`` and adding the adapter. ``blocks`` = (train, held-out) token blocks, by
    default ``alignment_blocks(tokenizer, config)``. Returns {"eval_loss_before", "eval_loss_after"} (mean
    next-token cross-entropy in nats on the held-out blocks), "train_loss_curve", "tokens", "seconds".
    Raises LorakitError for a model with adapters attached (align the bare pruned model)."""

    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise LorakitError("align_pruned trains the pruned base itself: align before add_adapter")
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and config.seq_len > limit:
        raise ConfigError(f"AlignConfig.seq_len={config.seq_len} exceeds the model's max_position_embeddings ({limit})")
    train_blocks, held_out = blocks if blocks is not None else alignment_blocks(tokenizer, config)
    device = next(model.parameters()).device
    train_blocks, held_out = train_blocks.to(device), held_out.to(device)
    loop = PretrainConfig(steps=config.steps, lr=config.lr, batch_size=config.batch_size, seq_len=config.seq_len,
                          max_position_embeddings=max(config.seq_len, 1), warmup_steps=config.warmup_steps,
                          min_lr_ratio=0.0, weight_decay=0.0, grad_clip=1.0, bf16=config.bf16 and device.type == "cpu",
                          seed=config.seed, log_every=max(1, config.steps // 10))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    head = model.get_output_embeddings() if config.freeze_lm_head else None
    for p in model.parameters():
        p.requires_grad_(True)
    if head is not None:
        head.weight.requires_grad_(False)  # tied embeddings share this tensor and stay frozen with it
    was_training = model.training
    before = evaluate_loss(model, held_out, loop)
    optimizer = make_optimizer(model, loop)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(loop))
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    model.train()
    try:
        _, curve = train_steps(model, optimizer, scheduler, train_blocks, loop, causal_objective, generator, log)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    after = evaluate_loss(model, held_out, loop)
    model.train(was_training)
    return {"eval_loss_before": before, "eval_loss_after": after, "train_loss_curve": curve,
            "tokens": config.steps * config.batch_size * config.seq_len, "seconds": seconds}
