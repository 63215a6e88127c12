"""QLoRA — "QLoRA: Efficient Finetuning of Quantized LLMs", Dettmers et al., NeurIPS 2023, arXiv:2305.14314.

LoRA on a frozen 4-bit base (paper eq. 5): ``Y = X·doubleDequant(c1, c2, W_NF4) + s·X·A·B`` where the base
weight is stored as 4-bit NormalFloat (NF4) codes in blocks of 64 with one absmax constant ``c2`` per block,
and with double quantization the ``c2`` constants are themselves quantized to 8 bit in blocks of 256 (``c1``).
The matmul runs in the *compute dtype* (bfloat16 in the paper); only the adapter trains.

Library: bitsandbytes (``bnb.nn.Linear4bit`` / ``bnb.functional.dequantize_4bit``), the library of the QLoRA
authors, chosen over torchao's ``NF4Tensor`` because (1) bitsandbytes >= 0.50 runs 4-bit NF4 on CPU as well as
CUDA, so one code path is tested here and used on a GPU; (2) PEFT's LoRA dispatches ``bnb.nn.Linear4bit`` to its
``lora.bnb.Linear4bit`` layer, so the parity test compares against PEFT + the *same* quantized weights
(PEFT's torchao dispatch covers int8 tensors, not ``NF4Tensor``); (3) transformers loads any checkpoint
straight into 4 bit with ``BitsAndBytesConfig``, so a large base never exists in full precision in memory.
bitsandbytes is an optional extra: ``pip install lorakit[quantize]``.

Use: ``load_model_and_tokenizer(path, quantize="nf4")`` (or ``quantize_model(model)`` for a model in memory),
``add_adapter`` as usual, train, ``save_adapter`` (a PEFT LoRA file: PEFT loads it onto its own bnb-4bit base
and the other way round), then :func:`dequantize_model` + ``merge_and_unload`` for a full-precision merged
model (``lorakit merge --quantize nf4``). The merge adds ΔW to the *dequantized* NF4 weights, the weights the
adapter was trained against.

CPU layout: bitsandbytes >= 0.50.2 on a CPU with AVX512-BF16 repacks a ``Linear4bit``'s codes in place on its
first inference forward (eval mode, no grad) into a CPU kernel layout, storing the absmax constants in bfloat16
and dropping double quantization. That is lossy (the same model gives other outputs on other CPUs, and after
its first eval), it fails on layers whose out_features is not a multiple of 32 or in_features not a multiple of
the block size, and ``dequantize_4bit`` does not read that layout. Every 4-bit layer lorakit creates or loads
(:func:`quantize_model`, ``load_model_and_tokenizer(quantize=...)``) therefore keeps the QLoRA layout
(:func:`keep_qlora_layout`); :func:`dequantize_weight` unpacks a layer that was repacked elsewhere first.

CPU dequantization: bitsandbytes 0.50.2's native CPU ``dequantize_4bit`` reads the wrong block constants where a
block of 64 crosses a row end (in_features a multiple of 16 but not of 64, e.g. the bundled base's down_proj, 688),
so every CPU path (``dequantize_4bit``, the training and eval forwards of ``Linear4bit``) used a weight that is not
the NF4 round trip. The first time lorakit touches bitsandbytes it checks that kernel against the paper's
definition and, only where it is wrong, registers a CPU kernel that runs bitsandbytes' own native code on the
flattened weight (see ``_check_cpu_dequantize``). Codes and constants, and so the files, are bitsandbytes' own.
The check and the QLoRA layout also reach models transformers quantized outside lorakit: the core runs
:func:`prepare_4bit_host` on every layer an adapter is planned on, attached to or served on.

Files: :func:`quantize_model` records the quantization in ``model.config.quantization_config`` as transformers'
loading does, so ``save_pretrained`` writes a 4-bit folder plain ``from_pretrained`` reads back into the same layers.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..core.delta import Conv1D, register_dequantizer, register_host_preparer
from ..core.config import field_error
from ..core.errors import ConfigError, LorakitError, did_you_mean

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise LorakitError("4-bit bases need bitsandbytes: pip install 'lorakit[quantize]' "
                           "(bitsandbytes>=0.50, which runs 4-bit on CPU and CUDA)") from None
    _check_cpu_dequantize(bitsandbytes.functional)
    return bitsandbytes


# --- bitsandbytes CPU dequantization workaround -------------------------------------------------------------------
# QLoRA (arXiv:2305.14314 §2 eq. 1, §3 eq. 4) quantizes the *flattened* weight in blocks of 64 with one absmax per
# block, so a block crosses a row end wherever in_features is not a multiple of 64. bitsandbytes quantizes it that way
# on every device, and its pure-torch kernel dequantizes it that way. Its native CPU kernel (bitsandbytes
# 0.50.2, ``torch.ops.bitsandbytes.dequantize_4bit`` on a CPU tensor, reached from
# ``bnb.functional.dequantize_4bit(packed, state)``, the ``Linear4bit`` training forward (``MatMul4Bit``) and its
# no-grad forward (``gemm_4bit``)) takes its AVX-512 branch for a 2-D shape (m, n) with n % 16 == 0 and reads block
# ``row * (n // blocksize) + col // blocksize``: right for n % 64 == 0, the wrong absmax for n = 32, 48, 96, 688...
# (the bundled base's down_proj, in_features 688, came out with a relative error of 0.36 instead of NF4's 0.094). For
# one row (a flat shape) that index is the QLoRA one, so the fix re-registers the CPU kernel of that op to call the
# same native bitsandbytes function on the flattened weight (m = 1). It is installed only when a probe against the
# paper's definition finds the installed bitsandbytes wrong, so it is a no-op once bitsandbytes is fixed.
_CPU_FIX: dict[str, object] = {}
_CPU_FIX_LOCK = threading.Lock()  # a second first caller waits for the check instead of using the faulty kernel
_NATIVE_SUFFIX = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# QLoRA (arXiv:2305.14314) Appendix E: the 16 NF4 values (quantiles of N(0, 1) scaled to [-1, 1], exact zero)
_NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
               -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
               0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
               0.7229568362236023, 1.0)


def _cpu_dequantize_is_right(F) -> bool:
    """Whether ``F.dequantize_4bit`` on CPU follows QLoRA's flat blocks of 64 for a (2, 96) weight, whose second
    block spans both rows: value = NF4[code] · absmax(block), codes two per byte, high nibble first."""
    # float32 throughout, whatever torch's default dtype (get_4bit_type follows it: under bfloat16 its table is
    # rounded and no kernel matches it), so the NF4 values are QLoRA's Appendix E table written out
    weight = torch.randn(2, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()
    nf4 = torch.tensor(_NF4_VALUES, dtype=torch.float32)
    expected = (nf4[codes].view(-1, 64) * state.absmax.float().view(-1, 1)).view(2, 96)
    return torch.equal(F.dequantize_4bit(packed, state).float(), expected)


def _dequantize_4bit_cpu(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                         shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' native CPU 4-bit dequantization run on the flattened weight (as rows of whole blocks, or as one
    row of prod(shape) values where the last block is partial), which reads each block's absmax right for any shape.
    What its native kernel does not take (odd sizes, blocks of 2048 or more, other dtypes) goes to bitsandbytes' own
    pure-torch kernel, as its CPU backend does. Returns a tensor of ``shape`` and ``dtype``."""
    import ctypes
    from math import prod

    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    from bitsandbytes.cextension import lib
    from bitsandbytes.functional import get_ptr

    A = (A if A.dtype == torch.uint8 else A.view(torch.uint8)).contiguous()
    absmax = absmax.float().contiguous()
    n = prod(shape)
    if n % 2 or blocksize >= 2048 or dtype not in _NATIVE_SUFFIX or quant_type not in QUANT_TYPES:
        return _dequantize_4bit_compute(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize,
                                        shape, dtype)
    out = torch.empty(tuple(shape), dtype=dtype)
    kernel = getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{_NATIVE_SUFFIX[dtype]}")
    rows = n // blocksize if n % blocksize == 0 else 1  # rows of whole blocks read right too, and keep its row threads
    kernel(get_ptr(A), get_ptr(absmax), get_ptr(out), ctypes.c_longlong(blocksize), ctypes.c_longlong(rows),
           ctypes.c_longlong(n // rows))
    return out


def _check_cpu_dequantize(F) -> None:
    """Probe bitsandbytes' CPU dequantization once per process; where it misreads blocks that cross a row end,
    register :func:`_dequantize_4bit_cpu` as the CPU kernel of ``bitsandbytes::dequantize_4bit`` (process-wide:
    every bitsandbytes caller, PEFT and transformers included, then gets the QLoRA weights). Files are unchanged:
    the codes and constants are bitsandbytes' own, only how they are read back differs."""
    if "checked" in _CPU_FIX:
        return
    with _CPU_FIX_LOCK:  # marked checked only once the kernel is: other threads wait here until then
        if "checked" in _CPU_FIX:
            return
        try:
            with torch.device("cpu"):  # the first call may come under a meta-device context (adapters as shapes)
                _install_cpu_fix(F)
        finally:
            _CPU_FIX["checked"] = True


def _install_cpu_fix(F) -> None:
    if _cpu_dequantize_is_right(F):
        return
    import warnings

    library = torch.library.Library("bitsandbytes", "FRAGMENT")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that a kernel is overridden: that is the point
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", _dequantize_4bit_cpu, lib=library)
    if _cpu_dequantize_is_right(F):
        _CPU_FIX["library"] = library
        return
    library._destroy()
    warnings.warn("bitsandbytes' CPU dequantize_4bit misreads 4-bit blocks that cross a row end and lorakit's "
                  "workaround did not fix it: layers whose in_features is not a multiple of 64 get wrong weights.")


@dataclass(frozen=True)
class QuantizeConfig:
    """How the frozen base is stored (names as transformers' ``BitsAndBytesConfig``).

    - ``quant_type``: ``"nf4"`` (QLoRA's 4-bit NormalFloat) or ``"fp4"``.
    - ``double_quant``: quantize the per-block absmax constants too (QLoRA §3, ≈0.37 bit/parameter saved).
    - ``compute_dtype``: dtype of the dequantized matmul, ``"float32"``, ``"bfloat16"`` (the paper's) or
      ``"float16"``. float32 is the default here because CPUs without bf16 units run it faster.
    - ``skip_modules``: transformers' ``llm_int8_skip_modules``: patterns (strings, regular expressions) of the
      modules kept in full precision, matched as transformers matches them (:func:`skips_module`); a list is taken
      as the tuple. None = transformers' default for the model (:func:`skip_patterns`): its tied-weight modules,
      the module of its last parameter (a classification head) and its output embedding. A transformers model's
      ``_keep_in_fp32_modules`` are kept in full precision either way, as transformers keeps them.

    Raises ConfigError for an unknown quant type or compute dtype, and for ``skip_modules`` that is not a list of
    strings or holds an entry that is not a regular expression (naming the entry).
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"
    skip_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise field_error(self, "quant_type", f"={self.quant_type!r}: choose one of {QUANT_TYPES}."
                                                 f"{did_you_mean(self.quant_type, QUANT_TYPES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise field_error(self, "compute_dtype", f"={self.compute_dtype!r}: choose one of {tuple(COMPUTE_DTYPES)}."
                                                    f"{did_you_mean(self.compute_dtype, COMPUTE_DTYPES)}")
        if self.skip_modules is not None:
            self._check_skip_modules()

    def _check_skip_modules(self) -> None:
        if not isinstance(self.skip_modules, (list, tuple)):
            raise field_error(self, "skip_modules", f"={self.skip_modules!r}: give a list of module name patterns "
                                                   "(strings), e.g. ('lm_head',), or None for transformers' default.")
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))  # a list from a JSON/YAML config
        for key in self.skip_modules:
            if not isinstance(key, str):
                raise field_error(self, "skip_modules", f": the entry {key!r} is a {type(key).__name__}, not a "
                                                       "string; each entry is a module name pattern, e.g. 'lm_head'.")
            try:
                re.compile(key)
            except re.error as error:
                raise field_error(self, "skip_modules", f": the entry {key!r} is not a regular expression ({error}); "
                                                       "transformers matches each entry as one (write a literal "
                                                       "character such as ( with a backslash before it).") from None

    @classmethod
    def of(cls, value: "QuantizeConfig | str") -> "QuantizeConfig":
        """A config from itself or a quant type name (``"nf4"``)."""
        return value if isinstance(value, QuantizeConfig) else cls(quant_type=value)

    def to_transformers(self):
        """The equivalent ``transformers.BitsAndBytesConfig`` (for ``from_pretrained(quantization_config=...)``)."""
        from transformers import BitsAndBytesConfig

        _bnb()
        kwargs = {} if self.skip_modules is None else {"llm_int8_skip_modules": list(self.skip_modules)}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=COMPUTE_DTYPES[self.compute_dtype], **kwargs)


def is_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (without importing bitsandbytes when it is not loaded)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def skips_module(path: str, skip_modules: Sequence[str]) -> bool:
    """Whether ``skip_modules`` (``llm_int8_skip_modules``) keeps the module at ``path`` (and so every linear layer
    under it) in full precision, by transformers' own rule, the one its ``from_pretrained(quantization_config=...)``
    applies to a saved config: ``transformers.quantizers.quantizers_utils.should_convert_module`` (transformers 5:
    a pattern matching the path from its start up to a module boundary, as a regular expression, or a plain string
    suffix of the path; ``"model.layers.1"`` keeps layer 1, not 11; ``"p_proj"`` keeps ``up_proj``). Transformers
    without it (4.x) matched in ``integrations/bitsandbytes.py`` ``_replace_with_bnb_linear``: the module's own
    name, the whole path, or a pattern followed by a dot anywhere in it."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        own = path.rpartition(".")[2]
        return any(own == key or path == key or key + "." in path for key in skip_modules)
    return not should_convert_module(path, list(skip_modules))


def skip_patterns(model: nn.Module, skip_modules: Sequence[str] | None = None) -> list[str] | None:
    """The patterns (for :func:`skips_module`) of the modules transformers' bitsandbytes loading keeps in full
    precision for ``model`` given ``llm_int8_skip_modules=skip_modules``, as
    ``transformers.quantizers.base.HfQuantizer.get_modules_to_not_convert`` builds them (transformers 5;
    ``quantizer_bnb_4bit.py`` in 4.x): ``skip_modules``, or when None transformers' ``get_keys_to_not_convert(model)``
    (its tied-weight modules, the module of its last parameter, its output embedding), then the model's
    ``_keep_in_fp32_modules`` in both cases. None for a model that is not a transformers ``PreTrainedModel``."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    if skip_modules is None:
        try:
            from transformers.quantizers.base import get_keys_to_not_convert
        except ImportError:  # transformers 4.x
            from transformers.integrations import get_keys_to_not_convert
        patterns = sorted(get_keys_to_not_convert(model))
    else:
        patterns = list(skip_modules)
    return patterns + sorted(set(getattr(model, "_keep_in_fp32_modules", None) or ()) - set(patterns))


def _skipped(model: nn.Module, config: QuantizeConfig, patterns: list[str] | None) -> set[int]:
    if patterns is None and config.skip_modules is not None:  # a model outside transformers
        patterns = list(config.skip_modules)
    if patterns is not None:
        return {id(m) for n, m in model.named_modules() if skips_module(n, patterns)}
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {id(head)} if head is not None else set()


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of a layer transformers' bitsandbytes loading converts, else None: an exact
    ``nn.Linear``, or a GPT-2 ``Conv1D`` (stored (in, out), read transposed), as
    ``transformers/integrations/bitsandbytes.py`` ``replace_with_bnb_linear`` chooses them (transformers 5.24,
    line 189: ``isinstance(module, Conv1D) or type(module) is nn.Linear``) and ``Bnb4bitQuantize`` quantizes them
    (lines 52-55: a Conv1D's value ``.T``)."""
    if type(module) is nn.Linear:
        return module.weight.data
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.data.T  # (in, out) -> (out, in)
    return None


def quantize_model(model: nn.Module, config: QuantizeConfig | str = "nf4") -> nn.Module:
    """Replace every ``nn.Linear`` and GPT-2 ``Conv1D`` of ``model`` by a bitsandbytes 4-bit layer holding the same
    weight quantized (a Conv1D's as the (out, in) transpose of its (in, out) storage, so the layer still computes
    ``x @ W + b``), in place, but those transformers' loading keeps in full precision (``skip_modules``, by default
    transformers' choice for the model: :func:`skip_patterns`; a model outside transformers keeps its output
    embedding, if it names one, or the layers ``skip_modules`` matches); returns ``model``. The layers converted
    are those transformers' ``BitsAndBytesConfig`` loading converts (:func:`_linear_weight`), quantized on the
    weight's device (CPU or CUDA) exactly as that loading does it (same codes, same constants); a converted
    Conv1D's 4-bit layer records ``source_cls`` as transformers' does, so :func:`dequantize_model` gives a Conv1D
    back. A transformers model gets ``config.quantization_config`` as that loading sets it, so its
    ``save_pretrained`` folder loads back in 4 bit with plain ``from_pretrained``. Call before ``add_adapter``
    (LorakitError after it, and without bitsandbytes)."""
    from ..core.layer import AdapterLayer

    config = QuantizeConfig.of(config)
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise LorakitError("quantize_model before add_adapter: this model has adapters, whose own layers would be "
                           "quantized too")
    bnb = _bnb()
    patterns = skip_patterns(model, config.skip_modules)
    skip = _skipped(model, config, patterns)
    _check_something_to_quantize(model, skip)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            weight = _linear_weight(child)
            if weight is None or id(child) in skip:
                continue
            out_features, in_features = weight.shape
            q = bnb.nn.Linear4bit(in_features, out_features, bias=child.bias is not None,
                                  compute_dtype=COMPUTE_DTYPES[config.compute_dtype],
                                  compress_statistics=config.double_quant, quant_type=config.quant_type, device="meta")
            q.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, compress_statistics=config.double_quant,
                                         quant_type=config.quant_type, module=q).to(weight.device)  # .to quantizes
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            q.source_cls = type(child)  # as transformers' replace_with_bnb_linear: what dequantize_model rebuilds
            setattr(parent, name, q.train(child.training))
    model.lorakit_quantize = config  # read by dequantize_model and the CLI summary
    _record_for_transformers(model, config, patterns or [])
    return keep_qlora_layout(model)


def _check_something_to_quantize(model: nn.Module, skip: set[int]) -> None:
    """LorakitError, before anything changes, when ``quantize_model`` would leave ``model`` without any 4-bit layer:
    it holds no layer transformers' loading converts (``nn.Linear``, ``Conv1D``), or the kept layers are all of
    them. Was: the model came back unchanged but marked as a 4-bit base (the CLI summary said so, and its training
    ran in full precision). A model that holds 4-bit layers already passes (nothing left to convert is fine)."""
    if any(is_4bit(m) for m in model.modules()):
        return
    candidates = [(n, m) for n, m in model.named_modules() if _linear_weight(m) is not None]
    layers = [n for n, _ in candidates]
    if not layers:
        raise LorakitError(f"quantize_model: {type(model).__name__} holds no nn.Linear or transformers Conv1D layer, "
                           "the layers a 4-bit base stores in 4 bit (as transformers' bitsandbytes loading); "
                           "there is nothing to quantize.")
    if all(id(m) in skip for _, m in candidates):
        raise LorakitError(f"quantize_model: every linear layer of {type(model).__name__} is kept in full precision "
                           f"({', '.join(layers[:5])}{', ...' if len(layers) > 5 else ''}), so no layer would be 4-bit; "
                           "give skip_modules patterns that leave some layers to quantize.")


def _record_for_transformers(model: nn.Module, config: QuantizeConfig, patterns: list[str]) -> None:
    """Set ``model.config.quantization_config`` (a transformers model) as ``from_pretrained(quantization_config=
    ...)`` does, so ``save_pretrained`` writes it and ``from_pretrained`` rebuilds these 4-bit layers from the saved
    codes (was: no quantization_config, so transformers read the packed (n/2, 1) uint8 codes as dense weights and
    refused the size mismatch). Its ``llm_int8_skip_modules`` keeps exactly the linear layers left in full
    precision when transformers reads it back with its own rule (:func:`skips_module`, to which it adds
    ``_keep_in_fp32_modules``): ``patterns`` (those :func:`quantize_model` applied), then each other layer left in
    full precision (one a model that came partly 4-bit keeps under other patterns) by its path, written as an
    anchored regular expression (``re.escape(path) + "$"``) where the plain path would also reach a 4-bit layer
    (as a suffix: ``classifier`` reaches ``pre_classifier``). Was: every kept path plain, so such a path made
    transformers load a 4-bit layer's codes into a full-precision one."""
    from transformers import PretrainedConfig

    host = getattr(model, "config", None)
    quantized = [n for n, m in model.named_modules() if is_4bit(m)]
    if not isinstance(host, PretrainedConfig) or not quantized:
        return
    kept = [n for n, m in model.named_modules() if _linear_weight(m) is not None]
    always = list(getattr(model, "_keep_in_fp32_modules", None) or ())  # transformers adds these on every load

    def exact(path: str) -> str:
        return re.escape(path) + "$" if any(skips_module(n, [path]) for n in quantized) else path

    saved = list(patterns)
    saved += [exact(n) for n in kept if not skips_module(n, saved + always)]
    if any(skips_module(n, saved + always) for n in quantized):  # a model that came partly 4-bit already
        saved = [exact(n) for n in kept]
    host.quantization_config = replace(config, skip_modules=tuple(saved)).to_transformers()


def check_saved_quantization(folder: str | os.PathLike) -> None:
    """Before transformers loads the model folder ``folder``: that its ``config.json``'s ``quantization_config``
    describes the bitsandbytes layers its safetensors files hold. Reads only the files' headers and builds the
    model on the meta device. Folders without bitsandbytes codes pass (transformers quantizes those on load).

    The 4-bit layers of a file are those with ``<path>.weight.quant_state.bitsandbytes__<type>`` keys (8-bit:
    ``<path>.weight.SCB``); transformers converts the ``nn.Linear`` / ``Conv1D`` layers its skip rule leaves
    (:func:`skip_patterns`, :func:`skips_module`). Raises LorakitError naming the first layer and both sides where
    they differ — a config edited by hand: deleted (transformers' size-mismatch RuntimeError), another
    ``quant_method`` or 8 bit for 4-bit codes (a forward raised AttributeError ``CB``), or ``llm_int8_skip_modules``
    that keep a 4-bit layer in full precision (size mismatch) or convert a full-precision one (its dense weight
    loaded into a 4-bit layer: the first forward raised a bare AssertionError in bitsandbytes)."""
    import json

    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    keys: list[str] = []
    try:
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                keys += list(handle.keys())
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, SafetensorError):
        return  # unreadable files: the load that follows reports them
    four = {k.split(".weight.quant_state.")[0]: k.rpartition("__")[2] for k in keys
            if ".weight.quant_state.bitsandbytes__" in k}
    eight = {k.removesuffix(".weight.SCB") for k in keys if k.endswith(".weight.SCB")}
    if not four and not eight:
        return
    saved = {**dict.fromkeys(four, "4-bit"), **dict.fromkeys(eight, "8-bit")}
    example = next(iter(saved))
    held = f"{folder}'s weights hold bitsandbytes {saved[example]} codes ({len(saved)} layers, e.g. {example})"
    fix = ("config.json was edited by hand or comes from another save: restore the quantization_config the model "
           "was saved with (save_pretrained writes it).")
    q = raw.get("quantization_config")
    if not isinstance(q, dict):
        raise LorakitError(f"{held} but its config.json has no quantization_config; {fix}")
    if q.get("quant_method") != "bitsandbytes":
        raise LorakitError(f"{held} but config.json's quantization_config says quant_method="
                           f"{q.get('quant_method')!r}, not 'bitsandbytes'; {fix}")
    bits = "4-bit" if q.get("load_in_4bit") else "8-bit" if q.get("load_in_8bit") else None
    if bits != saved[example] or (four and eight):
        raise LorakitError(f"{held} but config.json's quantization_config loads "
                           f"{bits or 'neither 4 nor 8 bit'} layers (load_in_4bit={q.get('load_in_4bit')!r}, "
                           f"load_in_8bit={q.get('load_in_8bit')!r}); {fix}")
    model = _meta_model(raw, folder)
    if model is None:
        return
    skip = q.get("llm_int8_skip_modules")
    patterns = skip_patterns(model, skip if isinstance(skip, list) else None) or []
    converted = {n for n, m in model.named_modules() if _linear_weight(m) is not None and not skips_module(n, patterns)}
    for path in sorted(converted ^ set(saved)):
        says = f"as {bits}" if path in converted else "in full precision"
        has = f"{saved[path]} codes" if path in saved else "a full-precision weight"
        raise LorakitError(f"{folder}: config.json's quantization_config (llm_int8_skip_modules={skip!r}) makes "
                           f"transformers load layer {path} {says}, but the weights file holds {has} for it; {fix}")


