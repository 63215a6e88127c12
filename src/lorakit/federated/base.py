"""What every federated LoRA strategy shares: the run config, the wire format, update checks, the registry.

A strategy is split the way the protocol is: a server half (``initial_state``, ``downlink``, ``expected_update``,
``aggregate``, ``global_lora`` — the global model as one LoRA, which evaluation and the saved adapter use) and a client half (``client_start``, ``client_update``), all plain torch on
``{name: tensor}`` dicts keyed ``"<module path>.<tensor>"`` — no Flower types here, so the maths is testable in
isolation and the same objects run under Flower's simulation and deployment engines (``apps.py``).

Weights: client k's update is weighted ``p_k = n_k / Σ n_j`` by its number of training examples, as FLoRA's
official aggregation (``fed_utils/model_aggregation.py``: ``normalize(local_dataset_len, p=1)``) and FedIT do.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..core.config import check_max_length, check_non_negative, check_positive, check_range, field_error
from ..core.errors import FIELD, ConfigError, comma_items, did_you_mean
from ..core.model import adapter_layers
from ..data import looks_like_path, stable_seed

State = dict[str, torch.Tensor]

PARTITIONS = ("iid", "task", "skew")
TASK_EXAMPLES = {"train_examples": 64, "eval_examples": 32}  # per built-in task, when not set


@dataclass
class FederatedConfig:
    """One federated run. Units: steps are optimizer steps per client per round; seconds for timeouts.

    - ``strategy``: ``fedit`` | ``ffa`` | ``flora`` | ``lora_fair`` (``lorakit.federated.list_strategies()``).
    - ``clients``: number of clients (Flower SuperNodes); ``fraction``: share sampled per round (at least
      ``min_clients``); ``rounds``: server rounds.
    - ``r``: client rank; ``client_ranks``: per-client ranks, cycled over clients (heterogeneous: FLoRA stacks, FedIT
      zero-pads; the server's global adapter has the largest rank).
      ``lora_alpha``: None means ``2·r`` per client (scaling 2, as FLoRA's official ``main.py``).
    - ``data``: built-in task(s), comma-separated, or a JSONL file; ``train_examples``: per task (default 64), or a
      file's first lines (default: all of it; ``eval_examples`` likewise, default 32 per task);
      ``partition``: ``iid``, ``task`` (each client gets whole tasks) or ``skew`` (Dirichlet(``skew_alpha``) task
      proportions per client, Hsu et al. 2019).
    - ``eval_data``: the server's held-out examples (task(s) or a JSONL file; ``eval_examples`` per task / first
      lines). None: the tasks' test split, or for a ``data`` file its last 1/10 (``lorakit.data.hold_out``),
      which then no client trains on, as ``lorakit train`` does.
    - ``dp_noise_multiplier`` > 0 turns on DP-SGD (Opacus) on clients with per-example clipping to
      ``dp_max_grad_norm``; ε is reported at ``dp_delta``.
    - ``stragglers``: client ids that sleep ``straggler_delay_s`` before replying; the server waits at most
      ``round_timeout_s`` per round and aggregates the replies that came.
    - ``fair_lambda``, ``fair_lr``, ``fair_steps``: LoRA-FAIR's regularisation weight λ (paper: 0.01) and the
      server's SGD learning rate and step cap for ΔB (official server code: 0.01, 1000).
    - ``evaluate``: score the global model on the held-out examples after every round (exact match, token loss).
    - ``max_length``: tokens per training example; ``seed``: data, splits, sampling and adapter inits.
    - ``device``: where clients train (``cpu`` or ``cuda``; the simulation then gives each client a GPU share).
    """

    strategy: str = "fedit"
    clients: int = 4
    rounds: int = 3
    fraction: float = 1.0
    min_clients: int = 1
    model: str | None = None
    data: str = "reverse,sort,upper,add"
    eval_data: str | None = None
    train_examples: int | None = None
    eval_examples: int | None = None
    partition: str = "task"
    skew_alpha: float = 0.5
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    r: int = 4
    client_ranks: list[int] | None = None
    lora_alpha: float | None = None
    local_steps: int = 10
    batch_size: int = 8
    lr: float = 3e-3
    max_length: int = 64
    seed: int = 0
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    stragglers: list[int] = field(default_factory=list)
    straggler_delay_s: float = 0.0
    round_timeout_s: float = 600.0
    fair_lambda: float = 0.01
    fair_lr: float = 0.01
    fair_steps: int = 1000
    evaluate: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_non_negative(self, "seed")  # numpy's and Python's seeding refuse a negative seed
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown federated strategy {self.strategy!r}.{did_you_mean(self.strategy, STRATEGIES)} "
                              f"Choose one of {sorted(STRATEGIES)}", field="FederatedConfig.strategy")
        counts = ("clients", "rounds", "r", "local_steps", "batch_size", "train_examples", "min_clients")
        for name in (*counts, "eval_examples", "seed", "fair_steps", "max_length", "client_ranks", "stragglers"):
            value = getattr(self, name)  # a JSON / run-config 8.5 would be cut to 8 (or fail deep inside a round)
            items = value if isinstance(value, list) else [value]
            if any(v is not None and (isinstance(v, bool) or not isinstance(v, int)) for v in items):
                raise field_error(self, name, f" takes whole numbers, got {value!r}")
        # eval_examples: the server scores them after every round (evaluate=False: none)
        for name in (*counts, "eval_examples") if self.evaluate else counts:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise field_error(self, name, f" must be >= 1, got {getattr(self, name)}")
        check_range(self, "fraction", 0, 1, low_open=True)
        for name in ("data", "eval_data"):  # a typo or a missing file fails here, not in the server and every client
            check_data_spec(self, name)
        if not looks_like_path(self.data):
            tasks = comma_items(self.data, "", "task names (see `lorakit tasks`)", field="FederatedConfig.data",
                                required=True)
            per_task = self.examples_of("train_examples", self.data)
            if per_task * len(tasks) < self.clients:  # partition() would refuse it in every client
                raise field_error(self, "train_examples", f"={per_task} per task × {len(tasks)} task(s) "
                                  f"cannot be split over {self.clients} clients (each needs at least one example); "
                                  "give more examples or fewer clients")
        if self.partition not in PARTITIONS:
            raise field_error(self, "partition", f" {self.partition!r} is not one of {PARTITIONS}"
                                                 f"{did_you_mean(self.partition, PARTITIONS)}")
        if self.client_ranks is not None:
            if not self.client_ranks or min(self.client_ranks) < 1:
                raise field_error(self, "client_ranks", f" must be positive ranks, got {self.client_ranks}")
            if len(self.client_ranks) > self.clients:
                raise field_error(self, "client_ranks", f" has {len(self.client_ranks)} ranks for {self.clients} "
                                  f"clients (client k gets rank client_ranks[k mod len]); give at most one per client")
            if len(set(self.client_ranks)) > 1 and not STRATEGIES[self.strategy].heterogeneous_ranks:
                able = sorted(n for n, c in STRATEGIES.items() if c.heterogeneous_ranks)
                raise ConfigError(f"strategy {self.strategy!r} needs one rank for all clients; {FIELD}="
                                  f"{self.client_ranks} differ. Use {' or '.join(repr(n) for n in able)} for "
                                  "heterogeneous ranks, or give one rank.", field="FederatedConfig.client_ranks")
        if self.min_clients > self.clients:  # Flower would wait for nodes that never come
            raise field_error(self, "min_clients", f"={self.min_clients} is more than FederatedConfig.clients="
                                                   f"{self.clients}; sample at most every client")
        # inf: lr and lora_alpha failed in every client, fair_lr / fair_lambda made the global adapter NaN
        check_positive(self, "lr", "skew_alpha", "fair_lr", "lora_alpha", finite=True)  # (lora_alpha None: 2·r)
        check_non_negative(self, "fair_lambda", note=" (LoRA-FAIR's penalty weight)", finite=True)
        if self.fair_steps < 1:
            raise field_error(self, "fair_steps", f" must be >= 1, got {self.fair_steps}")
        check_max_length(self)  # (was >= 1: max_length=1 trained every client on nothing, silently)
        # (ε, δ)-DP: δ is a probability of failure; 1 or more makes ε meaningless
        check_range(self, "dp_delta", 0, 1, low_open=True, high_open=True)
        # infinite noise (σ, or σ·C with C = inf) made every DP update NaN: all rejected, every round
        check_non_negative(self, "dp_noise_multiplier", finite=True)
        check_positive(self, "dp_max_grad_norm", finite=True)
        check_positive(self, "round_timeout_s", note=" (the seconds the server waits for a round's replies)")
        check_non_negative(self, "straggler_delay_s", finite=True)  # time.sleep(inf) is an OverflowError
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise field_error(self, "device", f" must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        bad = [c for c in self.stragglers if not 0 <= c < self.clients]
        if bad:
            raise field_error(self, "stragglers", f" {bad} are not client ids 0..{self.clients - 1}")
        STRATEGIES[self.strategy].check_config(self)

    def examples_of(self, name: str, spec: str) -> int | None:
        """How many examples ``name`` (``train_examples`` / ``eval_examples``) reads from ``spec``: the value set,
        else per built-in task 64 (train) / 32 (eval), and a whole file (None)."""
        value = getattr(self, name)
        if value is not None or looks_like_path(spec):
            return value
        return TASK_EXAMPLES[name]

    def rank_of(self, client: int) -> int:
        return self.client_ranks[client % len(self.client_ranks)] if self.client_ranks else self.r

    def max_rank(self) -> int:
        """The largest client rank: the rank of the server's global adapter."""
        return max(self.rank_of(c) for c in range(self.clients))

    def alpha_of(self, client: int) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.rank_of(client)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FederatedConfig":
        """From a plain dict (a Flower run config, a JSON file); unknown keys are an error with near matches."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ConfigError(f"unknown federated setting(s) {unknown}.{did_you_mean(unknown[0], known)}")
        return cls(**values)


def check_data_spec(config: FederatedConfig, name: str) -> None:
    """ConfigError naming ``FederatedConfig.<name>`` for a JSONL path that is no file or an unknown built-in task
    (with near matches); None (``eval_data`` unset) passes. Clients check their own copy, on their own machine."""
    import os

    from ..data import find_task, get_task

    spec = getattr(config, name)
    if spec is None:
        return
    if looks_like_path(spec):
        if not os.path.isfile(spec):
            raise field_error(config, name, f" {spec!r} is not a file (a JSONL path, or built-in task names)")
        return
    for task in comma_items(spec, "", "task names (see `lorakit tasks`)", field=f"FederatedConfig.{name}",
                            required=True):
        if find_task(task) is None:
            try:
                get_task(task)  # its error names the closest tasks
            except ValueError as error:
                raise field_error(config, name, f": {error}") from None


# -- wire format: safetensors bytes only ---------------------------------------------------------------------
def sample_clients(config: FederatedConfig, server_round: int) -> list[int]:
    """The clients (partition ids 0..N-1) round ``server_round`` trains, ascending: ``max(min_clients, ⌊fraction·N⌋)``
    of them (at most N), drawn by a ``random.Random`` seeded with ``stable_seed("lorakit-federated-sample", seed,
    round)``. One draw for every runner (Flower's simulation and deployment: ``apps.FlowerLoraStrategy`` sends to the
    nodes holding them; ``simulate.federate_in_process``), so a rerun or a resumed run trains the same clients."""
    size = min(config.clients, max(config.min_clients, int(config.clients * config.fraction)))
    rng = random.Random(stable_seed("lorakit-federated-sample", config.seed, server_round))
    return sorted(rng.sample(range(config.clients), size))


def pack(tensors: State) -> bytes:
    """``{name: tensor}`` as safetensors bytes (contiguous CPU copies; empty dict allowed)."""
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def unpack(blob: bytes) -> State:
    """Inverse of :func:`pack`. Raises ``ValueError`` (via safetensors) for bytes that are not safetensors."""
    return st_load(bytes(blob))


def check_update(update: State, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why ``update`` must be rejected (missing/extra tensors, wrong shape, non-float, NaN/inf), or None."""
    missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
    if missing or extra:
        return f"tensor names differ from the expected ones (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, shape in expected.items():
        t = update[name]
        if tuple(t.shape) != tuple(shape):
            return f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}"
        if not t.is_floating_point():
            return f"{name} has dtype {t.dtype}, expected a floating-point tensor"
        if not bool(torch.isfinite(t).all()):
            return f"{name} contains NaN or inf"
    return None


