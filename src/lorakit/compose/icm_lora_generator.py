"""ICM-LoRA generator: train the CVAE on an adapter collection, then generate a PEFT LoRA for a task.

Paper: "In-Context Meta LoRA Generation", Shao et al., IJCAI 2025, arXiv 2501.17635; official code
github.com/YihuaJerry/ICM-LoRA @ 0b0057c. The CVAE and the flattening are in :mod:`.icm_lora`.

Pipeline (official file for each step):
1. A collection: several checkpoints of a LoRA per task (``utils/reformat_lora_param.py``), all with the same
   tensors. Here a run folder of ``lorakit train --save-every N`` gives its ``checkpoint-*`` folders; the task of
   each adapter is read from its ``task_index.json`` or given as ``TASK=DIR``.
2. Flatten + per-tensor normalisation (``utils/normalizeLoraWeight_small.py``).
3. The in-context task vector (``ICL/last_time_step_icl.py``): the output of the LLM's **last decoder layer at
   the last time step**, averaged over the task's examples. Departure, on purpose: the official script runs the
   model *with the task's trained LoRA* on 30 examples and averages over every generated step; a task without a
   trained LoRA (the held-out task this method is for) has no such model, so here the **base model** reads
   ``n_shots`` solved demonstrations of the task followed by a query prompt (in-context learning of the task)
   and the vector is averaged over ``n_queries`` queries at the prompt's last position. Every task, seen or not,
   gets its vector the same way, so the condition space is one.
4. Train the CVAE (``TrainScript_CVAE.py``): AdamW at lr 2e-4 (the script uses an ``optimizer`` it never
   defines; AdamW is what its imports offer), batch 2, cosine annealing with ``T_max = 2·epochs`` stepped once
   per epoch, seed 2024. The official 2000 epochs are a parameter (CPU runs here use fewer).
5. Generate (``utils/ReconstructLora_cvae.py``): ``z ~ N(0, I)``, ``x̂ = decode(z, c)``, cut to L, undo the
   normalisation with stored per-tensor mean/std, write the adapter. The official script reads mean/std from
   one chosen checkpoint file of the task; here each task keeps the mean over its checkpoints of every tensor's
   mean and std, and an unseen task gets the mean over the whole collection. ``temperature`` scales z
   (1 = the official sample, 0 = the prior mean).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import __version__
from ..core.config import check_non_negative, check_positive, check_positive_ints
from ..core.errors import (AdapterError, AdapterLoadError, ConfigError, LorakitError, did_you_mean,
                           did_you_mean_path)
from ..core.inits import changed_base_error
from ..io.files import load_tensors, read_json, save_tensors_and_json
from ..io.peft_format import CONFIG_NAME, WEIGHTS_NAME, weights_path, write_adapter_files
from .icm_lora import (AdapterLayout, CvaeConfig, LoraCvae, denormalize, flatten_tensors, normalize, tensor_stats,
                       unflatten_tensors)

GENERATOR_CONFIG = "icm_lora_config.json"
GENERATOR_WEIGHTS = "icm_lora.safetensors"
ANY_TASK = "*"  # stats key for a task the collection does not have
# Config fields every adapter of a collection must share (they decide what the tensors mean).
SHARED_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern",
                 "alpha_pattern", "lora_bias", "fan_in_fan_out")


@dataclass
class IcmLoraConfig:
    """Generator training options: the CVAE shape, the in-context condition and the optimiser.

    ``n_shots`` solved examples precede each of ``n_queries`` query prompts when the condition is computed.
    Defaults follow the official code (lr 2e-4, batch 2, seed 2024, 2000 epochs). Raises ConfigError.
    """

    cvae: CvaeConfig = field(default_factory=CvaeConfig)
    epochs: int = 2000
    batch_size: int = 2
    lr: float = 2e-4
    seed: int = 2024
    n_shots: int = 3
    n_queries: int = 16

    def __post_init__(self) -> None:
        check_non_negative(self, "seed")  # numpy's and Python's seeding refuse a negative seed
        if isinstance(self.cvae, dict):
            self.cvae = CvaeConfig(**self.cvae)
        check_positive_ints(self, "epochs", "batch_size", "n_shots", "n_queries")
        check_positive(self, "lr")


@dataclass
class AdapterSample:
    """One adapter of a collection: its task, folder and tensors (PEFT file keys)."""

    task: str
    source: str
    tensors: dict[str, torch.Tensor]


# ---------------------------------------------------------------- the collection


def _adapter_folders(folder: Path) -> list[Path]:
    if (folder / CONFIG_NAME).is_file():
        return [folder]
    checkpoints = sorted((p for p in folder.glob("checkpoint-*") if (p / CONFIG_NAME).is_file()),
                         key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    if checkpoints:
        return checkpoints
    if (folder / "adapter" / CONFIG_NAME).is_file():
        return [folder / "adapter"]
    if not folder.exists():
        raise AdapterLoadError(f"{folder} does not exist.{did_you_mean_path(folder)}")
    raise AdapterLoadError(f"{folder}: no adapter here (no {CONFIG_NAME}, no checkpoint-*/ or adapter/ folder)")


def _task_of(folder: Path) -> str:
    from ..data.keys import read_task_index

    for where in (folder, folder.parent / "adapter"):
        index = read_task_index(where)
        if index is not None:
            if len(index) != 1:
                raise AdapterError(f"{folder} was trained on {len(index)} tasks ({', '.join(sorted(index))}); "
                                   f"name its task as TASK={folder}")
            return next(iter(index))
    raise AdapterError(f"cannot tell the task of {folder} (no task_index.json); pass it as TASK={folder}")


def read_collection(specs: Sequence[str | os.PathLike]) -> tuple[list[AdapterSample], dict[str, Any]]:
    """Adapters from ``specs`` (``DIR`` or ``TASK=DIR``; a run folder gives its ``checkpoint-*`` folders) and the
    first adapter's ``adapter_config.json``.

    Every adapter must have the same tensor keys and shapes and the same ``SHARED_FIELDS``: AdapterError names
    the tensor (or field) and both folders otherwise, and a folder reached twice (the same run given twice, or a run
    and one of its checkpoints).
    """
    samples: list[AdapterSample] = []
    ref_config: dict[str, Any] | None = None
    seen: dict[Path, str] = {}
    for spec in specs:
        text = os.fspath(spec)
        task, _, path = text.partition("=") if "=" in text and not Path(text).exists() else ("", "", text)
        for folder in _adapter_folders(Path(path)):
            if folder.resolve() in seen:  # counted twice, its checkpoints would weigh double in the CVAE's loss
                raise AdapterError(f"{folder} is in the collection twice (from {seen[folder.resolve()]!r} and "
                                   f"{text!r}); give each adapter or run folder once")
            seen[folder.resolve()] = text
            config = read_json(folder / CONFIG_NAME)
            _check_plain_lora(folder, config)
            tensors = load_tensors(weights_path(folder))
            sample = AdapterSample(task or _task_of(folder), str(folder), tensors)
            if ref_config is None:
                ref_config = config
            else:
                _check_same(samples[0], ref_config, sample, config)
            samples.append(sample)
    if not samples:
        raise AdapterError("an ICM-LoRA collection needs at least one adapter folder")
    return samples, ref_config


def _check_plain_lora(folder: Path, config: dict) -> None:
    """ICM-LoRA generates plain LoRA factors: refuse other methods (their tensors are not lora_A/lora_B pairs)."""
    method = config.get("lorakit_method") or str(config.get("peft_type", "")).lower()
    if method != "lora" or config.get("use_dora"):
        kind = f"{method}{' (DoRA)' if config.get('use_dora') else ''}" or "unknown"
        raise AdapterError(f"{folder}: ICM-LoRA collections hold plain LoRA adapters (peft_type LORA, no DoRA); this "
                           f"one is {kind!r}. Export it as a plain LoRA first (`lorakit export`) if its method has one.")
    changed = changed_base_error(str(folder), config.get("init_lora_weights"), "the collection's adapters share")
    if changed is not None:
        raise AdapterError(changed)


def _check_same(ref: AdapterSample, ref_config: dict, other: AdapterSample, config: dict) -> None:
    for key in sorted(set(ref.tensors) | set(other.tensors)):
        if key not in other.tensors or key not in ref.tensors:
            has, lacks = (ref, other) if key in ref.tensors else (other, ref)
            hint = did_you_mean(key, lacks.tensors)
            raise AdapterError(f"tensor {key!r} is in {has.source} but not in {lacks.source}: adapters in one "
                               f"collection must have the same tensors (same target_modules and layers).{hint}")
        if ref.tensors[key].shape != other.tensors[key].shape:
            raise AdapterError(f"tensor {key!r} has shape {tuple(ref.tensors[key].shape)} in {ref.source} but "
                               f"{tuple(other.tensors[key].shape)} in {other.source}: one collection needs one rank "
                               f"and one base model")
    for name in SHARED_FIELDS:
        if ref_config.get(name) != config.get(name):
            raise AdapterError(f"adapters in one collection must share {name!r}: {ref.source} has "
                               f"{ref_config.get(name)!r}, {other.source} has {config.get(name)!r}")


# ---------------------------------------------------------------- the in-context task vector


@torch.no_grad()
def task_condition(model: nn.Module, tokenizer: Any, examples: Sequence[Any], n_shots: int) -> torch.Tensor:
    """The in-context task vector (hidden_size,): the last decoder layer's hidden state at the last position of
    ``demos + query prompt``, averaged over the queries (``ICL/last_time_step_icl.py`` l.103-105, 173-174).

    Read after the model's final norm (``hidden_states[-1]``): Florence-2, the official model, has a post-LN
    decoder whose last layer already outputs normalised states, while in a pre-norm model (Llama) the last
    layer's raw output is the un-normalised residual stream (entries in the hundreds), which would swamp the
    latent it is concatenated with.

    ``examples``: Examples (prompt, completion); the first ``n_shots`` are the solved demonstrations, the rest
    the queries. Raises ValueError with fewer than ``n_shots + 1`` examples.
    """
    if len(examples) <= n_shots:
        raise ValueError(f"a task vector needs more than n_shots={n_shots} examples, got {len(examples)}")
    context = "".join(f"{ex.prompt}{ex.completion}\n" for ex in examples[:n_shots])
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        states = []
        for ex in examples[n_shots:]:
            ids = tokenizer(context + ex.prompt, return_tensors="pt")["input_ids"].to(device)
            states.append(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].float().cpu())
    finally:
        model.train(was_training)
    return torch.stack(states).mean(0)


def task_conditions(tasks: Sequence[str], model: nn.Module, tokenizer: Any, config: IcmLoraConfig) -> dict[str, torch.Tensor]:
    """``task_condition`` for each built-in task name or JSONL path, from its train split."""
    from ..data import load_examples

    return {task: task_condition(model, tokenizer, load_examples(task, "train", config.n_shots + config.n_queries,
                                                                 seed=config.seed), config.n_shots)
            for task in tasks}


# ---------------------------------------------------------------- the generator


@dataclass
class IcmLoraGenerator:
    """A trained ICM-LoRA generator: the CVAE, the adapter layout, per-task conditions and de-normalisation stats.

    ``stats[task] = (means, stds)``, each (n_tensors,); ``stats["*"]`` is for tasks not in the collection.
    """

    cvae: LoraCvae
    layout: AdapterLayout
    adapter_config: dict[str, Any]
    conditions: dict[str, torch.Tensor]
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: IcmLoraConfig
    history: list[dict[str, float]] = field(default_factory=list)

    @torch.no_grad()
    def generate(self, condition: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor], n: int = 1, seed: int = 0,
                 temperature: float = 1.0) -> list[dict[str, torch.Tensor]]:
        """``n`` adapters (PEFT-key tensor dicts) for one condition (condition_dim,): z = temperature · N(0, I)."""
        self.cvae.eval()
        g = torch.Generator().manual_seed(seed)
        z = temperature * torch.randn(n, self.config.cvae.latent_dim, generator=g)
        x = self.cvae.decode(z, condition.expand(n, -1))[:, : self.layout.length]  # (n, L)
        return [unflatten_tensors(denormalize(row, self.layout, *stats), self.layout) for row in x]

    @torch.no_grad()
    def reconstruct(self, tensors: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
        """Encode an adapter with its task's condition, decode the posterior mean, undo its own normalisation."""
        if task not in self.conditions:
            raise AdapterError(f"the generator has no task {task!r} (its tasks: {sorted(self.conditions)})."
                               f"{did_you_mean(task, self.conditions)}")
        self.cvae.eval()
        stats = tensor_stats(tensors, self.layout)
        x = normalize(flatten_tensors(tensors, self.layout), self.layout, *stats)[None]
        c = self.conditions[task][None]
        mu, _ = self.cvae.encode(x, c)
        return unflatten_tensors(denormalize(self.cvae.decode(mu, c)[0, : self.layout.length], self.layout, *stats),
                                 self.layout)

    def save(self, directory: str | os.PathLike) -> Path:
        """``icm_lora_config.json`` + ``icm_lora.safetensors`` (CVAE state, conditions, stats), atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"cvae.{k}": v for k, v in self.cvae.state_dict().items()}
        tensors.update({f"condition.{t}": c for t, c in self.conditions.items()})
        for t, (mean, std) in self.stats.items():
            tensors[f"stats.{t}.mean"], tensors[f"stats.{t}.std"] = mean, std
        save_tensors_and_json(directory / GENERATOR_WEIGHTS, tensors, {directory / GENERATOR_CONFIG: {
            "method": "icm_lora", "paper": "arXiv:2501.17635", "config": asdict(self.config),
            "layout": [[k, list(s)] for k, s in self.layout.entries], "adapter_config": self.adapter_config,
            "tasks": sorted(self.conditions), "condition_dim": self.cvae.condition_dim, "history": self.history}},
            metadata={"format": "pt", "lorakit_version": __version__})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "IcmLoraGenerator":
        """Read a generator folder (safetensors only). Raises AdapterLoadError naming a missing file or tensor; for a
        folder that is no generator, the generator folders beside it, nearest first (:func:`find_generators`)."""
        directory = Path(directory)
        if not (directory / GENERATOR_CONFIG).is_file():
            raise AdapterLoadError(_not_a_generator(directory))
        meta = read_json(directory / GENERATOR_CONFIG)
        if meta.get("method") != "icm_lora":
            raise AdapterLoadError(f"{directory / GENERATOR_CONFIG} is not an ICM-LoRA generator config")
        try:  # a config from another writer or hand-edited: name the file, not a KeyError deep in here
            config = IcmLoraConfig(**{f.name: meta["config"][f.name] for f in fields(IcmLoraConfig)
                                      if f.name in meta["config"]})
            layout = AdapterLayout(tuple((str(k), tuple(int(n) for n in s)) for k, s in meta["layout"]))
            condition_dim, tasks, adapter_config = int(meta["condition_dim"]), list(meta["tasks"]), meta["adapter_config"]
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, LorakitError):
                raise
            raise AdapterLoadError(f"{directory / GENERATOR_CONFIG} is not a whole ICM-LoRA generator config "
                                   f"({type(e).__name__}: {e}); write it again with `lorakit generate-adapter train`"
                                   ) from None
        tensors = load_tensors(directory / GENERATOR_WEIGHTS)
        cvae = LoraCvae(config.cvae, layout.length, condition_dim)
        try:
            cvae.load_state_dict({k.removeprefix("cvae."): v for k, v in tensors.items() if k.startswith("cvae.")})
            conditions = {t: tensors[f"condition.{t}"] for t in tasks}
            stats = {t: (tensors[f"stats.{t}.mean"], tensors[f"stats.{t}.std"]) for t in [*tasks, ANY_TASK]}
        except (KeyError, RuntimeError) as e:
            raise AdapterLoadError(f"{directory / GENERATOR_WEIGHTS} does not match its config: {e}") from None
        for t, (mean, std) in stats.items():  # one mean and std per layout tensor, else generation cannot undo them
            if mean.shape != (len(layout.entries),) or std.shape != mean.shape:
                raise AdapterLoadError(f"{directory / GENERATOR_WEIGHTS} does not match its config: stats of task "
                                       f"{t!r} have {tuple(mean.shape)} values, the layout has {len(layout.entries)} "
                                       "tensors")
        for t, c in conditions.items():
            if c.shape != (condition_dim,):
                raise AdapterLoadError(f"{directory / GENERATOR_WEIGHTS} does not match its config: the task vector "
                                       f"of {t!r} has shape {tuple(c.shape)}, condition_dim is {condition_dim}")
        cvae.eval()
        return cls(cvae, layout, adapter_config, conditions, stats, config, meta.get("history", []))


def find_generators(folder: str | os.PathLike = ".", depth: int = 2) -> list[str]:
    """Generator folders (holding ``icm_lora_config.json``) in ``folder`` and up to ``depth`` levels below it."""
    found, level = [], [Path(folder)]
    for _ in range(depth + 1):
        found += [str(d) for d in level if (d / GENERATOR_CONFIG).is_file()]
        level = [c for d in level if d.is_dir() and not d.name.startswith(".") for c in sorted(d.iterdir()) if c.is_dir()]
    return sorted(found)


def _not_a_generator(directory: Path) -> str:
    """Why ``directory`` is no generator, and the generators near it (beside it, or under the current folder)."""
    if not directory.exists():
        what = "does not exist"
    elif not directory.is_dir():
        what = "is a file"
    elif (directory / CONFIG_NAME).is_file():
        what = f"is an adapter folder ({CONFIG_NAME}), not a generator"
    else:
        what = f"has no {GENERATOR_CONFIG}, so it is not a generator"
    parent = directory.parent if directory.parent.is_dir() else Path(".")
    generators = [g for g in find_generators(parent) if Path(g) != directory]
    listed = (f" Generators in {parent}: {', '.join(generators[:10])}{' ...' if len(generators) > 10 else ''}."
              f"{did_you_mean(str(directory), generators)}" if generators else f" There is no generator in {parent}.")
    return (f"ICM-LoRA generator {str(directory)!r} {what}.{listed} A generator is the folder `lorakit "
            "generate-adapter train --adapters ... --output DIR` writes.")


def train_generator(samples: Sequence[AdapterSample], adapter_config: dict[str, Any],
                    conditions: dict[str, torch.Tensor], config: IcmLoraConfig | None = None,
                    log: Callable[[dict[str, float]], None] | None = None) -> IcmLoraGenerator:
    """Fit the CVAE to the normalised, flattened ``samples`` with their tasks' ``conditions`` (TrainScript_CVAE.py).

    Returns the generator in eval mode with one ``{"epoch", "loss", "recon", "kld"}`` record per epoch in
    ``history`` (also passed to ``log``). Raises AdapterError when a sample's task has no condition.
    """
    config = config or IcmLoraConfig()
    missing = sorted({s.task for s in samples} - set(conditions))
    if missing:
        raise AdapterError(f"no task vector for task(s) {', '.join(missing)}")
    layout = AdapterLayout.of(samples[0].tensors)
    stats = [tensor_stats(s.tensors, layout) for s in samples]
    x = torch.stack([normalize(flatten_tensors(s.tensors, layout), layout, *st) for s, st in zip(samples, stats)])
    c = torch.stack([conditions[s.task] for s in samples])  # (N, condition_dim)
    torch.manual_seed(config.seed)
    cvae = LoraCvae(config.cvae, layout.length, c.shape[1])
    optimizer = torch.optim.AdamW(cvae.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2 * config.epochs)
    g = torch.Generator().manual_seed(config.seed)
    history = []
    cvae.train()
    for epoch in range(config.epochs):
        totals = torch.zeros(3)
        order = torch.randperm(len(samples), generator=g)
        for start in range(0, len(samples), config.batch_size):
            idx = order[start: start + config.batch_size]
            loss, recon, kld = cvae(x[idx], c[idx], generator=g)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            totals += torch.tensor([loss.item(), recon.item(), kld.item()])
        scheduler.step()
        record = dict(zip(("loss", "recon", "kld"), (totals / math.ceil(len(samples) / config.batch_size)).tolist()))
        history.append({"epoch": epoch + 1, **record})
        if log is not None:
            log(history[-1])
    cvae.eval()
    per_task: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for task in sorted({s.task for s in samples}):
        mine = [st for s, st in zip(samples, stats) if s.task == task]
        per_task[task] = (torch.stack([m for m, _ in mine]).mean(0), torch.stack([d for _, d in mine]).mean(0))
    per_task[ANY_TASK] = (torch.stack([m for m, _ in stats]).mean(0), torch.stack([d for _, d in stats]).mean(0))
    used = {t: conditions[t] for t in per_task if t != ANY_TASK}
    return IcmLoraGenerator(cvae, layout, dict(adapter_config), used, per_task, config, history)


# ---------------------------------------------------------------- one-call API


def _base_model(adapter_config: dict[str, Any], model: Any, tokenizer: Any):
    """``model``/``tokenizer`` when both are given; else the model ``model`` names (a folder or hub id), else the
    adapters' ``base_model_name_or_path``, loaded now: after the collection or generator has been read."""
    if model is not None and tokenizer is not None:
        return model, tokenizer
    from ..hub import load_model_and_tokenizer

    if isinstance(model, (str, os.PathLike)):
        return load_model_and_tokenizer(model)
    return load_model_and_tokenizer(adapter_config.get("base_model_name_or_path"))


