"""Non-IID splits of training examples over clients: ``iid``, by ``task``, or by Dirichlet ``skew``.

- ``iid``: a seeded shuffle dealt round-robin.
- ``task``: tasks are dealt to clients round-robin (client k gets tasks k, k+K, …); when there are more clients
  than tasks, the clients sharing a task split its examples evenly. The extreme feature/label shift of FLoRA's
  and LoRA-FAIR's "by domain" splits.
- ``skew``: for every task, its examples are split over the clients in proportions drawn from Dirichlet(α)
  (Hsu, Qi, Brown 2019, "Measuring the effects of non-identical data distribution", arXiv:1909.06335); small
  α is very skewed, large α near iid. Every client gets at least one example.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

import numpy as np

from ..core.errors import ConfigError
from ..data import Example, stable_seed


def partition(examples: Sequence[Example], clients: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0) -> list[list[Example]]:
    """``clients`` lists of examples (deterministic in ``seed``). Raises ConfigError when a client would be empty."""
    if len(examples) < clients:
        raise ConfigError(f"{len(examples)} training examples cannot be split over {clients} clients; "
                          "give more examples or fewer clients")
    rng = random.Random(stable_seed("lorakit-federated-split", scheme, seed))
    by_task: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_task[ex.task or ""].append(ex)
    tasks = sorted(by_task)
    parts: list[list[Example]] = [[] for _ in range(clients)]
    if scheme == "iid":
        shuffled = list(examples)
        rng.shuffle(shuffled)
        for i, ex in enumerate(shuffled):
            parts[i % clients].append(ex)
    elif scheme == "task":
        owners: dict[str, list[int]] = defaultdict(list)
        for k in range(max(clients, len(tasks))):
            owners[tasks[k % len(tasks)]].append(k % clients)
        for task, ks in owners.items():
            ks = sorted(set(ks))
            for i, ex in enumerate(by_task[task]):
                parts[ks[i % len(ks)]].append(ex)
            if len(by_task[task]) < len(ks):  # was: an empty client, failing in every round (batch size 0)
                raise ConfigError(f"partition 'task': task {task!r} has {len(by_task[task])} training example(s) for "
                                  f"the {len(ks)} clients {ks} that share it (each needs at least one); give more "
                                  "examples of it, fewer clients, or partition 'iid' / 'skew'")
    elif scheme == "skew":
        draw = np.random.default_rng(stable_seed("lorakit-federated-dirichlet", seed))
        for task in tasks:
            items = by_task[task]
            share = draw.dirichlet([float(alpha)] * clients)
            cuts = np.round(np.cumsum(share) * len(items)).astype(int).tolist()
            start = 0
            for k, end in enumerate(cuts):
                parts[k].extend(items[start:end])
                start = end
        for k in range(clients):  # nobody left empty: take one example from the largest client
            if not parts[k]:
                donor = max(range(clients), key=lambda j: len(parts[j]))
                parts[k].append(parts[donor].pop())
    else:
        raise ConfigError(f"unknown partition scheme {scheme!r}; use iid, task or skew")
    return parts
