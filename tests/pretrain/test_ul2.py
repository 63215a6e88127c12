"""UL2 mixture of denoisers (arXiv 2205.05131) as lorakit's ``ul2`` pretraining objective.

Reference values come from the official t5 preprocessors (google-research/text-to-text-transfer-transformer
``t5/data/preprocessors.py``): ``random_spans_noise_mask`` fixes ``num_noise_tokens = round(length *
noise_density)`` and ``num_noise_spans = round(num_noise_tokens / mean_noise_span_length)`` (its docstring,
"determined deterministically"), spans alternate beginning with non-noise; ``noise_span_to_unique_sentinel``
gives one sentinel per span; ``random_prefix_noise_mask`` draws the prefix length in
[max(1, round((1 - 2 d)(L - 1))), L - 1]. The 7 denoisers are the paper's §3.1.2 configuration.
"""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.core.errors import ConfigError
from lorakit.data.example import Example
from lorakit.pretrain import OBJECTIVES, PretrainConfig, pretrain_base
from lorakit.pretrain.tokenizer import train_tokenizer
from lorakit.pretrain.train import main as pretrain_main
from lorakit.pretrain.ul2 import (
    PAPER_DENOISERS,
    Denoiser,
    UL2Config,
    UL2Objective,
    fitting_length,
    prefix_lm_mask,
    random_prefix_length,
    random_spans_noise_mask,
    sentinel_token,
    with_mode_token,
)

from pretrain.test_pretrain import tiny_config

SEQ_LEN = 64


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"def f{i}(x):\n    return x + {i}\n" for i in range(200)]
    return train_tokenizer(texts, vocab_size=320, model_max_length=SEQ_LEN)


@pytest.fixture(scope="module")
def batcher(tokenizer):
    return UL2Objective().prepare(tokenizer, SEQ_LEN)


def _spans(mask: torch.Tensor) -> list[int]:
    lengths, run = [], 0
    for flag in mask.tolist() + [False]:
        if flag:
            run += 1
        elif run:
            lengths.append(run)
            run = 0
    return lengths


def test_paper_configuration_is_seven_denoisers():
    modes = [(d.mode, d.mean_span, d.rate) for d in PAPER_DENOISERS]
    assert modes == [("R", 3.0, 0.15), ("R", 8.0, 0.15), ("X", 3.0, 0.5), ("X", 8.0, 0.5), ("X", 64.0, 0.15),
                     ("X", 64.0, 0.5), ("S", None, 0.5)]


@pytest.mark.parametrize("length,rate,mean_span", [(100, 0.15, 3.0), (100, 0.5, 8.0), (126, 0.15, 64.0),
                                                    (94, 0.5, 3.0), (37, 0.15, 3.0)])
def test_span_counts_and_rate_match_t5(length, rate, mean_span):
    g = torch.Generator().manual_seed(0)
    num_noise = round(length * rate)  # t5: num_noise_tokens = round(length * noise_density)
    num_spans = max(1, round(num_noise / mean_span))  # t5: round(num_noise_tokens / mean_noise_span_length)
    lengths = []
    for _ in range(200):
        mask = random_spans_noise_mask(length, rate, mean_span, g)
        assert mask.shape == (length,) and mask.dtype == torch.bool
        assert int(mask.sum()) == num_noise
        assert not mask[0]  # spans alternate beginning with non-noise
        spans = _spans(mask)
        assert len(spans) == num_spans
        lengths.extend(spans)
    assert sum(lengths) / len(lengths) == pytest.approx(num_noise / num_spans)


def test_span_lengths_are_a_uniform_composition():
    # 6 noise tokens in 2 spans: 5 compositions (1+5 ... 5+1), each equally likely (t5 _random_segmentation)
    g = torch.Generator().manual_seed(1)
    firsts = [_spans(random_spans_noise_mask(20, 0.3, 3.0, g))[0] for _ in range(3000)]
    counts = torch.bincount(torch.tensor(firsts), minlength=6)[1:]
    assert counts.min() > 0.8 * 600 and counts.max() < 1.2 * 600