def _check_task_names(samples: Sequence[AdapterSample]) -> None:
    """ConfigError (with near matches) for the first sample whose task is neither a built-in task nor a path."""
    from ..data import looks_like_path
    from ..data.tasks import get_task

    for sample in samples:
        if not looks_like_path(sample.task):
            try:
                get_task(sample.task)
            except ConfigError as err:
                raise ConfigError(f"{err} (the task of adapter {sample.source})") from None


def train_icm_lora(adapters: Sequence[str | os.PathLike], config: IcmLoraConfig | None = None, *,
                   model: Any = None, tokenizer: Any = None,
                   log: Callable[[dict[str, float]], None] | None = None) -> IcmLoraGenerator:
    """Read a collection (see :func:`read_collection`), compute each task's in-context vector on the base model
    (``model``/``tokenizer``, or ``model`` a folder / hub id loaded once the collection has been read; default:
    the collection's ``base_model_name_or_path``) and train the CVAE. Raises ConfigError (with near matches) for a
    task that is neither a built-in task nor a JSONL path, before any model loads."""
    config = config or IcmLoraConfig()
    samples, adapter_config = read_collection(adapters)
    _check_task_names(samples)  # before the base model loads
    model, tokenizer = _base_model(adapter_config, model, tokenizer)
    conditions = task_conditions(sorted({s.task for s in samples}), model, tokenizer, config)
    return train_generator(samples, adapter_config, conditions, config, log)