# -- helpers on a model with a lorakit LoRA named "default" ------------------------------------------------
def lora_factors(model: nn.Module, name: str = "default") -> dict[str, nn.Module]:
    """``{module path: LoraLinear delta}`` of adapter ``name``. Raises ConfigError (field ``target_modules``) for a
    targeted layer whose delta has no linear ``lora_A`` / ``lora_B`` (an embedding's LoRA, a convolution's): the
    strategies exchange and average (r, in) / (out, r) matrices."""
    out = {}
    for path, layer in adapter_layers(model):
        if name not in layer.adapters:
            continue
        delta = layer.adapters[name]
        if not all(isinstance(getattr(delta, w, None), nn.Linear) for w in ("lora_A", "lora_B")):
            raise ConfigError(f"federated LoRA exchanges the lora_A / lora_B matrices of linear layers; {path!r} "
                              f"({type(getattr(layer, 'base_layer', layer)).__name__}) gets a {type(delta).__name__}. "
                              f"Leave it out of {FIELD}.", field="FederatedConfig.target_modules")
        out[path] = delta
    return out


def read_factors(model: nn.Module, which: tuple[str, ...] = ("lora_A", "lora_B"), name: str = "default") -> State:
    """``{"<path>.lora_A": (r, in), "<path>.lora_B": (out, r)}`` (float32 copies)."""
    return {f"{path}.{w}": getattr(delta, w).weight.detach().float().clone()
            for path, delta in lora_factors(model, name).items() for w in which}


