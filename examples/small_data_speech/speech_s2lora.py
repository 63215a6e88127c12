"""Small-data speech adaptation: S2-LoRA vs LoRA vs full fine-tuning on a tiny Whisper (child-like voices).

The S2-LoRA paper (Liu et al. 2023, arXiv:2309.11756) adapts Whisper to child speech with little data. This
recipe rebuilds that setting at toy scale, fully offline:

1. Audio: the espeak-ng synthesizer (Debian package ``espeak-ng``; ``apt-get install espeak-ng``) speaks short
   phrases of 2-3 words cut from the docstrings of the Python standard library installed here (real English
   text). "Adult" speakers: 11 espeak voice variants, pitch 25-60, 140-175 words per minute. "Child-like"
   speakers: 3 other variants, pitch 85-99, 185-215 wpm, and every formant raised 20% (the audio is resampled
   by 1.2, as a shorter vocal tract raises formants) — a shifted acoustic condition the adult model never hears.
2. Model: a ``transformers`` ``WhisperForConditionalGeneration`` built from a config (2 encoder + 2 decoder
   layers of width 64, 0.26M parameters, characters as tokens, 2-second 40-bin log-mel inputs from ``WhisperFeatureExtractor``),
   pretrained from scratch on the adult speech.
3. Adaptation with n child utterances (n = 16, 64 by default), each method from the same pretrained weights:
   full fine-tuning, LoRA (r=8 on every linear layer) and S2-LoRA (one shared A, B per weight shape, a rank
   coefficient vector per layer, L1 penalty; ``lorakit.methods.s2lora``), all with lorakit on the same model.
4. Metric: character and word error rate (Levenshtein edit distance / reference length, as jiwer computes it) on
   held-out child phrases, and on held-out adult phrases (what adaptation costs the source domain).

Honest about scale: this is synthetic speech from a rule-based synthesizer and a 0.26M-parameter model trained for
minutes on CPU, not children's recordings and Whisper's 39M-1.5B checkpoints; it shows the recipe and the
direction of the effect at this scale, not the paper's numbers.

Usage (from this folder; about 15 minutes on one CPU core at the defaults; the audio and the pretrained model are
cached in the output folder, so a second run only adapts):

    python speech_s2lora.py                  # writes results/speech_s2lora.{json,md}
    python speech_s2lora.py --quick          # a short smoke run
"""

from __future__ import annotations

import ast
import copy
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

import lorakit as lk
from lorakit.io.files import atomic_write_bytes, atomic_write_json, load_tensors, read_json, save_tensors
from lorakit.core.model import adapter_state
from lorakit.core.registry import get_method
from lorakit.data.tasks import STDLIB_MODULES
from lorakit.methods.s2lora import S2LoraConfig, rank_distribution

SAMPLE_RATE = 16_000
SECONDS = 2  # the encoder sees 2 s: 200 log-mel frames, 100 positions after Whisper's stride-2 convolution
ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"
PAD, BOS, EOS = 0, 1, 2  # token ids; characters follow


class CharTokenizer:
    """Characters of ``ALPHABET`` as tokens, after PAD, BOS (Whisper's decoder start) and EOS."""

    vocab_size = 3 + len(ALPHABET)

    def encode(self, text: str) -> list[int]:
        return [BOS] + [3 + ALPHABET.index(c) for c in text] + [EOS]

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= 3:
                out.append(ALPHABET[i - 3])
        return "".join(out)


# ---------------------------------------------------------------- text and audio


