"""Small real transformers models built from random configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)


def tiny_llama(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_bert(seed: int = 0, dtype=torch.float32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=96, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).to(dtype).eval()


def tiny_t5(seed: int = 0, dtype=torch.float32):
    """A 2+2-layer T5 (encoder-decoder; its feed-forward reads ``wo.weight``, its ``shared`` embedding is tied)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, vocab_size=96,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).to(dtype).eval()


def tiny_unet(seed: int = 0, dtype=torch.float32):
    """A diffusers UNet2DModel on 1×8×8 images: 3×3 and 1×1 (conv_shortcut) nn.Conv2d, a stride-2 downsampler,
    attention blocks (nn.Linear). Call it with :func:`unet_inputs`."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=4, attention_head_dim=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def unet_inputs(batch: int = 3, seed: int = 123, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 1, 8, 8, generator=g).to(dtype),
            "timestep": torch.randint(0, 1000, (batch,), generator=g)}


def tiny_whisper(seed: int = 0, dtype=torch.float32):
    """A transformers WhisperForConditionalGeneration whose encoder has nn.Conv1d conv1 (k=3) and conv2 (k=3,
    stride 2) over 8 mel bins × 16 frames. Call it with :func:`whisper_inputs`."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                        max_source_positions=8, max_target_positions=32, vocab_size=96, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, init_std=0.1)
    return WhisperForConditionalGeneration(cfg).to(dtype).eval()


def whisper_inputs(ids: torch.Tensor, seed: int = 123, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(ids.shape[0], 8, 16, generator=g).to(dtype), "decoder_input_ids": ids}


def tiny_wav2vec2(seed: int = 0, dtype=torch.float32):
    """A transformers Wav2Vec2Model: its feature encoder is two bias-free nn.Conv1d (k=10 stride 5, k=3 stride 2)
    over raw audio (batch, 400); ``encoder.pos_conv_embed.conv`` is a grouped (groups=2), weight-normed Conv1d."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    cfg = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                         num_conv_pos_embedding_groups=2, vocab_size=32, feat_extract_norm="layer",
                         do_stable_layer_norm=True)
    return Wav2Vec2Model(cfg).to(dtype).eval()


def audio_inputs(batch: int = 3, seed: int = 123, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_values": torch.randn(batch, 400, generator=g).to(dtype)}


def tiny_whisper_asr(seed: int = 0, dtype=torch.float32):
    """An encoder-decoder (for recipes and S2-LoRA; :func:`tiny_whisper` is the conv test model): a 2+2-layer, width-32 WhisperForConditionalGeneration on 16 mel bins, 40 frames
    (inputs: ``input_features`` (B, 16, 40) and ``decoder_input_ids``)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=40, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=20, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1)
    return WhisperForConditionalGeneration(cfg).to(dtype).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def model_output(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def word_level_tokenizer(examples):
    """A whitespace word-level tokenizer over the words of ``examples`` (prompt + completion), with
    <pad>=0, <s>=1, </s>=2, <unk>=3: tiny vocabularies for training-loop tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for ex in examples for w in (ex.prompt + ex.completion).split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama_words():
    """A word-level tokenizer for :func:`tiny_llama` (vocabulary 96): <pad>=0, <s>=1, </s>=2, <unk>=3 and token i
    (4..95) the word ``w{i:02d}``, so a decoded text names its token ids one to one (the four special ids decode to
    nothing): texts from a tiny_llama server then differ whenever the generated tokens do."""
    from types import SimpleNamespace

    return word_level_tokenizer([SimpleNamespace(prompt=" ".join(f"w{i:02d}" for i in range(4, 96)), completion="")])


def tiny_llama_for(tokenizer, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer, hidden-32 Llama sized to ``tokenizer``'s vocabulary (pad id 0); ``overrides`` go to LlamaConfig."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides}))


def tiny_bpe_tokenizer(corpus, vocab_size: int):
    """A byte-level BPE trained here on ``corpus`` (nothing is downloaded), with <pad>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def assert_exports_to_peft(model, name, factory, ids, directory, atol=1e-5):
    """The adapter's ``to_lora`` export, written as a PEFT folder, loads in the real ``peft`` package and gives
    the lorakit model's logits (fp32). Returns the exported adapter_config as a dict."""
    import json

    from peft import PeftModel

    from lorakit.methods._plain import save_plain_lora

    model.eval()
    expected = model(input_ids=ids).logits
    save_plain_lora(model, name, directory)
    peft_model = PeftModel.from_pretrained(factory(), directory).eval()
    got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    return json.loads((directory / "adapter_config.json").read_text())


def assert_trains_only(model, ids, suffixes):
    """Only adapter parameters ending in one of ``suffixes`` require and receive gradients (frozen_names)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(tuple(suffixes)) for n in trainable), sorted(trainable)[:4]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == trainable
    return trainable


def train_with_hooks(model, ids, steps, lr=1e-2, name="default"):
    """``steps`` AdamW steps on ``ids`` as the training loop runs them: the method's param_groups, extra_loss
    (added to the task loss) and on_step after each optimizer step."""
    import lorakit as lk
    from lorakit.core.model import adapter_state
    from lorakit.training.config import TrainConfig
    from lorakit.training.loop import make_optimizer

    method = lk.get_method(adapter_state(model).configs[name])
    optimizer, _ = make_optimizer(model, name, TrainConfig(lr=lr))
    model.train()
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        if method.extra_loss is not None:
            loss = loss + method.extra_loss(model, name)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if method.on_step is not None:
            method.on_step(model, name, step, steps)


def save_random_adapter(directory, config, seed: int, name: str = "m"):
    """A tiny_llama adapter of ``config`` with random (non-zero) weights, saved to ``directory``; returns it."""
    import lorakit as lk
    from lorakit.core.model import adapter_parameters

    model = tiny_llama()
    lk.add_adapter(model, config, name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    lk.save_adapter(model, directory, name)
    return directory


def meta_llama():
    """tiny_llama's structure on the meta device: no weights (``low_cpu_mem_usage`` / ``init_empty_weights``)."""
    with torch.device("meta"):
        return tiny_llama()


def materialised_llama():
    """A meta_llama given real storage and tiny_llama()'s weights, as a user loads a meta-built model (to_empty,
    then load_state_dict); the buffers a state dict leaves out (rotary inv_freq) are copied too."""
    model = meta_llama()
    model.to_empty(device="cpu")
    reference = tiny_llama()
    model.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for (_, mine), (_, theirs) in zip(model.named_buffers(), reference.named_buffers()):
            mine.copy_(theirs)
    return model.eval()


def save_llama_lora(directory, ids: torch.Tensor) -> torch.Tensor:
    """Save a random (non-zero) r=4 LoRA on tiny_llama's q_proj / v_proj to ``directory``; its logits on ``ids``."""
    import lorakit as lk

    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False))
    lk.save_adapter(model, directory)
    with torch.no_grad():
        return model(ids).logits