@torch.no_grad()
def write_factors(model: nn.Module, tensors: State, name: str = "default") -> None:
    """Copy ``"<path>.lora_A|lora_B"`` tensors into adapter ``name`` (shapes must match)."""
    for path, delta in lora_factors(model, name).items():
        for w in ("lora_A", "lora_B"):
            key = f"{path}.{w}"
            if key in tensors:
                getattr(delta, w).weight.copy_(tensors[key])


def scalings(model: nn.Module, name: str = "default") -> dict[str, float]:
    return {path: float(delta.scaling) for path, delta in lora_factors(model, name).items()}


def normalized(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    return [w / total for w in weights]


# -- the strategy protocol and registry ---------------------------------------------------------------------
class LoraStrategy:
    """Server and client halves of one federated LoRA algorithm (see the module docstring).

    ``method`` is the lorakit method clients train (``lora`` or ``ffa_lora``); ``heterogeneous_ranks`` says
    whether clients may use different ranks. Subclasses document their paper and equation.
    """

    name = ""
    method = "lora"
    heterogeneous_ranks = False

    def __init__(self, config: FederatedConfig):
        self.config = config

    @classmethod
    def check_config(cls, config: FederatedConfig) -> None:
        """Raise ``ConfigError`` for settings this strategy cannot run (called by ``FederatedConfig``)."""

    # server half
    def initial_state(self, factors: State, scaling: dict[str, float]) -> State:
        """The global state before round 1, from a seeded adapter's initial factors (server's model)."""
        return factors

    def downlink(self, state: State) -> State:
        """What the server sends every sampled client (default: the whole global state)."""
        return state

    def expected_update(self, state: State, rank: int, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
        """Names and shapes a rank-``rank`` client must send back; ``shapes[path] = (out, in)``."""
        return {**{f"{p}.lora_A": (rank, i) for p, (o, i) in shapes.items()},
                **{f"{p}.lora_B": (o, rank) for p, (o, i) in shapes.items()}}

    def aggregate(self, state: State, updates: list[State], weights: list[float], scalings: list[float]) -> State:
        """The next global state from accepted client updates; ``weights`` sum to 1; ``scalings[k]`` is client
        k's LoRA scaling α_k/r_k."""
        raise NotImplementedError

    def global_lora(self, state: State, scaling: float) -> tuple[State, float]:
        """The global model as one LoRA: ``({"<path>.lora_A": (R, in), "<path>.lora_B": (out, R)}, its scaling)``,
        ``ΔW = scaling · B A`` (default: the global factors themselves at the server adapter's ``scaling``)."""
        return state, scaling

    def global_delta(self, state: State, scaling: float) -> dict[str, torch.Tensor]:
        """``{module path: ΔW (out, in)}`` the global model adds to the base weights (for evaluation)."""
        factors, s = self.global_lora(state, scaling)
        return {k[: -len(".lora_A")]: s * factors[k[: -len(".lora_A")] + ".lora_B"] @ factors[k]
                for k in factors if k.endswith(".lora_A")}

    # client half
    def client_start(self, model: nn.Module, received: State) -> None:
        """Before local training: set the client's fresh adapter (and base) from what the server sent."""
        write_factors(model, received)

    def client_update(self, model: nn.Module) -> State:
        """What the client uploads after local training."""
        return read_factors(model)


STRATEGIES: dict[str, type[LoraStrategy]] = {}


def register_strategy(cls: type[LoraStrategy]) -> type[LoraStrategy]:
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(config: FederatedConfig) -> LoraStrategy:
    return STRATEGIES[config.strategy](config)


def list_strategies() -> list[str]:
    return sorted(STRATEGIES)

