"""Which linear layers a 4-bit base keeps in full precision: ``quantize_model`` against transformers' own
``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` on the same model, and a saved 4-bit
folder read back by plain transformers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,  # noqa: E402
                          BitsAndBytesConfig, DistilBertConfig, DistilBertForSequenceClassification, GPT2Config,
                          GPT2ForSequenceClassification, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification)

from transformers.pytorch_utils import Conv1D  # noqa: E402

from lorakit.core.errors import ConfigError, LorakitError  # noqa: E402
from lorakit.quantize import QuantizeConfig, is_4bit, quantize_model  # noqa: E402

from lk_models import tiny_gpt2, tiny_t5  # noqa: E402


def _llama_config(**extra) -> LlamaConfig:
    settings = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return LlamaConfig(**{**settings, **extra})


def _build(kind: str):
    """(model with random weights, the Auto class transformers reads its saved folder with)."""
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(_llama_config()), AutoModelForCausalLM
    if kind == "llama-tied":  # lm_head tied to the input embedding: both are in transformers' default skips
        return LlamaForCausalLM(_llama_config(tie_word_embeddings=True)), AutoModelForCausalLM
    if kind == "llama-12":  # "layers.1" patterns could reach layers 10 and 11
        return LlamaForCausalLM(_llama_config(num_hidden_layers=12)), AutoModelForCausalLM
    if kind == "llama-seq-cls":  # a `score` head: the model's last module, not its output embedding
        return (LlamaForSequenceClassification(_llama_config(num_labels=3, pad_token_id=0)),
                AutoModelForSequenceClassification)
    if kind == "t5":  # _keep_in_fp32_modules = ["wo"] (transformers/models/t5/modeling_t5.py), tied embeddings
        return tiny_t5(), AutoModelForSeq2SeqLM
    if kind == "distilbert-seq-cls":  # its last module `classifier` is also a suffix of `pre_classifier`
        return (DistilBertForSequenceClassification(DistilBertConfig(
            dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=96, max_position_embeddings=64, num_labels=3)),
            AutoModelForSequenceClassification)
    if kind == "gpt2":  # Conv1D layers (weight stored (in, out)), lm_head tied to the input embedding
        return tiny_gpt2(), AutoModelForCausalLM
    if kind == "gpt2-seq-cls":  # Conv1D blocks and an nn.Linear `score` head
        return (GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64,
                                                         num_labels=3, pad_token_id=0)),
                AutoModelForSequenceClassification)
    raise AssertionError(kind)


def _full_precision(model) -> set[str]:
    """Paths of the layers transformers' bitsandbytes loading would convert but that stay full precision:
    ``nn.Linear`` and GPT-2 ``Conv1D`` (transformers/integrations/bitsandbytes.py line 189)."""
    return {n for n, m in model.named_modules() if type(m) is torch.nn.Linear or isinstance(m, Conv1D)}


def _four_bit(model) -> set[str]:
    return {n for n, m in model.named_modules() if is_4bit(m)}


@pytest.mark.parametrize("kind, skip", [
    ("llama", None),
    ("llama-tied", None),
    ("llama-seq-cls", None),  # was: `score` quantized (lorakit kept only the output embedding)
    ("t5", None),  # was: `wo` quantized (its _keep_in_fp32_modules ignored)
    ("t5", ("lm_head",)),  # transformers adds _keep_in_fp32_modules to the patterns given too
    ("distilbert-seq-cls", None),  # its last parameter is classifier.bias: a key that names no module, so
                                   # transformers keeps nothing, classifier included
    ("gpt2", None),  # was: every Conv1D kept in full precision (transformers quantizes them)
    ("gpt2", ("lm_head", "attn.c_proj")),  # a skipped Conv1D stays a Conv1D
    ("gpt2-seq-cls", None),
])
def test_kept_layers_equal_transformers_loading(tmp_path, kind, skip):
    """The linear layers ``quantize_model`` keeps in full precision are those transformers' bitsandbytes loading keeps
    for the same model and settings: by default ``get_keys_to_not_convert`` (tied-weight modules, the module of the
    last parameter, the output embedding: transformers/quantizers/base.py), plus ``_keep_in_fp32_modules`` always
    (``get_modules_to_not_convert`` in the same file, called by quantizers/quantizer_bnb_4bit.py)."""
    model, _ = _build(kind)
    model.save_pretrained(tmp_path)
    bnb = (BitsAndBytesConfig(load_in_4bit=True) if skip is None
           else BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=list(skip)))
    theirs = type(model).from_pretrained(tmp_path, quantization_config=bnb, device_map="cpu")
    ours = quantize_model(type(model).from_pretrained(tmp_path), QuantizeConfig(skip_modules=skip))
    assert _full_precision(ours) == _full_precision(theirs)
    assert _four_bit(ours) == _four_bit(theirs) and _four_bit(ours)


@pytest.mark.parametrize("kind, skip", [
    ("llama-12", None),
    ("llama-12", ("model.layers.1",)),  # layer 1's linears, saved as names that must not reach layers 10 and 11
    ("llama-12", ("lm_head", "layers.1.mlp.up_proj")),
    ("llama-12", (r"model.layers.1\d.mlp",)),  # a regex: layers 10 and 11 only
    ("llama-seq-cls", None),
    ("t5", None),  # was: the folder did not load (transformers kept `wo` in full precision, found 4-bit codes)
    ("distilbert-seq-cls", ("classifier$",)),  # was: saved as `classifier`, which transformers also reads as a
    ("distilbert-seq-cls", None),               # suffix of `pre_classifier`, a layer lorakit had quantized
    ("gpt2", None),  # Conv1D codes saved from the transposed weight, as transformers saves them
    ("gpt2", ("lm_head", "attn.c_proj")),
    ("gpt2-seq-cls", None),
])
def test_a_saved_folder_loads_back_with_the_same_layers_quantized(tmp_path, kind, skip):
    """``save_pretrained`` after ``quantize_model`` writes an ``llm_int8_skip_modules`` that plain transformers
    (``from_pretrained`` with no quantization argument) reads back into exactly the layers lorakit quantized, with the
    same codes and the same outputs."""
    model, auto = _build(kind)
    quantize_model(model, QuantizeConfig(skip_modules=skip))
    model.save_pretrained(tmp_path)
    loaded = auto.from_pretrained(tmp_path, device_map="cpu")
    assert _four_bit(loaded) == _four_bit(model) and _four_bit(model)
    assert _full_precision(loaded) == _full_precision(model)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("skip, named", [
    (("lm_head", 3), "3"),
    (("lm_head", None), "None"),
    ("lm_head", "'lm_head'"),  # one string, not a list of them: its letters would be the patterns
    (("lm_head", "layers.(1"), "'layers.(1'"),  # not a regular expression: transformers' loading would raise
])
def test_skip_modules_must_be_strings(skip, named):
    with pytest.raises(ConfigError) as error:
        QuantizeConfig(skip_modules=skip)
    assert "skip_modules" in str(error.value) and named in str(error.value)


def test_skip_modules_may_be_a_list():
    """A list (as in a JSON or YAML config) is taken as the tuple it stands for, so the config stays hashable."""
    assert QuantizeConfig(skip_modules=["lm_head"]).skip_modules == ("lm_head",)


def test_a_model_that_came_partly_4bit_saves_each_kept_layer_exactly(tmp_path):
    """``quantize_model`` on a model transformers loaded in 4 bit already (here with ``pre_classifier`` quantized and
    ``classifier`` kept): the pattern ``classifier`` would also reach the 4-bit ``pre_classifier`` on load (as a
    suffix), so the kept layer is saved as an anchored regular expression of its path."""
    model, auto = _build("distilbert-seq-cls")
    model.save_pretrained(tmp_path / "dense")
    bnb = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["classifier$"])
    model = DistilBertForSequenceClassification.from_pretrained(tmp_path / "dense", quantization_config=bnb,
                                                               device_map="cpu")
    quantize_model(model, QuantizeConfig(skip_modules=("classifier",)))
    assert _full_precision(model) == {"classifier"}
    model.save_pretrained(tmp_path / "q4")
    loaded = auto.from_pretrained(tmp_path / "q4", device_map="cpu")
    assert loaded.config.quantization_config.llm_int8_skip_modules == ["classifier$"]
    assert _four_bit(loaded) == _four_bit(model) and _full_precision(loaded) == {"classifier"}


def test_a_model_with_nothing_to_quantize_is_refused_unchanged():
    """Was: ``quantize_model`` returned such a model unchanged but marked as a 4-bit base (``lorakit_quantize``),
    so it trained in full precision under a 4-bit label. transformers' own loading warns that no linear modules
    were found (transformers/integrations/bitsandbytes.py ``replace_with_bnb_linear``)."""
    convs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(LorakitError, match="holds no nn.Linear or transformers Conv1D layer"):
        quantize_model(convs, "nf4")
    assert not hasattr(convs, "lorakit_quantize")
    model, _ = _build("llama")
    with pytest.raises(LorakitError, match="every linear layer of LlamaForCausalLM is kept in full precision"):
        quantize_model(model, QuantizeConfig(skip_modules=("model", "lm_head")))
    assert not _four_bit(model) and not hasattr(model, "lorakit_quantize")
    assert getattr(model.config, "quantization_config", None) is None