def stdlib_phrases(min_words: int = 2, max_words: int = 3) -> list[str]:
    """Every distinct run of ``min_words``..``max_words`` consecutive plain words in the first sentence of the
    docstrings (modules, classes, functions) of ``STDLIB_MODULES``, lower-cased, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: dict[str, None] = {}
    for module in STDLIB_MODULES:
        path = root.joinpath(*module.split(".")).with_suffix(".py")
        if not path.is_file():
            path = root.joinpath(*module.split("."), "__init__.py")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node) or ""
            sentence = re.split(r"[.:;\n]\s", doc.strip() + " ", maxsplit=1)[0].lower()
            words = sentence.split()
            if not words or not all(re.fullmatch(r"[a-z]+", w) for w in words):
                continue
            size = min(len(words), max_words)
            for start in range(0, len(words) - min_words + 1, size):
                chunk = words[start:start + size]
                if len(chunk) >= min_words:
                    seen[" ".join(chunk)] = None
    return list(seen)


@dataclass(frozen=True)
class Speaker:
    """One espeak-ng voice setting: ``voice`` (language+variant), ``pitch`` 0-99, ``speed`` in words per minute,
    ``formant`` the factor every frequency is raised by (resampling; 1.0: none)."""

    voice: str
    pitch: int
    speed: int
    formant: float = 1.0


ADULT_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4", "klatt")
CHILD_VARIANTS = ("f5", "m7", "klatt2")


def adult_speaker(rng: random.Random) -> Speaker:
    return Speaker(f"{rng.choice(('en-us', 'en-gb'))}+{rng.choice(ADULT_VARIANTS)}", rng.randint(25, 60),
                   rng.randint(140, 175))


def child_speaker(rng: random.Random) -> Speaker:
    return Speaker(f"{rng.choice(('en-us', 'en-gb'))}+{rng.choice(CHILD_VARIANTS)}", rng.randint(85, 99),
                   rng.randint(185, 215), formant=1.2)


def espeak(text: str, speaker: Speaker) -> np.ndarray:
    """``text`` spoken by ``speaker``: float32 samples at 16 kHz. Raises RuntimeError when espeak-ng is missing."""
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    wav = subprocess.run([exe, "-v", speaker.voice, "-p", str(speaker.pitch), "-s", str(speaker.speed), "--stdout",
                          text], check=True, capture_output=True).stdout
    # a RIFF header (44 bytes: espeak writes no extra chunks) then 16-bit mono PCM at 22050 Hz
    samples = np.frombuffer(wav[44:], dtype="<i2").astype(np.float32) / 32768.0
    # played back faster by `formant`: every frequency (pitch and formants) times `formant`, duration divided by it
    ratio = Fraction(SAMPLE_RATE, round(22050 * speaker.formant)).limit_denominator(1000)
    return resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)


def synthesize(texts: list[str], speakers: list[Speaker], cache: Path | None = None, workers: int = 4
               ) -> list[np.ndarray]:
    """espeak every (text, speaker) pair, in parallel processes; cached in ``cache`` (.npz) when given."""
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            if len(stored.files) == len(texts):
                return [stored[f"a{i}"] for i in range(len(texts))]
    with ThreadPoolExecutor(workers) as pool:
        audio = list(pool.map(espeak, texts, speakers))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache.with_suffix(".tmp.npz"), **{f"a{i}": a for i, a in enumerate(audio)})
        cache.with_suffix(".tmp.npz").replace(cache)
    return audio


def log_mel(audio: list[np.ndarray], n_mels: int = 40) -> torch.Tensor:
    """Whisper's log-mel features of ``SECONDS``-long windows (padded / cut): (N, n_mels, 100 * SECONDS)."""
    extractor = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=SAMPLE_RATE, chunk_length=SECONDS)
    feats = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    return torch.from_numpy(np.asarray(feats, dtype=np.float32))


# ---------------------------------------------------------------- model, training, decoding


def build_whisper(n_mels: int = 40, d_model: int = 64, layers: int = 2, heads: int = 2, ffn: int = 256,
                  max_chars: int = 40, seed: int = 0) -> WhisperForConditionalGeneration:
    """A Whisper encoder-decoder from a config: ``layers`` encoder and ``layers`` decoder blocks, character vocab."""
    config = WhisperConfig(vocab_size=CharTokenizer.vocab_size, num_mel_bins=n_mels, d_model=d_model,
                           encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                           decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                           max_source_positions=50 * SECONDS, max_target_positions=max_chars + 2,
                           pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=BOS,
                           dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(seed)
    return WhisperForConditionalGeneration(config)


def label_batch(tokenizer: CharTokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder_input_ids, labels): BOS-led inputs, labels shifted by one with -100 on padding."""
    ids = [tokenizer.encode(t) for t in texts]
    width = max(map(len, ids)) - 1
    inputs = torch.full((len(ids), width), PAD)
    labels = torch.full((len(ids), width), -100)
    for row, seq in enumerate(ids):
        inputs[row, :len(seq) - 1] = torch.tensor(seq[:-1])
        labels[row, :len(seq) - 1] = torch.tensor(seq[1:])
    return inputs, labels


def fit(model: torch.nn.Module, feats: torch.Tensor, texts: list[str], *, steps: int, lr: float,
        batch_size: int = 16, seed: int = 0, adapter: str | None = None, log_every: int = 0) -> list[float]:
    """AdamW on the trainable parameters, linear warmup (10%) and decay; with ``adapter``, that lorakit adapter's
    method ``extra_loss`` (S2-LoRA's L1 on λ) is added to the cross-entropy. Returns the loss per step."""
    tokenizer, rng = CharTokenizer(), random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    extra = get_method(adapter_state(model).configs[adapter]).extra_loss if adapter is not None else None
    torch.manual_seed(seed)
    model.train()
    losses, order = [], []
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(texts)), len(texts))
        rows, order = order[:batch_size], order[batch_size:]
        inputs, labels = label_batch(tokenizer, [texts[i] for i in rows])
        loss = model(input_features=feats[rows], decoder_input_ids=inputs, labels=labels).loss
        if extra is not None:
            loss = loss + extra(model, adapter)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def transcribe(model: WhisperForConditionalGeneration, feats: torch.Tensor, max_chars: int = 40,
               batch_size: int = 64) -> list[str]:
    """Greedy decoding, the encoder run once per batch; stops at EOS or ``max_chars``."""
    tokenizer, texts = CharTokenizer(), []
    model.eval()
    for start in range(0, len(feats), batch_size):
        encoded = model.model.encoder(feats[start:start + batch_size])
        ids = torch.full((len(encoded.last_hidden_state), 1), BOS)
        done = torch.zeros(len(ids), dtype=torch.bool)
        for _ in range(max_chars + 1):
            logits = model(encoder_outputs=encoded, decoder_input_ids=ids).logits[:, -1]  # (B, vocab)
            nxt = logits.argmax(-1).masked_fill(done, EOS)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == EOS
            if done.all():
                break
        texts += [tokenizer.decode(row[1:].tolist()) for row in ids]
    return texts


