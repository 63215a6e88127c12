"""One client's round, without Flower: rebuild the model, apply what the server sent, train locally, return the update.

Local training is lorakit's training loop (AdamW, constant lr, ``local_steps`` steps, optimizer state fresh every
round, as FedIT/FLoRA clients do) or, with ``dp_noise_multiplier > 0``, DP-SGD through Opacus
(``opacus.PrivacyEngine``: Poisson sampling at rate ``batch_size / n``, per-example clipping to
``dp_max_grad_norm``, Gaussian noise ``σ · C``) on the same AdamW. Per-example losses are the mean over each
example's supervised tokens, averaged over the batch (Opacus' ``loss_reduction="mean"``).

Models are loaded once per process and deep-copied per round, so a client never carries state between rounds.
"""

from __future__ import annotations

import copy
import time
from functools import lru_cache
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checkpointing import replay_routing_in_checkpoints
from ..core.errors import ConfigError
from ..core.model import add_adapter, adapter_state
from ..core.registry import get_method
from ..data import (IGNORE_INDEX, CausalLMCollator, Example, TokenizedDataset, hold_out, load_examples,
                    looks_like_path, stable_seed)
from ..training.objectives import batch_routing
from .base import FederatedConfig, LoraStrategy, State, get_strategy, lora_factors, read_factors, scalings
from .partition import partition


@lru_cache(maxsize=2)
def _base(model: str | None):
    from ..hub import load_model_and_tokenizer

    return load_model_and_tokenizer(model)


def fresh_model(config: FederatedConfig) -> tuple[nn.Module, Any]:
    """A private copy of the base model (loaded once per process) and its tokenizer."""
    model, tokenizer = _base(config.model)
    return copy.deepcopy(model), tokenizer


def check_model(config: FederatedConfig) -> None:
    """Load the base model (cached: the server in this process reuses it) and attach the strategy's adapter to a
    copy, so a model that does not load or ``target_modules`` that match no module fail before Flower and Ray
    start, with lorakit's error (was: the ServerApp failed inside the simulation, which ended without a result).
    Each client's partition is checked by the adapter config (``AdapterConfig.check_examples``) the same way, and
    the server's evaluation examples are read (an empty ``eval_data`` file failed in the ServerApp, after Ray's
    start-up)."""
    strategy = get_strategy(config)
    model, tokenizer = fresh_model(config)
    attach(model, config, strategy, config.max_rank(), config.alpha_of(0), 0)
    lora_factors(model)  # every target a linear layer's LoRA
    for client, examples in enumerate(client_partitions(config, tokenizer)):
        check_client_examples(model, client, examples)
    if config.evaluate:
        eval_examples(config, tokenizer)


def adapter_seed(config: FederatedConfig, strategy: LoraStrategy, server_round: int, client: int) -> int:
    """FFA: one seed for every client and the server (A must be shared); FLoRA: a fresh draw per round and
    client; FedIT / LoRA-FAIR overwrite A and B with the server's, so the draw does not matter."""
    if strategy.method == "ffa_lora" or server_round == 0:
        return stable_seed("lorakit-federated-A", config.seed)
    return stable_seed("lorakit-federated-A", config.seed, server_round, client)


def attach(model: nn.Module, config: FederatedConfig, strategy: LoraStrategy, rank: int, alpha: float, seed: int) -> None:
    cls = get_method(strategy.method).config_cls
    torch.manual_seed(seed)
    add_adapter(model, cls(r=rank, lora_alpha=alpha, target_modules=config.target_modules))


def _holds_out(config: FederatedConfig) -> bool:
    """A ``data`` file without ``eval_data``: its last tenth is the server's evaluation set (a file has no splits)."""
    return config.evaluate and config.eval_data is None and looks_like_path(config.data)


def client_partitions(config: FederatedConfig, tokenizer: Any = None) -> list[list[Example]]:
    """Every client's training examples (``config.clients`` lists, client k's at index k)."""
    examples = load_examples(config.data, "train", n=config.examples_of("train_examples", config.data), seed=config.seed,
                             tokenizer=tokenizer)
    if _holds_out(config):
        examples = hold_out(examples)[0]
    return partition(examples, config.clients, config.partition, config.skew_alpha, config.seed)


def train_examples(config: FederatedConfig, client: int, tokenizer: Any = None) -> list[Example]:
    return client_partitions(config, tokenizer)[client]


def check_client_examples(model: nn.Module, client: int, examples: Sequence[Example]) -> None:
    """The adapter config's check of client ``client``'s training data (``AdapterConfig.check_examples``), before
    any training; ConfigError naming the client (the DP path trains without lorakit's loop, which checks too)."""
    try:
        adapter_state(model).configs["default"].check_examples(examples)
    except ConfigError as e:
        raise ConfigError(f"client {client}'s training data: {e.args[0] if e.args else e}", field=e.field) from None


def eval_examples(config: FederatedConfig, tokenizer: Any = None) -> list[Example]:
    if _holds_out(config):
        held = hold_out(load_examples(config.data, "train", n=config.train_examples, tokenizer=tokenizer))[1]
        return held[: config.eval_examples]
    spec = config.eval_data or config.data
    return load_examples(spec, "test", n=config.examples_of("eval_examples", spec), seed=config.seed, tokenizer=tokenizer)