def test_prefix_length_range_matches_t5():
    g = torch.Generator().manual_seed(0)
    draws = [random_prefix_length(127, 0.5, g) for _ in range(2000)]
    assert min(draws) >= 1 and max(draws) <= 126
    assert sum(draws) / len(draws) == pytest.approx(63.5, abs=3)
    narrow = [random_prefix_length(101, 0.25, g) for _ in range(500)]  # min round(0.5 * 100) = 50
    assert min(narrow) >= 50 and max(narrow) <= 100


def _rebuild(inputs: list[int], targets: list[int], sentinels: dict[int, int]) -> list[int]:
    """The raw text back from inputs (with sentinels) and targets (sentinel, span, ...)."""
    spans, current = {}, None
    for tok in targets:
        if tok in sentinels:
            current = sentinels[tok]
            spans[current] = []
        elif current is not None:
            spans[current].append(tok)
    out = []
    for tok in inputs:
        out.extend(spans[sentinels[tok]] if tok in sentinels else [tok])
    return out


@pytest.mark.parametrize("index", range(len(PAPER_DENOISERS)))
def test_each_denoiser_row(tokenizer, batcher, index):
    denoiser = PAPER_DENOISERS[index]
    g = torch.Generator().manual_seed(index)
    block = torch.randint(4, 260, (SEQ_LEN,), generator=g)
    inputs, targets = batcher.row(block, denoiser, g)
    assert inputs[0] == tokenizer.convert_tokens_to_ids(denoiser.mode_token)
    assert len(inputs) + len(targets) <= SEQ_LEN
    raw = block[: fitting_length(SEQ_LEN, denoiser)].tolist()
    if denoiser.mean_span is None:  # S: prefix then continuation
        assert inputs[1:] + targets == raw
        return
    sentinels = {tokenizer.convert_tokens_to_ids(sentinel_token(k)): k for k in range(len(batcher.sentinels))}
    assert targets[-1] == tokenizer.eos_token_id
    n_spans = sum(t in sentinels for t in inputs)
    assert n_spans == sum(t in sentinels for t in targets) == max(1, round(round(len(raw) * denoiser.rate)
                                                                             / denoiser.mean_span))
    assert len(targets) - 1 - n_spans == round(len(raw) * denoiser.rate)  # corrupted tokens
    assert _rebuild(inputs[1:], targets[:-1], sentinels) == raw


def test_batch_mode_tokens_labels_and_mixture(tokenizer, batcher):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(4, 260, (700, SEQ_LEN), generator=g)
    out = batcher(blocks, g)
    mode_ids = {tokenizer.convert_tokens_to_ids(t): t for t in ("[R]", "[S]", "[X]")}
    first = out["input_ids"][:, 0].tolist()
    assert set(first) == set(mode_ids)
    share = {t: first.count(i) / len(first) for i, t in mode_ids.items()}
    # uniform over the 7 denoisers: R 2/7, X 4/7, S 1/7
    assert share["[R]"] == pytest.approx(2 / 7, abs=0.05)
    assert share["[X]"] == pytest.approx(4 / 7, abs=0.05)
    assert share["[S]"] == pytest.approx(1 / 7, abs=0.05)
    mask = out["attention_mask"]
    assert mask.shape == (700, 1, SEQ_LEN, SEQ_LEN)
    for b in range(0, 700, 50):
        prefix = int((mask[b, 0, 0] == 0).sum())  # row 0 sees exactly the prefix
        labels = out["labels"][b]
        assert (labels[:prefix] == -100).all()
        assert (labels[prefix:] != -100).any()
        real = out["input_ids"][b] != tokenizer.pad_token_id
        assert (labels[~real] == -100).all()
        assert torch.equal(labels[prefix:][real[prefix:]], out["input_ids"][b, prefix:][real[prefix:]])


def test_prefix_lm_mask_pattern():
    mask = prefix_lm_mask(torch.tensor([3, 1]), 5)
    allowed = mask[:, 0] == 0
    for b, p in enumerate((3, 1)):
        for i in range(5):
            for j in range(5):
                assert bool(allowed[b, i, j]) == (j <= i or j < p), (b, i, j)