def edit_distance(reference: list, hypothesis: list) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1), two-row dynamic programme."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def error_rate(references: list[str], hypotheses: list[str], unit: str = "word") -> float:
    """Corpus WER (``unit="word"``) or CER (``"char"``): total edits / total reference length, as jiwer."""
    split = str.split if unit == "word" else list
    edits = sum(edit_distance(split(r), split(h)) for r, h in zip(references, hypotheses))
    return edits / max(1, sum(len(split(r)) for r in references))


# ---------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One way to adapt: ``config`` a lorakit adapter config (None: full fine-tuning) and its learning rate."""

    name: str
    lr: float
    config: object | None = None


def methods(r: int = 8) -> list[Method]:
    return [Method("full fine-tuning", 3e-4),
            Method("LoRA", 3e-3, lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")),
            # λ starts at 0 and A, B at N(0, 0.02²), so its first gradients are tiny: a larger step (fixed a priori)
            Method("S2-LoRA", 1e-2, S2LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                 l1_lambda=1e-4))]


def adapt(pretrained: WhisperForConditionalGeneration, method: Method, feats, texts, steps: int, seed: int = 0):
    """A copy of ``pretrained`` adapted with ``method``: (model, trainable parameter count)."""
    model = copy.deepcopy(pretrained)
    if method.config is None:
        model.requires_grad_(True)
        adapter = None
    else:
        lk.add_adapter(model, method.config)
        adapter = "default"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fit(model, feats, texts, steps=steps, lr=method.lr, batch_size=min(16, len(texts)), seed=seed, adapter=adapter)
    return model, trainable


def evaluate(model, feats, texts) -> dict[str, float]:
    hyps = transcribe(model, feats)
    return {"wer": error_rate(texts, hyps, "word"), "cer": error_rate(texts, hyps, "char")}


# ---------------------------------------------------------------- the recipe