def generate_adapter(generator: IcmLoraGenerator | str | os.PathLike, task: str, output: str | os.PathLike, *,
                     seed: int = 0, temperature: float = 1.0, model: Any = None, tokenizer: Any = None,
                     overwrite: bool = False) -> Path:
    """Write a PEFT LoRA for ``task`` (a built-in task name or a JSONL path) into ``output``, replacing the folder
    whole and atomically (``io.files.write_dir_atomically``).

    A task of the collection uses its stored vector and stats; another task gets its vector from the base model
    reading its examples in context and the collection-wide stats; only then is a base model needed (``model``/
    ``tokenizer``, or ``model`` a folder / hub id, default the collection's base). Raises ConfigError (unknown task,
    with near matches), ValueError (temperature), AdapterLoadError (a bad generator folder) and LorakitError
    (``output`` a non-empty folder without ``overwrite=True``, a file, or the generator's own folder, as ``lorakit
    generate-adapter`` refuses ``--output`` without ``--overwrite``) before any model loads.
    """
    from ..cli_parser import check_output_dir
    from ..io.files import write_dir_atomically

    generator_dir = None if isinstance(generator, IcmLoraGenerator) else generator
    check_output_dir(output, "output", overwrite=overwrite, reads=[generator_dir], switch="overwrite=True")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (z = temperature · N(0, I)), got {temperature}")
    gen = generator if isinstance(generator, IcmLoraGenerator) else IcmLoraGenerator.load(generator)
    if task in gen.conditions:
        condition, stats = gen.conditions[task], gen.stats[task]
    else:
        from ..data import looks_like_path
        from ..data.tasks import get_task

        if not looks_like_path(task):
            get_task(task)  # unknown name: ValueError with near matches
        model, tokenizer = _base_model(gen.adapter_config, model, tokenizer)
        condition, stats = task_conditions([task], model, tokenizer, gen.config)[task], gen.stats[ANY_TASK]
        if condition.shape[-1] != gen.cvae.condition_dim:  # another base: its hidden size cannot condition the CVAE
            base = gen.adapter_config.get("base_model_name_or_path") or "bundled"
            raise AdapterError(f"the task vector of {task!r} from this model has {condition.shape[-1]} values, but the "
                               f"generator was trained on task vectors of {gen.cvae.condition_dim} (the hidden size "
                               f"of the collection's base {base!r}); generate with that base (--model {base}).")
    tensors = gen.generate(condition, stats, n=1, seed=seed, temperature=temperature)[0]
    return write_dir_atomically(output, lambda out: write_adapter_files(out, tensors, gen.adapter_config, {
        out / "icm_lora_generation.json": {"task": task, "seed": seed, "temperature": temperature,
                                           "seen_task": task in gen.conditions}}))
