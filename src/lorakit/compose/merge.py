"""``merge_adapters``: several saved LoRA adapters -> one adapter folder (PEFT LoRA layout).

The sources are read through the core: each is loaded onto the base model and every adapted module is asked
for its rank-one units (``Delta.units()``: A (r, in), B (out, r), scaling s) and bias (``delta_bias()``), so
rsLoRA's ``α/√r``, ``rank_pattern`` / ``alpha_pattern`` (per-module r and α), ``lora_bias`` and embeddings
(PEFT's ``lora_embedding_A/B``) enter every method as the exact ΔW_i = s_i B_i A_i the forward uses.

The result always has scaling 1 per module (``lora_alpha`` = r, ``alpha_pattern`` = ``rank_pattern`` where ranks
differ; never rsLoRA), so ΔW is B @ A as stored, and any PEFT-compatible engine loads it. PEFT's
``add_weighted_adapter`` instead copies the first adapter's config with ``lora_alpha = r``: an rsLoRA source makes
its result √r too large, a ``lora_bias`` source loses its bias (the new B bias stays zero), and DoRA sources get a
fresh magnitude — so merging one adapter with weight 1 does not give it back (peft issue #3761).

**DoRA** (forward ``W' = diag(σ_i) (W + ΔW_i)`` with ``σ_i = m_i / ‖W + ΔW_i‖_row``) is merged in weight space:
the linear-family methods (linear, task_arithmetic, cat, svd) combine the effective deltas
``D_i = diag(σ_i − 1) W + diag(σ_i) ΔW_i`` with their coefficients c_i, giving
``W + Σ c_i D_i = diag(1 + γ) (W + L)``, ``γ = Σ c_i (σ_i − 1)``, ``L = diag(1 + γ)⁻¹ Σ c_i diag(σ_i) ΔW_i``,
which is exactly a DoRA adapter with low-rank part L and magnitude ``m = (1 + γ) ‖W + L‖_row`` (γ = 0 on a module
that only plain sources adapt: there ``m = ‖W + L‖_row`` and the DoRA forward is W + L). Methods that
sparsify or cluster (TIES, DARE, DELLA, breadcrumbs, SCE, LoRA-LEGO) have no such form and refuse DoRA sources.

**modules_to_save** (full copies, e.g. a classifier head): identical copies are kept; different copies are an
error unless ``saved_modules="first"`` (the first source that saves the module wins) or ``"merge"``
(``θ = θ_base + Σ w_i (θ_i − θ_base)``, task arithmetic on the whole module).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .. import __version__
from ..core.delta import describe_layer, oriented_weight
from ..core.errors import FIELD, AdapterError, AdapterLoadError, ConfigError, LorakitError, did_you_mean
from ..core.inits import BaseEdit, base_edits, changed_base_error, find_init, restore_base
from ..core.layer import ModulesToSaveWrapper
from ..core.model import adapter_layers, adapter_names, adapter_placement, adapter_state, discard_adapter, host_path
from ..core.targeting import iter_host_modules, select_modules_to_save
from ..io.peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, file_config_dict, load_adapter, write_adapter_files
from ..methods.lora import LoraConfig, lora_state_from_factors
from .methods import Dense, LowRank, MergeOptions, ModuleTerms, default_rank, dense_svd, get_merge_method

SAVED_MODULE_RULES = ("error", "first", "merge")
RECIPE_FIELD = "lorakit_merge"


@dataclass
class MergedAdapter:
    """A merge result: ``config`` (LoraConfig), ``state_dict`` with PEFT's file keys, ``recipe`` (how it was made).
    ``config_dict`` is the exact ``adapter_config.json`` content (recipe included under ``lorakit_merge``)."""

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    recipe: dict[str, Any]
    config_dict: dict[str, Any]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically into ``directory``."""
        directory = Path(directory)
        write_adapter_files(directory, self.state_dict, self.config_dict)
        return directory