def markdown(results: dict) -> str:
    lines = [f"pretraining: {results['n_adult_train']} adult utterances, {results['pretrain_steps']} steps "
             f"({results['pretrain_seconds']:.0f} s); test: {results['n_child_test']} child-like and "
             f"{results['n_adult_test']} adult utterances of unseen phrases; model {results['n_params']:,} parameters",
             "", "| child examples n | method | trainable params | child WER | child CER | adult WER | adult CER |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        lines.append(f"| {row['n']} | {row['method']} | {row['trainable']:,} | {row['child']['wer']:.3f} | "
                     f"{row['child']['cer']:.3f} | {row['adult']['wer']:.3f} | {row['adult']['cer']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from lorakit.cli_parser import CommandParser, DefaultsFormatter, positive_int, seed_arg

    p = CommandParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    p.add_argument("--adult-train", type=positive_int, default=800, help="adult utterances for pretraining")
    p.add_argument("--pretrain-steps", type=positive_int, default=600,
                   help="optimizer steps of the adult-voice pretraining")
    p.add_argument("--sizes", type=positive_int, nargs="+", default=[16, 64], help="child utterances to adapt on")
    p.add_argument("--adapt-steps", type=positive_int, default=100, help="optimizer steps of each adaptation run")
    p.add_argument("--test", type=positive_int, default=100, help="held-out utterances per condition")
    p.add_argument("--r", type=positive_int, default=8, help="LoRA / S2-LoRA rank")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the data and training")
    p.add_argument("--out", default="results", help="folder for speech_s2lora.{json,md} and the caches")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.adult_train, args.pretrain_steps, args.sizes, args.adapt_steps, args.test = 48, 20, [8], 5, 8
    out = Path(args.out)
    tag = f"{args.adult_train}_{args.test}_{max(args.sizes)}_{args.seed}"

    phrases = stdlib_phrases()
    rng = random.Random(args.seed)
    rng.shuffle(phrases)
    n_test, n_child = args.test, max(args.sizes)
    needed = args.adult_train + 2 * n_test + n_child
    if len(phrases) < needed:
        raise SystemExit(f"only {len(phrases)} phrases in the stdlib docstrings here; lower --adult-train/--test")
    # disjoint phrases: adult train | adult test | child train | child test
    adult_train = phrases[:args.adult_train]
    adult_test = phrases[args.adult_train:args.adult_train + n_test]
    child_train = phrases[args.adult_train + n_test:args.adult_train + n_test + n_child]
    child_test = phrases[args.adult_train + n_test + n_child:needed]
    speakers = {"adult_train": [adult_speaker(rng) for _ in adult_train],
                "adult_test": [adult_speaker(rng) for _ in adult_test],
                "child_train": [child_speaker(rng) for _ in child_train],
                "child_test": [child_speaker(rng) for _ in child_test]}
    texts = {"adult_train": adult_train, "adult_test": adult_test, "child_train": child_train,
             "child_test": child_test}
    start = time.perf_counter()
    feats = {name: log_mel(synthesize(texts[name], speakers[name], out / "cache" / f"{name}_{tag}.npz"))
             for name in texts}
    print(f"{len(phrases)} stdlib phrases; synthesized {sum(len(t) for t in texts.values())} utterances with "
          f"espeak-ng in {time.perf_counter() - start:.0f} s", flush=True)

    model = build_whisper(seed=args.seed)
    # safetensors only (no pickle), written last and atomically: it exists only beside its finished .json
    checkpoint = out / "cache" / f"pretrained_{tag}_{args.pretrain_steps}.safetensors"
    start = time.perf_counter()
    if checkpoint.is_file():
        model.load_state_dict(load_tensors(checkpoint))
        pretrain_seconds = read_json(checkpoint.with_suffix(".json"))["seconds"]
        print(f"loaded the pretrained model from {checkpoint}")
    else:
        print(f"pretraining on {len(adult_train)} adult utterances for {args.pretrain_steps} steps", flush=True)
        fit(model, feats["adult_train"], adult_train, steps=args.pretrain_steps, lr=2e-3, batch_size=16,
            seed=args.seed, log_every=max(1, args.pretrain_steps // 10))
        pretrain_seconds = time.perf_counter() - start
        atomic_write_json(checkpoint.with_suffix(".json"), {"seconds": pretrain_seconds})
        save_tensors(checkpoint, {k: v.clone() for k, v in model.state_dict().items()})  # clone: tied weights
    model.requires_grad_(False)

    results = {"n_adult_train": len(adult_train), "n_adult_test": n_test, "n_child_test": n_test,
               "pretrain_steps": args.pretrain_steps, "pretrain_seconds": pretrain_seconds,
               "n_params": sum(p.numel() for p in model.parameters()),
               "config": {k: v for k, v in vars(args).items() if k != "quick"}, "rows": []}
    base = {"child": evaluate(model, feats["child_test"], child_test),
            "adult": evaluate(model, feats["adult_test"], adult_test)}
    results["rows"].append({"n": 0, "method": "none (adult model)", "trainable": 0, **base})
    print(f"adult model: child WER {base['child']['wer']:.3f} CER {base['child']['cer']:.3f} | adult WER "
          f"{base['adult']['wer']:.3f} CER {base['adult']['cer']:.3f}", flush=True)
    for n in args.sizes:
        for method in methods(args.r):
            start = time.perf_counter()
            adapted, trainable = adapt(model, method, feats["child_train"][:n], child_train[:n], args.adapt_steps,
                                       args.seed)
            row = {"n": n, "method": method.name, "trainable": trainable,
                   "child": evaluate(adapted, feats["child_test"], child_test),
                   "adult": evaluate(adapted, feats["adult_test"], adult_test),
                   "seconds": round(time.perf_counter() - start, 1)}
            if isinstance(method.config, S2LoraConfig):
                ranks = rank_distribution(adapted, "default", threshold=0.1)
                row["s2lora_mean_rank"] = sum(ranks.values()) / len(ranks)
            results["rows"].append(row)
            print(f"n={n:3d} {method.name:17s} trainable {trainable:>9,}: child WER {row['child']['wer']:.3f} CER "
                  f"{row['child']['cer']:.3f} | adult WER {row['adult']['wer']:.3f} CER {row['adult']['cer']:.3f}"
                  f"  ({row['seconds']:.0f} s)", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "speech_s2lora.json", results)
    atomic_write_bytes(out / "speech_s2lora.md", markdown(results).encode())
    print(markdown(results))
    print(f"wrote {out}/speech_s2lora.{{json,md}}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
