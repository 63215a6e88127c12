"""The server's side of a run, without Flower: global state, update checks, aggregation, evaluation, history.

``ServerCore.receive`` takes the round's replies as ``(client id, update bytes, metrics)``; an update that does
not decode as safetensors, names other tensors, has another shape than the client's rank implies, or holds
NaN/inf is rejected, logged (logger ``lorakit.federated``) and recorded in the round's history, and the round
goes on with the others (weights renormalised over the accepted ones). With none accepted the state stays.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data import IGNORE_INDEX, CausalLMCollator, TokenizedDataset, evaluate_examples
from ..core.delta import describe_layer, oriented_weight
from ..core.model import add_adapter, adapter_layers, delete_adapter
from ..training.objectives import batch_routing
from .base import (FederatedConfig, State, check_update, get_strategy, normalized, pack, read_factors, scalings, unpack,
                   write_factors)
from .client import adapter_seed, attach, dp_epsilon, eval_examples, fresh_model

log = logging.getLogger("lorakit.federated")


class ServerCore:
    """Holds the global state of ``config.strategy`` and the history of the rounds (``history``: one dict per round)."""

    def __init__(self, config: FederatedConfig):
        self.config = config
        self.strategy = get_strategy(config)
        model, self.tokenizer = fresh_model(config)
        self.base = copy.deepcopy(model)  # untouched, for evaluating the global model
        rank = config.max_rank()
        alpha = config.lora_alpha if config.lora_alpha is not None else 2.0 * rank
        attach(model, config, self.strategy, rank, alpha, adapter_seed(config, self.strategy, 0, 0))
        factors = read_factors(model)
        self.shapes = {path: (layer.info.out_features, layer.info.in_features) for path, layer in adapter_layers(model)}
        self.scaling = next(iter(scalings(model).values()))
        self.state: State = self.strategy.initial_state(factors, scalings(model))
        self.a_checksum = None
        if self.strategy.method == "ffa_lora":
            from .ffa import a_checksum

            self.a_checksum = a_checksum(factors)
        delete_adapter(model, "default")
        self.history: list[dict[str, Any]] = []
        self.dp_history: dict[int, list[tuple[float, float, int]]] = {}
        self._eval = eval_examples(config, self.tokenizer) if config.evaluate else []

    def downlink_bytes(self) -> bytes:
        return pack(self.strategy.downlink(self.state))

    def receive(self, server_round: int, replies: Sequence[tuple[int, bytes, dict[str, Any]]],
                failures: Sequence[str] = (), sent: int = 0) -> dict[str, Any]:
        """Check, aggregate and record one round; returns the round's record."""
        accepted, rejected, weights, scales, losses, up, clients = [], [], [], [], [], [], []
        # in client order, not arrival order: the float sums (and FLoRA's stacks) then do not depend on which client
        # replied first, so a rerun or a resumed run aggregates bit for bit alike (stable: a duplicate's first stays)
        for client, blob, metrics in sorted(replies, key=lambda reply: reply[0]):
            reason = None
            try:
                update = unpack(blob)
            except Exception as error:  # noqa: BLE001 - any decoding failure is a rejected update
                update, reason = {}, f"not safetensors bytes ({type(error).__name__}: {error})"
            if reason is None and not 0 <= client < self.config.clients:
                reason = f"unknown client id {client}"
            if 0 <= client < self.config.clients and "dp-steps" in metrics:
                # the client released its noised update whatever the server does with it: a rejected update (NaN,
                # a duplicate, ...) spends privacy too (was: only accepted ones were composed, understating ε)
                try:
                    spent = (self.config.dp_noise_multiplier, float(metrics["dp-sample-rate"]),
                             int(metrics["dp-steps"]))
                except (KeyError, TypeError, ValueError):
                    reason = reason or (f"DP metrics dp-sample-rate {metrics.get('dp-sample-rate')!r}, dp-steps "
                                        f"{metrics.get('dp-steps')!r} are not numbers")
                else:
                    self.dp_history.setdefault(client, []).append(spent)
            if reason is None and client in clients:  # it would count twice in the average (and in DP accounting)
                reason = (f"a second reply from client {client} this round (two SuperNodes with the same "
                          f"partition-id?); the first one is kept")
            if reason is None:
                rank = self.config.rank_of(client)
                reason = check_update(update, self.strategy.expected_update(self.state, rank, self.shapes))
            if reason is None and not (math.isfinite(metrics.get("num-examples", float("nan")))
                                       and metrics["num-examples"] > 0):
                reason = f"num-examples {metrics.get('num-examples')!r} is not a positive count"
            if reason is not None:
                log.warning("round %d: rejected the update of client %s: %s", server_round, client, reason)
                rejected.append({"client": client, "reason": reason})
                continue
            accepted.append(update)
            clients.append(client)
            weights.append(float(metrics["num-examples"]))
            scales.append(self.config.alpha_of(client) / self.config.rank_of(client))
            losses.append(float(metrics.get("train-loss", float("nan"))))
            up.append(len(blob))
        for failure in failures:
            log.warning("round %d: a client failed: %s", server_round, failure)
        if sent > len(replies) + len(failures):
            log.warning("round %d: %d sampled client(s) did not reply within the round timeout (stragglers); "
                        "aggregating the %d replies that came", server_round, sent - len(replies) - len(failures),
                        len(replies))
        down = len(self.downlink_bytes())
        if accepted:
            self.state = self.strategy.aggregate(self.state, accepted, normalized(weights), scales)
        record = {"round": server_round, "sampled": sent, "accepted": len(accepted), "clients": clients, "rejected": rejected,
                  "failures": list(failures), "no_reply": max(sent - len(replies) - len(failures), 0), "train_loss": sum(losses) / len(losses) if losses else None,
                  "uplink_bytes_per_client": sum(up) / len(up) if up else 0, "downlink_bytes_per_client": down}
        if self.dp_history:
            record["epsilon"] = max(dp_epsilon(h, self.config.dp_delta) for h in self.dp_history.values())
        self.history.append(record)
        return record

    @torch.no_grad()
    def global_model(self):
        """The base model with the global ΔW added to its adapted weights (a copy)."""
        model = copy.deepcopy(self.base)
        delta = self.strategy.global_delta(self.state, self.scaling)
        modules = dict(model.named_modules())
        for path, d in delta.items():
            layer = modules[path]
            w = oriented_weight(layer, describe_layer(layer))
            w.add_(d.to(w.dtype))
        return model.eval()

    def save_adapter(self, directory) -> Path | None:
        """Write the global model as a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``,
        atomically; ``lorakit eval --adapter`` and ``peft.PeftModel.from_pretrained`` load it on the base): the
        strategy's ``global_lora`` factors, rank R and ``lora_alpha = scaling · R`` (FedIT / LoRA-FAIR: the global
        factors at the largest client rank; FFA: B̄ with the shared frozen A; FLoRA: every round's stacks, R = Σ r_k
        over the rounds, scaling 1). Returns the folder, or None while the global model is the base (FLoRA before an
        accepted round): then an older ``directory`` (a previous run's, under ``--overwrite``) is removed, atomically,
        so that no adapter of another run passes for this one's."""
        from ..io.files import remove_dir_atomically
        from ..io.peft_format import save_adapter
        from ..methods.lora import LoraConfig
        from .fedit import state_rank

        factors, scaling = self.strategy.global_lora(self.state, self.scaling)
        rank = state_rank(factors)
        if rank == 0:
            remove_dir_atomically(directory)
            return None
        model = copy.deepcopy(self.base)
        add_adapter(model, LoraConfig(r=rank, lora_alpha=scaling * rank, target_modules=self.config.target_modules))
        write_factors(model, factors)
        return save_adapter(model, directory)

    def run_result(self, evaluation: list, adapter_dir=None) -> dict:
        """A finished run's result (``config``, ``rounds``, ``evaluation``), as the simulation and the ServerApp
        return it; with ``adapter_dir`` the global adapter is written there (:meth:`save_adapter`) and
        ``result["adapter"]`` is its folder, or None when there is no global adapter (an older one is removed)."""
        result = {"config": self.config.to_dict(), "rounds": self.history, "evaluation": evaluation}
        if adapter_dir is not None:
            saved = self.save_adapter(adapter_dir)
            result["adapter"] = str(saved) if saved is not None else None
        return result

    def evaluate(self) -> dict[str, float]:
        """Exact match and mean token loss of the global model on the held-out examples."""
        if not self._eval:
            return {}
        model = self.global_model()
        metrics = evaluate_examples(model, self.tokenizer, self._eval, batch_size=64)
        return {"exact_match": float(metrics["exact_match"]), "eval_loss": eval_loss(model, self.tokenizer, self._eval,
                                                                                     self.config.max_length)}


@torch.no_grad()
def eval_loss(model, tokenizer, examples, max_length: int) -> float:
    """Mean next-token cross-entropy over the completions' tokens (nats per token)."""
    dataset = TokenizedDataset(examples, tokenizer, max_length=max_length)
    collate = CausalLMCollator.from_tokenizer(tokenizer)
    total, count = 0.0, 0
    for start in range(0, len(dataset), 64):
        batch = collate([dataset[i] for i in range(start, min(start + 64, len(dataset)))])
        with batch_routing(batch):  # as the clients' training forward (a method routes eval forwards its own way)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                                          reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)