def client_round(config: FederatedConfig, client: int, server_round: int, received: State,
                 a_checksum: float | None = None) -> tuple[State, dict[str, Any]]:
    """Run client ``client``'s local training for ``server_round``; returns (update tensors, metrics).

    Metrics: ``num-examples``, ``train-loss`` (mean over the local steps), ``rank``, ``scaling``, and with DP
    ``dp-steps`` and ``dp-sample-rate`` (the server composes them into ε). Raises ValueError when an FFA client's
    frozen A differs from the server's (checksum), which Flower reports to the server as a failed reply.
    """
    strategy = get_strategy(config)
    model, tokenizer = fresh_model(config)
    rank, alpha = config.rank_of(client), config.alpha_of(client)
    attach(model, config, strategy, rank, alpha, adapter_seed(config, strategy, server_round, client))
    if a_checksum is not None:
        from .ffa import a_checksum as checksum

        mine = checksum(read_factors(model, ("lora_A",)))
        if abs(mine - a_checksum) > 1e-6 * max(1.0, abs(a_checksum)):
            raise ValueError(f"client {client}: frozen A differs from the server's (checksum {mine} vs {a_checksum}); "
                             "FFA needs the same base model, targets, rank and seed everywhere")
    examples = train_examples(config, client, tokenizer)
    check_client_examples(model, client, examples)
    strategy.client_start(model, received)
    torch.manual_seed(stable_seed("lorakit-federated-train", config.seed, server_round, client))
    if config.dp_noise_multiplier > 0:
        losses, extra = dp_train(model, tokenizer, examples, config)
    else:
        losses, extra = plain_train(model, tokenizer, examples, config, server_round, client)
    if client in config.stragglers and config.straggler_delay_s > 0:
        time.sleep(config.straggler_delay_s)
    scaling = next(iter(scalings(model).values()))
    metrics = {"num-examples": len(examples), "train-loss": sum(losses) / max(len(losses), 1), "rank": rank,
               "scaling": scaling, **extra}
    return strategy.client_update(model), metrics


def plain_train(model: nn.Module, tokenizer: Any, examples: Sequence[Example], config: FederatedConfig,
                server_round: int, client: int) -> tuple[list[float], dict[str, Any]]:
    from ..training import TrainConfig, train

    train_config = TrainConfig(steps=config.local_steps, batch_size=min(config.batch_size, len(examples)),
                               lr=config.lr, lr_schedule="constant", max_length=config.max_length,
                               seed=stable_seed("lorakit-federated-data", config.seed, server_round, client),
                               device=config.device, log_every=config.local_steps)
    result = train(model, tokenizer, examples, train_config, progress=False)
    return result.losses, {}


def _per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token cross-entropy over each example's supervised tokens."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t+1
    token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B, T-1)
    count = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
    return token.sum(1) / count


def dp_train(model: nn.Module, tokenizer: Any, examples: Sequence[Example],
             config: FederatedConfig) -> tuple[list[float], dict[str, Any]]:
    """DP-SGD (Opacus) for ``local_steps`` Poisson-sampled batches; returns losses and the accounting inputs."""
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    device = torch.device(config.device)
    model.to(device)
    dataset = TokenizedDataset(examples, tokenizer, max_length=config.max_length)
    loader = DataLoader(dataset, batch_size=min(config.batch_size, len(dataset)),
                        collate_fn=CausalLMCollator.from_tokenizer(tokenizer))
    model.train()
    replay_routing_in_checkpoints(model)  # a checkpointed block's recompute in backward sees the batch's routing
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    with warnings.catch_warnings():  # Opacus warns that its RNG is not cryptographically secure (experiments)
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        private, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                         noise_multiplier=config.dp_noise_multiplier,
                                                         max_grad_norm=config.dp_max_grad_norm, poisson_sampling=True)
    losses, iterations = [], 0
    with warnings.catch_warnings():  # base inputs need no grad: torch notes Opacus' backward hooks see outputs only
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        while iterations < config.local_steps:
            for batch in loader:
                iterations += 1
                # An empty Poisson batch skips its step but is still counted: accounting for a release that did not
                # happen only overstates ε.
                if isinstance(batch, dict) and batch["input_ids"].shape[0] > 0:
                    batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
                    with batch_routing(batch):  # the training loop's routing: token mask, supervised tokens
                        logits = private(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss = _per_example_loss(logits, batch["labels"]).mean()
                    loss.backward()
                    losses.append(float(loss.detach()))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if iterations >= config.local_steps:
                    break
    private._close()  # remove Opacus hooks; the adapter weights stay in ``model``
    model.eval()
    return losses, {"dp-steps": iterations, "dp-sample-rate": 1.0 / len(loader)}


def dp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε of the RDP accountant (Mironov 2017; Opacus ``RDPAccountant``) for ``[(σ, q, steps), ...]`` at ``delta``."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))
