"""examples/small_data_speech: a tiny Whisper adapted to a shifted condition by full fine-tuning, LoRA and S2-LoRA
(lorakit on an encoder-decoder), its WER/CER against jiwer, and (when espeak-ng is installed) the synthesized
adult / child-like audio."""

from __future__ import annotations

import importlib.util
import random
import re
import shutil
import sys
import sysconfig
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("speech_s2lora",
                                                  ROOT / "examples" / "small_data_speech" / "speech_s2lora.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


speech = _load()


def test_error_rates_equal_jiwer():
    rng = random.Random(0)
    words = ["return", "the", "value", "of", "a", "path", "list"]
    refs = [" ".join(rng.choices(words, k=rng.randint(1, 5))) for _ in range(20)]
    hyps = [" ".join(rng.choices(words, k=rng.randint(0, 5))) for _ in range(20)]
    hyps[0] = refs[0]
    assert speech.error_rate(refs, hyps, "word") == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert speech.error_rate(refs, hyps, "char") == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)
    assert speech.error_rate(refs, refs, "char") == 0.0


def test_char_tokenizer_round_trip():
    tok = speech.CharTokenizer()
    ids = tok.encode("get the path's name")
    assert ids[0] == speech.BOS and ids[-1] == speech.EOS and max(ids) < tok.vocab_size
    assert tok.decode(ids[1:]) == "get the path's name"


def test_phrases_are_stdlib_docstring_text():
    phrases = speech.stdlib_phrases()
    assert len(phrases) > 1000 and len(set(phrases)) == len(phrases)
    assert all(2 <= len(p.split()) <= 3 and set(p) <= set(speech.ALPHABET) for p in phrases)
    root = Path(sysconfig.get_paths()["stdlib"])
    source = " ".join((root / "textwrap.py").read_text().lower().split())
    assert any(p in source for p in phrases)  # verbatim runs of words of the sources' docstrings


def _tones(texts, seconds=1.0, sr=16_000):
    """A synthetic stand-in for speech: each word a tone whose frequency depends on the word, in sequence."""
    out = []
    for text in texts:
        words = text.split()
        n = int(sr * seconds / len(words))
        t = np.arange(n) / sr
        out.append(np.concatenate([0.3 * np.sin(2 * np.pi * (200 + 40 * (sum(map(ord, w)) % 50)) * t)
                                   for w in words]).astype(np.float32))
    return out


def test_tiny_whisper_adapts_with_full_lora_and_s2lora():
    texts = ["get item", "set value", "read the file"]
    feats = speech.log_mel(_tones(texts), n_mels=16)
    assert feats.shape == (3, 16, 100 * speech.SECONDS)
    model = speech.build_whisper(n_mels=16, d_model=32, layers=1, heads=2, ffn=64, max_chars=16)
    losses = speech.fit(model, feats, texts, steps=40, lr=3e-3, batch_size=3)
    assert losses[-1] < 0.5 * losses[0]
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(input_features=feats, decoder_input_ids=speech.label_batch(speech.CharTokenizer(), texts)[0]).logits

    counts = {}
    for method in speech.methods(r=2):
        adapted, counts[method.name] = speech.adapt(model, method, feats, texts, steps=4)
        with torch.no_grad():
            got = adapted(input_features=feats, decoder_input_ids=speech.label_batch(speech.CharTokenizer(), texts)[0]).logits
        assert (got - reference).abs().max() > 1e-4, method.name  # adaptation changed the model
        result = speech.evaluate(adapted, feats, texts)
        assert set(result) == {"wer", "cer"} and all(v >= 0 for v in result.values())
        if method.config is not None:  # adapters leave the pretrained weights as they were
            base_weights = {k.replace(".base_layer", ""): v for k, v in adapted.state_dict().items()
                            if "adapters." not in k}
            assert all(torch.equal(base_weights[k], v) for k, v in before.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # adapt() works on a copy
    assert counts["S2-LoRA"] < counts["LoRA"] < counts["full fine-tuning"] == sum(p.numel() for p in model.parameters())


def test_transcribe_stops_at_eos_and_decodes_characters():
    model = speech.build_whisper(n_mels=16, d_model=32, layers=1, heads=2, ffn=64, max_chars=8)
    with torch.no_grad():
        model.proj_out.weight.zero_()
    out = speech.transcribe(model, torch.zeros(2, 16, 100 * speech.SECONDS), max_chars=8)
    # all-zero logits: argmax is id 0 (PAD), which decodes to nothing; the loop stops at max_chars
    assert out == ["", ""]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)")
def test_espeak_child_condition_raises_every_frequency():
    adult = speech.Speaker("en-us+m3", pitch=50, speed=160)
    shifted = speech.Speaker("en-us+m3", pitch=50, speed=160, formant=1.2)
    a, b = speech.espeak("return the value", adult), speech.espeak("return the value", shifted)
    assert a.dtype == np.float32 and 0.5 < len(a) / speech.SAMPLE_RATE < 3.0 and np.abs(a).max() > 0.05
    assert np.abs(a).max() <= 1.0
    assert len(a) / len(b) == pytest.approx(1.2, rel=0.01)  # resampled by 1.2: 1.2x shorter, frequencies 1.2x higher
    # the dominant frequency moves up by the same factor
    spectrum = lambda x: np.abs(np.fft.rfft(x * np.hanning(len(x))))  # noqa: E731
    fa = np.argmax(spectrum(a)) * speech.SAMPLE_RATE / len(a)
    fb = np.argmax(spectrum(b)) * speech.SAMPLE_RATE / len(b)
    assert fb / fa == pytest.approx(1.2, rel=0.1)
    assert re.fullmatch(r"en-(us|gb)\+\w+", speech.child_speaker(random.Random(0)).voice)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)")
def test_recipe_quick_run(tmp_path):
    results = speech.main(["--quick", "--out", str(tmp_path)])
    assert [r["method"] for r in results["rows"]][1:] == ["full fine-tuning", "LoRA", "S2-LoRA"]
    assert (tmp_path / "speech_s2lora.md").read_text().count("\n") >= 6