def merge_adapters(sources: Sequence[str | os.PathLike], weights: Sequence[float] | None = None,
                   method: str = "linear", *, model: nn.Module | str | os.PathLike | None = None,
                   saved_modules: str = "error",
                   **options: Any) -> MergedAdapter:
    """Merge LoRA adapters into one.

    - ``sources``: adapter folders (lorakit or PEFT), or names of adapters already on ``model``.
    - ``weights``: one float per source (default 1.0 each; negative allowed).
    - ``method``: see :func:`lorakit.compose.list_merge_methods` (linear, cat, svd, task_arithmetic, ties,
      dare_linear, dare_ties, magnitude_prune, della, della_linear, breadcrumbs, breadcrumbs_ties, sce, lego and
      the ``<method>_svd`` forms of the dense ones).
    - ``model``: the base model, or a model folder / cached hub id to load once every source has been checked;
      default: the first folder's ``base_model_name_or_path`` (the bundled model when unset). Folder sources are
      loaded onto it temporarily and removed afterwards. Sources are folders unless ``model`` is a loaded model
      (then a name that is no folder is an adapter on it).
    - ``options``: :class:`MergeOptions` fields (density, svd_rank, majority_sign_method, normalize, rescale,
      lambda_, epsilon, gamma, select_topk, seed) and LoRA-LEGO's (k via svd_rank, reweighting, kmeans_iters).

    Raises ConfigError (unknown method/option, bad weights, DoRA with a sparsifying method, conflicting
    modules_to_save) and AdapterError / AdapterLoadError for unusable sources.
    """
    if isinstance(sources, (str, bytes, os.PathLike)):  # (a str is a sequence: its characters read as sources)
        raise ConfigError(f"sources must be a list of adapter folders or adapter names, got the single {sources!r}; "
                          f"pass [{str(sources)!r}].")
    if not sources:
        raise ConfigError("merge_adapters needs at least one source adapter.")
    if weights is not None and (isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__")):
        raise ConfigError(f"{FIELD} must be a list of numbers, one per source, got {weights!r}.", field="weights")
    try:
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{FIELD} must be numbers, one per source, got {weights!r} ({e}).", field="weights") from e
    if len(weights) != len(sources):
        raise ConfigError(f"got {len(weights)} weights for {len(sources)} sources; give one weight per source.")
    if not all(math.isfinite(w) for w in weights):  # (a NaN/inf delta: the SVD methods' LinAlgError, or NaN weights)
        raise ConfigError(f"{FIELD} must be finite numbers, got {weights}", field="weights")
    if not any(weights):  # as density 0: every method would write an all-zero adapter
        raise ConfigError(f"{FIELD} are all 0, so the merge would be an all-zero adapter; give at least one source a "
                          f"non-zero weight.", field="weights")
    if saved_modules not in SAVED_MODULE_RULES:
        raise ConfigError(f"saved_modules must be one of {SAVED_MODULE_RULES}, got {saved_modules!r}.")
    merge_method, truncate = get_merge_method(method)
    opts = _options(options, merge_method, truncate)
    _check_sources(sources, folders_only=not isinstance(model, nn.Module))
    _check_one_base(sources)
    if isinstance(model, (str, os.PathLike)):
        from ..hub import check_model, load_model_and_tokenizer
        model = load_model_and_tokenizer(check_model(model))[0]
    if model is None:
        model = _base_for(sources)
    names, loaded, edits = _attach_sources(model, sources)
    try:
        return _merge_loaded(model, names, [str(s) for s in sources], torch.tensor(weights), method, merge_method,
                             truncate, opts, saved_modules, edits)
    finally:
        for name in reversed(loaded):  # (none activated in their place: the active set is the caller's again)
            discard_adapter(model, name)


def merge_adapters_to(output: str | os.PathLike, sources: Sequence[str | os.PathLike],
                      weights: Sequence[float] | None = None, method: str = "linear", **kwargs: Any) -> Path:
    """:func:`merge_adapters`, then save the result into ``output``; returns the folder."""
    return merge_adapters(sources, weights, method, **kwargs).save(output)


# ---- sources ---------------------------------------------------------------------------------------------
def _options(options: dict[str, Any], method, truncate: bool = False) -> MergeOptions:
    """MergeOptions from keyword options; a name neither MergeOptions nor ``method`` knows is a ConfigError, and so
    is one ``method`` does not read (it would be silently ignored: svd_rank on ``ties`` instead of ``ties_svd``)."""
    known = {f.name for f in fields(MergeOptions)} - {"extra"}
    if "lambda" in options:
        options["lambda_"] = options.pop("lambda")
    if method.reads is not None:
        reads = set(method.reads) | ({"svd_rank"} if truncate else set()) | {"seed", "rank_tolerance"}
        for key, value in options.items():
            if key in known and key not in reads:
                name = method.name + ("_svd" if truncate else "")
                hint = (f" ({method.name}_svd truncates to svd_rank)" if key == "svd_rank" and not method.low_rank
                        else "")
                raise ConfigError(f"{key}={value!r} has no effect on merge method {name!r}{hint}; it reads "
                                  f"{', '.join(sorted(reads - {'rank_tolerance'}))}. Drop it or choose a method "
                                  "that uses it.")
    for key in options:
        if key not in known and key not in method.extra_options:
            valid = sorted(known | set(method.extra_options))
            raise ConfigError(f"unknown option {key!r} for merge method {method.name!r}.{did_you_mean(key, valid)} "
                              f"Options: {', '.join(valid)}.")
    given = {k: v for k, v in options.items() if k in known}
    return MergeOptions(**given, extra={k: v for k, v in options.items() if k not in known})


def _check_sources(sources: Sequence[str | os.PathLike], folders_only: bool) -> None:
    """Before any model is loaded: every folder source has a readable config and a safetensors file whose header
    reads; with ``folders_only`` (no loaded model to hold named adapters) every source must be a folder.
    AdapterError / AdapterLoadError naming the source."""
    from ..io.peft_format import check_adapter_folder

    for src in sources:
        folder = Path(src)
        if not folder.is_dir():
            if folders_only or folder.exists():
                what = "does not exist" if not folder.exists() else "is a file, not an adapter folder"
                raise AdapterError(f"source {str(src)!r} {what}. Sources are adapter folders (adapter_config.json + "
                                   f"adapter_model.safetensors), or, from Python, names of adapters already loaded "
                                   f"on the model passed to merge_adapters.")
            continue
        check_adapter_folder(folder)


def _base_for(sources: Sequence[str | os.PathLike]) -> nn.Module:
    from ..hub import load_model_and_tokenizer
    from ..io.peft_format import read_adapter_config

    base = read_adapter_config(Path(sources[0])).base_model_name_or_path  # a folder (_check_sources)
    return load_model_and_tokenizer(base)[0]


def _base_name(source) -> str | None:
    """The base model a folder source records (``base_model_name_or_path``; a bundled base by its name,
    ``hub.bundled_name``); None for a loaded adapter's name or a folder whose config cannot be read (the loader
    reports that)."""
    from ..hub import bundled_name
    from ..io.peft_format import read_adapter_config

    try:
        base = read_adapter_config(source).base_model_name_or_path if Path(source).is_dir() else None
    except LorakitError:
        return None
    return bundled_name(base) or base


def _module_sizes(folder: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per adapted module of a saved LoRA, the sizes its factors take from the base: lora_A (r, in, ...) -> in, ...;
    lora_B (out, r, ...) -> out, ... (the rank, which sources may choose freely, left out). Read from the
    safetensors header only; {} for another method's adapter (refused later, by name) or a missing or unreadable
    file (the loader reports that)."""
    from ..io.files import TensorFile
    from ..io.peft_format import read_adapter_config

    try:
        if not isinstance(read_adapter_config(folder), LoraConfig):
            return {}
        tensors = TensorFile(folder / WEIGHTS_NAME)
    except LorakitError:
        return {}
    sizes: dict[str, tuple[int, ...]] = {}
    for key in tensors.keys():
        match = re.match(r"(.+)\.lora_(?:embedding_)?([AB])(?:\.weight)?$", key.removeprefix(PREFIX))
        if match:
            shape = tensors.shape(key)
            path, factor = match.groups()
            part = shape[1:] if factor == "A" else (shape[0], *shape[2:])
            sizes[path] = sizes.get(path, ()) + ((("in" if factor == "A" else "out"), part),)
    return {path: dict(parts) for path, parts in sizes.items()}


def _check_one_base(sources) -> None:
    """Before any model is loaded: two folder sources whose common modules have other input / output sizes were
    trained on different bases. AdapterError naming both sources, their recorded bases and one module's sizes
    (a missing-tensor report from the loader would hide that)."""
    seen: dict[str, tuple[str, tuple]] = {}  # module -> (first source with it, its sizes)
    for src in sources:
        if not (Path(src) / WEIGHTS_NAME).is_file():
            continue
        for path, sizes in _module_sizes(Path(src)).items():
            first, first_sizes = seen.setdefault(path, (str(src), sizes))
            # a factor only one of them holds is a damaged file, not another base: the loader names the missing tensor
            if any(first_sizes[kind] != dims for kind, dims in sizes.items() if kind in first_sizes):
                raise AdapterError(
                    f"the sources were trained on different base models: {first!r} on {_base_name(first)!r} and "
                    f"{str(src)!r} on {_base_name(src)!r} (module {path!r}: {_sizes_text(first_sizes)} in the first, "
                    f"{_sizes_text(sizes)} in the second). Merge adapters of one base model.")


def _sizes_text(sizes: dict) -> str:
    return ", ".join(f"{kind} {'x'.join(map(str, dims))}" for kind, dims in sorted(sizes.items()))


def _attach_sources(model: nn.Module, sources) -> tuple[list[str], list[str], dict[str, dict[str, BaseEdit]]]:
    """Adapter names for the sources (folders loaded under temporary names), the names loaded here, and each
    source's base edits (an init that moved part of W into the adapter: PiSSA, OLoRA, LoRA-GA ...). A folder
    source's edits are undone right after it loads, so the base is the original for the next source (PiSSA on
    load factorises the weight it finds); nothing stays loaded on failure."""
    _refuse_refactorising(model, sources)
    names, loaded = [], []
    edits: dict[str, dict[str, BaseEdit]] = {}
    try:
        for i, src in enumerate(sources):
            if isinstance(src, str) and src in adapter_names(model) and not Path(src).is_dir():
                names.append(src)
            else:
                name = f"merge_source_{i}"
                while name in adapter_names(model):
                    name += "_"
                try:
                    load_adapter(model, src, name)
                except LorakitError as e:
                    _raise_if_other_base(model, sources, src, e)
                    raise
                names.append(name)
                loaded.append(name)
            edits[names[-1]] = base_edits(model, names[-1])
            if any(not isinstance(e, BaseEdit) for e in edits[names[-1]].values()):
                raise ConfigError(f"source {str(src)!r} was initialised with "
                                  f"{adapter_state(model).configs[names[-1]].init_lora_weights!r}, which replaced "
                                  "base weights by full-rank ones (LoftQ: their quantized values); its ΔW from the "
                                  "original base is no low-rank update, so it cannot be merged with other adapters.")
            if edits[names[-1]] and names[-1] in loaded:
                restore_base(model, names[-1])
            config = adapter_state(model).configs[names[-1]]
            if not isinstance(config, LoraConfig):
                raise ConfigError(
                    f"source {str(src)!r} is a {type(config).method or type(config).__name__!r} adapter; merge_adapters "
                    f"merges LoRA adapters (lora, rsLoRA, DoRA, any rank_pattern). Mixture adapters: see "
                    f"lorakit.compose.collapse_experts.")
    except BaseException:
        for name in reversed(loaded):  # (none activated in their place: the active set is the caller's again)
            discard_adapter(model, name)
        raise
    return names, loaded, edits


def _refuse_refactorising(model: nn.Module, sources) -> None:
    """ConfigError before anything loads when a folder source's init runs again on load (PiSSA, OLoRA:
    ``Init.rerun_on_load``, which factorises the base weights it finds) while an adapter already on ``model`` has
    changed those weights (its init moved part of the base into it, e.g. a PiSSA adapter passed by name): the
    folder source would factorise the edited base, not the one it was trained on."""
    from ..io.peft_format import read_adapter_config

    edited = sorted(name for name, record in adapter_state(model).inits.items() if record.edits)
    if not edited:
        return
    for src in sources:
        if not Path(src).is_dir():
            continue  # an adapter on the model by name
        spec = read_adapter_config(Path(src)).requested_init()
        init = find_init(spec) if spec is not None else None
        if init is not None and init.rerun_on_load:
            raise ConfigError(changed_base_error(
                f"source {str(src)!r}", spec,
                f"— and loading it would redo {init.name!r} on this model's base, which adapter(s) {edited} on "
                f"the model have already changed (their init moved part of it into them), so it would factorise "
                f"the wrong weights"))


def _raise_if_other_base(model: nn.Module, sources, src, error: Exception) -> None:
    """A source that fails to load and records another base than the merge's (``model``'s, else the first
    source's): AdapterLoadError saying so first, then the loader's details."""
    from ..hub import bundled_name, same_model
    from ..io.peft_format import _name_or_path

    base, ours = _base_name(src), _name_or_path(model) or _base_name(sources[0])
    ours = bundled_name(ours) or ours
    if base and ours and not same_model(base, ours):
        raise AdapterLoadError(f"source {str(src)!r} was trained on base {base!r}, not on the merge's base {ours!r}; "
                               f"merge adapters of one base model (loading it failed: {error})") from None
    if base is None and Path(src).is_dir() and _records_no_base(src):  # e.g. peft on a model built from a config
        raise AdapterLoadError(f"source {str(src)!r} records no base model (base_model_name_or_path is null) and does "
                               f"not fit the merge's base {ours or 'the bundled model'!r}; pass the model it was trained "
                               f"on (model= / --model) (loading it failed: {error})") from None


def _records_no_base(folder) -> bool:
    from ..io.peft_format import read_adapter_config

    try:
        return not read_adapter_config(folder).base_model_name_or_path
    except LorakitError:
        return False


def _cpu32(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, float32, on CPU (no copy when it already is). Merges run there whatever the model's device:
    the factors are small, the dense methods' (N, out, in) stacks fit host memory better than accelerator memory,
    and DARE / DELLA draw their masks from one seeded CPU generator, so a merge gives the same adapter on every
    device."""
    return t.detach().to(device="cpu", dtype=torch.float32)