def test_llama_honours_the_prefix_lm_mask():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 50, (1, 8))
    mask = prefix_lm_mask(torch.tensor([4]), 8)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        later_input = ids.clone()
        later_input[0, 3] = (ids[0, 3] + 1) % 50
        seen_back = model(input_ids=later_input, attention_mask=mask).logits
        changed_target = ids.clone()
        changed_target[0, 6] = (ids[0, 6] + 1) % 50
        causal_tail = model(input_ids=changed_target, attention_mask=mask).logits
    assert not torch.allclose(seen_back[0, 0], base[0, 0])  # input positions see later inputs
    assert torch.allclose(causal_tail[0, :6], base[0, :6], atol=1e-6)  # nothing sees a later target
    assert not torch.allclose(causal_tail[0, 6], base[0, 6])


def test_bad_denoisers_and_objective_names():
    with pytest.raises(ConfigError, match="Did you mean: X"):
        Denoiser("XX", 0.5)
    with pytest.raises(ConfigError, match="at most|0.5"):
        Denoiser("S", 0.7)
    with pytest.raises(ConfigError, match="weights"):
        UL2Config(weights=(1.0,))
    with pytest.raises(ConfigError, match="Did you mean: ul2"):
        PretrainConfig(objective="ul3")
    assert "ul2" in OBJECTIVES


def test_cli_unknown_objective_names_near_match(capsys):
    assert pretrain_main(["--out", "unused", "--objective", "ul_2"]) == 2
    assert "Did you mean: ul2" in capsys.readouterr().err


def test_mode_token_prepended_and_checked(tokenizer):
    UL2Objective().prepare(tokenizer, SEQ_LEN)
    rows = with_mode_token([Example(prompt="add: 1 + 2 =>", completion=" 3")], "[S]", tokenizer)
    assert rows[0].prompt == "[S]add: 1 + 2 =>"
    assert tokenizer.encode(rows[0].prompt, add_special_tokens=False)[0] == tokenizer.convert_tokens_to_ids("[S]")
    with pytest.raises(ConfigError, match=r"Did you mean: \[S\]"):
        with_mode_token(rows, "[S ]", tokenizer)


def test_tiny_ul2_pretrain_saves_mode_tokens(tmp_path):
    info = pretrain_base(tiny_config(objective="ul2"), tmp_path / "m", log=lambda line: None)
    assert info["config"]["objective"] == "ul2"
    saved = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    added = {t["content"] for t in saved["added_tokens"]}
    assert {"[R]", "[S]", "[X]", "<extra_id_0>"} <= added
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["vocab_size"] == 400 + len(UL2Objective().special_tokens(32))


def test_cli_eval_mode_token_missing_from_the_bundled_tokenizer(capsys):
    from lorakit.cli import main as cli_main

    assert cli_main(["eval", "--data", "add", "--eval-examples", "2", "--mode-token", "[S]", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "--mode-token '[S]' is not a special token" in err and "--objective ul2" in err


def test_a_block_too_short_for_a_span_row_is_refused_by_the_config(tokenizer):
    """Was: `pretrain-base --objective ul2 --seq-len 4` (or 5) built the corpus and tokenizer, then failed in the
    first batch with a RuntimeError traceback: a span row (mode token, kept tokens and one sentinel each side of a
    span, EOS) of the shortest raw text, 2 tokens, is 2 + 2·1 + 2 = 6 tokens long (fitting_length's formula)."""
    for seq_len in (4, 5):
        with pytest.raises(ConfigError, match=rf"seq_len={seq_len} is too short for the ul2 objective: its span "
                                              rf"denoisers need rows of at least 6 tokens"):
            tiny_config(objective="ul2", seq_len=seq_len)
    assert tiny_config(objective="ul2", seq_len=6).seq_len == 6
    six = UL2Objective().prepare(tokenizer, 6)  # and 6 does fit: every denoiser's row, many draws
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        batch = six(torch.randint(4, 260, (len(PAPER_DENOISERS), 6), generator=g), g)
        assert batch["input_ids"].shape == (len(PAPER_DENOISERS), 6)