def _meta_model(raw: dict, folder: Path) -> nn.Module | None:
    """The transformers model ``config.json`` (``raw``) names, built on the meta device (no memory), or None when
    transformers has no such class (the load that follows reports it)."""
    import transformers

    architectures = raw.get("architectures") or [None]
    cls = getattr(transformers, str(architectures[0]), None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        return None
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return cls(config)
    except Exception:  # a config this transformers cannot build: the load that follows reports it
        return None


def keep_qlora_layout(model: nn.Module) -> nn.Module:
    """Turn off bitsandbytes' CPU repacking (see the module docstring) on every 4-bit layer of ``model``, in
    place, so its weights stay the NF4 codes + absmax constants QLoRA defines on every machine; returns ``model``.
    A layer already repacked is unpacked back (as bitsandbytes' own ``state_dict``/``.cuda()`` do). The layout
    kept is the one training forwards use (they never repack), the one PEFT + bitsandbytes use on other CPUs and
    on CUDA, and the one ``dequantize_weight`` reads; without it an eval forward of the bundled base (intermediate
    688, not a multiple of 32) raised bitsandbytes' "N must be divisible by block_n" on such a CPU. Also runs
    lorakit's check of bitsandbytes' CPU dequantization (module docstring), for models quantized elsewhere."""
    prepare_4bit_host(model)
    return model


def prepare_4bit_host(module: nn.Module) -> None:
    """Run lorakit's bitsandbytes CPU dequantization check (module docstring) and keep the QLoRA layout
    (:func:`keep_qlora_layout`) for every 4-bit layer in ``module`` (itself included); nothing when it holds none.
    Registered with the core (``register_host_preparer``): ``describe_layer`` runs it on each layer an adapter is
    planned, attached, initialised or served on, so a model quantized by transformers outside lorakit gets the
    fix before its first forward with a lorakit adapter (``add_adapter``, ``load_adapter``, HF Trainer, serving)."""
    if "bitsandbytes" not in sys.modules:  # no 4-bit layer can exist before bitsandbytes is imported
        return
    layers = [m for m in module.modules() if is_4bit(m)]
    if layers:
        _bnb()
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        _unpack(layer)


register_host_preparer(prepare_4bit_host)


def _unpack(module: nn.Module) -> None:
    w = module.weight
    if getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
        import bitsandbytes.functional as F

        w.data, w.quant_state = F._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        state = w.quant_state
        if state.absmax.dim() == 2:  # bitsandbytes 0.50.2 restores a non-nested absmax only when it was nested
            state.absmax = state.absmax.T.reshape(-1).to(torch.float32)  # (in/block, out) -> per-block order


def dequantize_weight(module: nn.Module) -> torch.Tensor | None:
    """The float32 (out, in) weight of a 4-bit layer (doubleDequant of QLoRA eq. 6), None for other layers. A
    layer bitsandbytes repacked for its CPU kernel is unpacked back first (in place)."""
    if not is_4bit(module):
        return None
    F = _bnb().functional
    _unpack(module)
    w = module.weight
    return F.dequantize_4bit(w.data, w.quant_state).float().reshape(module.out_features, module.in_features)


register_dequantizer(dequantize_weight)


LOFTQ_BITS = (4, 8)


def quantize_dequantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` as bitsandbytes stores and returns it: quantized, then dequantized, float32, same shape.

    ``bits=4``: NF4 in blocks of 64 with one float32 absmax per block and no double quantization (QLoRA's NF4 data
    type, arXiv:2305.14314 §3; ``Params4bit(compress_statistics=False, quant_type="nf4")``). ``bits=8``: int8 with one
    absmax per row, the input first rounded to float16 (``Int8Params``, LLM.int8(), arXiv:2208.07339). These are the
    two quantizers PEFT's LoftQ calls (peft/utils/loftq_utils.py:77-84). The blocks of 64 run over the flattened
    tensor, so a 2-D weight is quantized in the layout given (pass it as (out, in), as nn.Linear stores it).
    Raises ConfigError for other ``bits``, LorakitError without bitsandbytes."""
    if bits not in LOFTQ_BITS:
        raise ConfigError(f"bits={bits!r}: bitsandbytes quantizes to one of {LOFTQ_BITS} bits (NF4 or int8).")
    F = _bnb().functional
    w = weight.detach().float().contiguous()
    if bits == 4:
        # as one row: bitsandbytes 0.50.2's native CPU dequantize_4bit reads a 2-D weight's blocks row by row, which
        # is wrong where a block crosses a row end (in_features not a multiple of 64; _bnb() above installs the
        # fix for every other caller); one row is right either way and the codes are the same
        packed, state = F.quantize_4bit(w.reshape(-1), blocksize=64, compress_statistics=False, quant_type="nf4")
        return F.dequantize_4bit(packed, state).float().reshape(w.shape)
    codes, row_absmax, _ = F.int8_vectorwise_quant(w.to(torch.float16))  # (out, in) int8, (out,) float32
    return F.int8_vectorwise_dequant(codes, row_absmax).float().reshape(w.shape)


def _full_precision_layer(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The full-precision layer a 4-bit ``layer`` stands for, holding its dequantized weight in ``dtype``: a GPT-2
    ``Conv1D`` (weight stored (in, out), the transpose) where it was one (``source_cls``, set by
    :func:`quantize_model` and by transformers' loading), else an ``nn.Linear``."""
    weight = dequantize_weight(layer)  # (out, in) float32
    source = getattr(layer, "source_cls", None)
    if Conv1D and isinstance(source, type) and issubclass(source, Conv1D):
        full = Conv1D(layer.out_features, layer.in_features)  # Conv1D(nf=out, nx=in): weight (in, out), a bias
        weight = weight.T
    else:
        full = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    full.to(device=layer.weight.device, dtype=dtype)
    with torch.no_grad():
        full.weight.copy_(weight)
        if layer.bias is not None:
            full.bias.copy_(layer.bias)
    return full


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every 4-bit layer (also those under adapters) by the full-precision layer it stands for (an
    ``nn.Linear``, or the GPT-2 ``Conv1D`` it was quantized from) holding its dequantized weight in ``dtype``, in
    place, and drop the quantization settings from ``model.config``; returns ``model``. After this
    ``merge_and_unload`` folds adapters in and ``save_pretrained`` writes a normal full-precision model."""
    from ..core.layer import AdapterLayer

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not is_4bit(child):
                continue
            linear = _full_precision_layer(child, dtype).requires_grad_(False).train(child.training)
            if isinstance(parent, AdapterLayer) and name == "base_layer":
                parent.swap_base(linear)  # a Conv1D base stores (in, out): the adapter layer's orientation follows
            else:
                setattr(parent, name, linear)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    for attr in ("is_quantized", "is_loaded_in_4bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if hasattr(model, "lorakit_quantize"):
        del model.lorakit_quantize
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take, counting 4-bit weights at their packed size plus their
    quantization constants (what a 4-bit base really costs in memory)."""
    total = sum(b.numel() * b.element_size() for b in model.buffers())
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested and state.state2 is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total