def _module_terms(layer, names: list[str], weights: torch.Tensor, edits: dict[str, BaseEdit | None],
                  labels: Sequence[str] | None = None):
    """(ModuleTerms, DoRA row scales σ (N, out) or None, indices of the sources present, base weight (out, in) or
    None) for one adapted layer; plain sources get σ = 1 next to DoRA ones. ``labels``: how errors name each
    source (its folder or adapter name as given; default the names on the model). ``edits[name]``: the base edit source
    ``name``'s init made here (``W_init = W + s_e·B_e A_e``), whose units join the source's, so its ΔW is the one
    from the original base (PEFT's ``path_initial_model_for_weight_conversion``: rank r + r_e)."""
    present = [i for i, n in enumerate(names) if n in layer.adapters]
    A, B, s, bias, rows = [], [], [], [], []
    base_w = None
    device_w = None
    for i in present:  # the arithmetic runs on CPU in float32 (see _cpu32), whatever device the model is on
        delta = layer.adapters[names[i]]
        units = delta.units()
        edit = edits.get(names[i])
        if edit is None:
            A.append(_cpu32(units.A))
            B.append(_cpu32(units.B))
        else:
            if hasattr(delta, "lora_magnitude_vector"):
                label = (labels or names)[i]
                raise ConfigError(f"source {label!r} is DoRA with an init that changed the base weights; its "
                                  "magnitude is relative to that base. Merge a DoRA adapter without such an init.")
            A.append(torch.cat([_cpu32(units.A), _cpu32(edit.A)]))  # (r + r_e, in)
            B.append(torch.cat([_cpu32(units.B), _cpu32(edit.B) * (edit.scaling / float(units.scaling))], 1))
        s.append(float(units.scaling))
        b = delta.delta_bias()
        bias.append(None if b is None else _cpu32(b))
        if hasattr(delta, "lora_magnitude_vector"):  # DoRA: σ_i = m_i / ‖W + ΔW_i‖_row, from the core's merge terms
            if device_w is None:
                device_w = oriented_weight(layer.base_layer, layer.info).detach().float()
                base_w = _cpu32(device_w)
            rows.append(_cpu32(delta.merge_terms(device_w).row_scale))
        else:
            rows.append(None)
    out_f = B[0].shape[0]
    has_bias = any(b is not None for b in bias)
    terms = ModuleTerms(
        A=A, B=B, scaling=torch.tensor(s, dtype=torch.float32), weights=_cpu32(weights[present]),
        absent_weights=_cpu32(weights[[i for i in range(len(names)) if i not in present]]),
        bias=torch.stack([b if b is not None else torch.zeros(out_f) for b in bias]) if has_bias else None,
        stored_transposed=layer.info.fan_in_fan_out and layer.info.conv is None,
        stored_kernel=tuple(layer.info.conv.kernel_size) if layer.info.conv is not None else ())
    row_scale = None
    if any(r is not None for r in rows):
        row_scale = torch.stack([r if r is not None else torch.ones(out_f) for r in rows])  # (N, out)
    return terms, row_scale, present, base_w


