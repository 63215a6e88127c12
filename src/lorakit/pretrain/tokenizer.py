"""Byte-level BPE tokenizer for the bundled base model, trained with the `tokenizers` library.

Digits are split one per token before BPE so numbers tokenize the same way wherever they appear, which
the arithmetic tasks need (a merged "12" and a split "1","2" would be unrelated symbols to the model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK]

# Turns are separated by newlines so the text after "### Assistant:\n" starts a fresh pre-token, exactly as
# it does when the same content is tokenized on its own. The eos after assistant content is what a
# fine-tuned model learns to emit to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ raise_exception('Unknown chat role: ' + message['role'] + '; use system, user or assistant.') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
                    model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; encoding adds ``<s>`` in front, as Llama tokenizers do."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no <unk> at run time
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)],
    )
    return wrap_tokenizer(tok, model_max_length)


def wrap_tokenizer(tok: Tokenizer, model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around ``tok`` with bos/eos/pad/unk and the chat template set."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="left",  # batched greedy generation appends on the right
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    """``save_pretrained``, with ``tokenizer_config.json`` also readable by transformers 4.x.

    transformers 5 records its own class name and keeps the chat template in a separate file; 4.x knows
    neither, so the config names ``PreTrainedTokenizerFast`` (an alias in 5.x) and carries the template inline.
    """
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = tokenizer.chat_template
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