# ---- merging ---------------------------------------------------------------------------------------------
def _merge_loaded(model, names, labels, weights, method_name, method, truncate, opts, saved_modules,
                  edits=None) -> MergedAdapter:
    adapted = list(adapter_layers(model))
    for path, layer in adapted:
        if layer.merged:
            raise AdapterError(f"module {path!r} has merged adapters {layer.merged}; unmerge_adapter before merging "
                               f"adapters (their base weight is needed unmodified).")
    for name, label in zip(names, labels):
        if getattr(adapter_state(model).configs[name], "trainable_token_indices", None) is not None:
            raise ConfigError(f"source {label!r} trains embedding rows (trainable_token_indices), which merge_adapters "
                              f"cannot combine (a row replacement has no low-rank form); merge it into the base "
                              f"instead (lorakit.merge_and_unload, `lorakit merge`).")
    gen = torch.Generator().manual_seed(opts.seed)
    results: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
    kinds: dict[str, str] = {}
    layers = {}
    for path, layer in adapted:
        if not any(n in layer.adapters for n in names):
            continue
        if layer.info.conv is not None and layer.info.conv.groups > 1:
            raise ConfigError(f"module {path!r} is a convolution with groups={layer.info.conv.groups}: its lora_B is "
                              f"grouped, which a merged (dense) low-rank factor does not fit. Exclude it from the "
                              f"sources (exclude_modules) to merge the rest.")
        here = {n: e[path] for n, e in (edits or {}).items() if path in e}
        terms, row_scale, present, base_w = _module_terms(layer, names, weights, here, labels)
        magnitude = None
        if row_scale is not None:
            if method.coefficients is None:
                raise ConfigError(
                    f"module {path!r}: DoRA sources can be merged exactly only by linear, task_arithmetic, cat or svd "
                    f"(their magnitudes rescale the base weight row by row; {method_name!r} has no DoRA form). "
                    f"Use one of those (a DoRA adapter has no exact plain-LoRA form: `lorakit export` keeps it "
                    f"DoRA).")
            coef = method.coefficients(terms, opts)  # (N,) c_i
            gamma = (coef[:, None] * (row_scale - 1)).sum(0)  # (out,)
            if (1 + gamma).abs().min() < 1e-6:
                raise ConfigError(f"module {path!r}: the merged DoRA row scale 1 + Σ c_i(σ_i − 1) is 0 for some row; "
                                  f"these weights have no DoRA form.")
            terms.B = [b * r[:, None] for b, r in zip(terms.B, row_scale)]
            if terms.bias is not None:
                terms.bias = terms.bias * row_scale
        result = method.merge(terms, opts, gen)
        if isinstance(result, Dense):
            rank = (opts.svd_rank or default_rank(terms)) if truncate else None
            A, B = dense_svd(result.delta, rank, opts.rank_tolerance)
            result = LowRank(A=A, B=B, bias=result.bias)
        A, B, bias = result.A, result.B, result.bias
        if row_scale is not None:
            scale = 1 + gamma
            B = B / scale[:, None]
            bias = None if bias is None else bias / scale
            magnitude = scale * torch.linalg.norm(base_w + B @ A, dim=1)
        results[path] = (A, B, bias, magnitude)
        kinds[path] = layer.info.kind
        layers[path] = layer
    if not results:
        raise AdapterError("the sources adapt no module of this model")
    if any(r[3] is not None for r in results.values()):
        # A DoRA result has a magnitude on every module. Where no source was DoRA, m = ‖W + ΔW‖_row makes the
        # DoRA forward m ⊙ (W + ΔW) / ‖W + ΔW‖_row equal W + ΔW exactly.
        for path, (A, B, bias, magnitude) in results.items():
            if magnitude is None:
                base_w = _cpu32(oriented_weight(layers[path].base_layer, layers[path].info))
                results[path] = (A, B, bias, torch.linalg.norm(base_w + B @ A, dim=1))
    configs = [adapter_state(model).configs[n] for n in names]
    config = output_config(configs, results, kinds)
    recipe = {"method": method_name, "weights": weights.tolist(), "sources": labels,
              "options": recipe_options(opts), "lorakit_version": __version__}
    return build_output(model, config, results, recipe,
                        lambda path: _saved_module_state(model, names, weights, path, saved_modules))


def recipe_options(opts: MergeOptions) -> dict[str, Any]:
    default = MergeOptions()
    out = {f.name: getattr(opts, f.name) for f in fields(MergeOptions)
           if f.name != "extra" and getattr(opts, f.name) != getattr(default, f.name)}
    out.update(opts.extra)
    return out


def output_config(configs, results, kinds) -> LoraConfig:
    """The merged adapter's LoraConfig: scaling 1 everywhere, per-module ranks via rank_pattern/alpha_pattern."""
    ranks = {path: int(r[0].shape[0]) for path, r in results.items()}
    r = max(ranks.values())
    pattern = {re.escape(path): k for path, k in ranks.items() if k != r}
    has_bias = any(res[2] is not None for res in results.values())
    if has_bias and "embedding" in kinds.values():
        raise ConfigError("the sources mix lora_bias=True with adapted embedding layers; one LoRA adapter cannot hold "
                          "both (embeddings take no lora_bias, as in PEFT). Merge them in two groups.")
    use_dora = any(res[3] is not None for res in results.values())
    if has_bias and use_dora:
        raise ConfigError("the sources mix lora_bias=True with DoRA; PEFT has no adapter with both (it refuses "
                          "lora_bias with use_dora), so the merge would not load elsewhere. Merge them in two groups.")
    saved = sorted({m for c in configs for m in (c.modules_to_save or [])})
    return LoraConfig(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=sorted(results),
        use_dora=use_dora, lora_bias=has_bias,
        modules_to_save=saved or None, base_model_name_or_path=configs[0].base_model_name_or_path,
        init_lora_weights=True)


def build_output(model, config, results, recipe, saved_state=None) -> MergedAdapter:
    """Write ``results[path] = (A, B, bias, magnitude)`` (scaling 1) straight into PEFT's file layout: per module
    the tensors a LoRA delta with ``config`` would hold there (:func:`~lorakit.methods.lora.lora_state_from_factors`,
    on the device and in the dtype ``plan_adapter`` gives it), keys in the model's module order, and the config
    file :func:`~lorakit.io.peft_format.save_adapter` would write. Nothing is built or attached on ``model``.
    ``saved_state(path)``: the state of a modules_to_save entry, copied here into the host module's dtypes."""
    host = dict(iter_host_modules(model))
    # not strict: the list is the sources' file lists (PEFT's SEQ_CLS writes ["classifier", "score"], of which
    # a model has one), which loaded the same way
    saved = set(select_modules_to_save(model, config, strict=False)) if saved_state is not None else set()
    state: dict[str, torch.Tensor] = {}
    infos = []
    with torch.no_grad():
        for path, base in host.items():
            if path in results:
                info = describe_layer(base)
                infos.append(info)
                device, dtype = adapter_placement(base)
                tensors = lora_state_from_factors(info, *results[path], lora_bias=config.lora_bias)
                for k, v in tensors.items():
                    state[f"{PREFIX}{path}.{k}"] = v.to(device=device, dtype=dtype).contiguous()
            elif path in saved:
                given = saved_state(path)
                for k, ref in base.state_dict().items():
                    state[f"{PREFIX}{path}.{k}"] = torch.empty_like(ref).copy_(given[k])
    config_dict = file_config_dict(model, config, infos)
    config_dict[RECIPE_FIELD] = recipe
    return MergedAdapter(config=config, state_dict=state, recipe=recipe, config_dict=config_dict)


def _saved_module_state(model, names, weights, path, rule) -> dict[str, torch.Tensor]:
    wrapper = next(m for p, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper) and host_path(p) == path)
    having = [(i, wrapper.copies[n].state_dict()) for i, n in enumerate(names) if n in wrapper.copies]
    first = having[0][1]
    identical = all(all(torch.equal(first[k], sd[k]) for k in first) for _, sd in having[1:])
    if identical or rule == "first":
        return first  # build_output copies it
    if rule == "merge":
        base = wrapper.original_module.state_dict()
        return {k: base[k] + sum(float(weights[i]) * (sd[k] - base[k]) for i, sd in having) for k in base}
    raise ConfigError(
        f"modules_to_save {path!r}: the sources hold different full copies of this module. Choose a rule: "
        f"saved_modules='first' (the first source's copy wins) or 'merge' (θ_base + Σ w_i (θ_i − θ_base)).")
