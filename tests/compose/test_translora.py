"""Trans-LoRA (arXiv:2405.17258; compose/translora.py and its synthetic-data half, translora_synthesis.py):
transfer writes an adapter the real ``peft`` loads on the target base; the discriminator scores and filter follow
the paper's description; bad input fails clearly.

Tiny random Llamas with the bundled tokenizer stand in for the two bases (the pipeline's mechanics, not its
quality: benchmarks/translora/README.md has the measured transfer on the bundled bases)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from lk_models import tiny_llama_for
from lorakit import LoraConfig, add_adapter, load_adapter, save_adapter, set_adapter
from lorakit.compose import translora_synthesis as tl
from lorakit.compose.translora import TransLoraConfig, check_same_tokenizer, transfer_models
from lorakit.compose.translora_synthesis import (DISC_QUESTION, REAL, SYNTHETIC, cut_candidate, default_prompt_end,
                                                 discriminator_scores, filter_candidates)
from lorakit.core.errors import ConfigError, LorakitError
from lorakit.data import Example, encode_prompt, get_task
from lorakit.hub import load_tokenizer

FAST = dict(n_seeds=3, n_synthetic=6, candidates_per_round=6, max_rounds=2, max_new_tokens=8, disc_r=2,
            disc_steps=3, disc_batch_size=4, steps=3, batch_size=4, threshold=0.0, prompt_end="")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bundled")


@pytest.fixture
def real():
    return get_task("reverse").generate("train", 8, seed=0)


def _source(tokenizer, r=2):
    model = tiny_llama_for(tokenizer, seed=0, pad_token_id=tokenizer.pad_token_id)
    add_adapter(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model.eval()


def _target(tokenizer):  # a differently shaped base: wider, deeper, other head count
    return tiny_llama_for(tokenizer, seed=1, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id).eval()


@pytest.mark.parametrize("distill", ["completions", "logits"])
def test_transfer_adapter_loads_in_peft_on_target(tokenizer, real, distill, tmp_path):
    from peft import PeftModel

    source, target = _source(tokenizer), _target(tokenizer)
    result = transfer_models(source, tokenizer, target, tokenizer, real, TransLoraConfig(**FAST, distill=distill))
    assert result.kept == len(result.examples) > 0 and result.candidates >= result.kept
    assert all(isinstance(ex.prompt, str) and ex.prompt for ex in result.examples)
    assert result.train["steps"] == 3 and math.isfinite(result.train["final_loss"])
    save_adapter(target, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 2 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]

    ids = torch.tensor([encode_prompt(tokenizer, real[0].prompt)])
    with torch.no_grad():
        ours = target(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(_target(tokenizer), tmp_path / "a").eval()
        theirs = peft_model(input_ids=ids).logits
        base = _target(tokenizer)(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-4)  # the trained adapter changes the target's output


def test_discriminator_score_is_softmax_of_answer_likelihoods(tokenizer):
    """Paper §3 (discriminator): a yes/no question to the source LM + discriminator LoRA; P(real) here is
    softmax(ℓ_yes, ℓ_no)[0] with ℓ_a = Σ_t log p(a_t | question, a_<t), computed by hand from full logits."""
    model = _source(tokenizer)
    prompts = ["reverse: a b c =>", "sort: q w =>", "x"]
    got = discriminator_scores(model, tokenizer, prompts, batch_size=2)
    for prompt, score in zip(prompts, got.tolist()):
        q = encode_prompt(tokenizer, DISC_QUESTION.format(text=prompt))
        ll = []
        for answer in (REAL, SYNTHETIC):
            a = tokenizer.encode(answer, add_special_tokens=False)
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([q + a])).logits[0].log_softmax(-1)
            ll.append(sum(logp[len(q) - 1 + i, tok].item() for i, tok in enumerate(a)))
        assert score == pytest.approx(1 / (1 + math.exp(ll[1] - ll[0])), abs=1e-5)


def test_filter_keeps_what_the_discriminator_calls_real():
    prompts = ["a", "b", "c", "d"]
    scores = torch.tensor([0.9, 0.5, 0.2, 0.51])
    assert filter_candidates(prompts, scores, 0.5) == ["a", "d"]  # strictly above: 0.5 is not "real"
    assert filter_candidates(prompts, scores, 0.0) == prompts


def test_discriminator_learns_real_from_synthetic(real, monkeypatch):
    """Trained as the paper does (real prompts -> True, source-synthesized prompts -> False, equal numbers), the
    discriminator separates the two, also on held-out real prompts. The synthesized side is fixed here so the
    test does not hinge on sampling; a word-level vocabulary keeps the tiny model quick to train."""
    from lk_models import word_level_tokenizer

    fake = [f"zz{i} qq =>" for i in range(len(real))]
    held_out = get_task("reverse").generate("test", 4, seed=0)
    words = [tl._disc_example(t, True) for t in [ex.prompt for ex in real + held_out] + fake + ["zz99 qq =>"]]
    tokenizer = word_level_tokenizer([*words, Example("", SYNTHETIC)])
    model = tiny_llama_for(tokenizer, seed=0).eval()
    monkeypatch.setattr(tl, "sample_candidates", lambda *a, **k: (fake, len(fake)))
    config = TransLoraConfig(**{**FAST, "disc_steps": 40, "disc_r": 4, "disc_lr": 1e-2, "disc_batch_size": 8})
    stats = tl.train_discriminator(model, tokenizer, real, config, random.Random(0))
    assert stats == {**stats, "real": len(real), "synthetic": len(real)}
    assert stats["train_accuracy"] == 1.0
    set_adapter(model, tl.DISCRIMINATOR)
    scores = discriminator_scores(model, tokenizer, [ex.prompt for ex in held_out] + ["zz99 qq =>"])
    assert (scores[:4] > 0.5).all() and scores[4] < 0.5


def test_discriminator_trains_on_equal_numbers_when_sampling_falls_short(real, tokenizer, monkeypatch):
    """Was: all 8 real prompts (True) against the 6 synthetic ones sampling produced (False). The paper's
    discriminator sees the two classes in equal numbers (translora_synthesis.train_discriminator's docstring has
    the source and why no official code could be checked): 6 real prompts, drawn from the 8, against the 6."""
    import lorakit.training

    fake = [f"reverse: zz{i} =>" for i in range(3)]  # 3 per round × FAST's max_rounds=2 = 6 < 8 real
    monkeypatch.setattr(tl, "sample_candidates", lambda *a, **k: (fake, len(fake)))
    seen = []
    real_train = lorakit.training.train

    def spy(model, tok, examples, *args, **kwargs):  # the real loop, recording what it is given
        seen.append(list(examples))
        return real_train(model, tok, examples, *args, **kwargs)

    monkeypatch.setattr(lorakit.training, "train", spy)
    with pytest.warns(UserWarning, match="wrote 6 whole synthetic prompts in max_rounds=2 rounds, fewer than the 8 "
                                         "real ones; it trains on 6 of each"):
        stats = tl.train_discriminator(_source(tokenizer), tokenizer, real, TransLoraConfig(**FAST), random.Random(0))
    assert (stats["real"], stats["synthetic"], stats["real_available"]) == (6, 6, 8)
    [examples] = seen
    labels = [ex.completion for ex in examples]
    assert labels.count(REAL) == labels.count(SYNTHETIC) == 6
    real_prompts = {tl._disc_example(ex.prompt, True).prompt for ex in real}
    assert {ex.prompt for ex in examples if ex.completion == REAL} <= real_prompts  # six distinct real ones
    assert len({ex.prompt for ex in examples if ex.completion == REAL}) == 6


def test_synthesis_that_keeps_fewer_than_asked_says_so():
    """n_synthetic=6 asked, 2 candidates a round all kept, max_rounds=2: 4 kept, and a warning names 4 and 6."""
    config = TransLoraConfig(**FAST)
    with pytest.warns(UserWarning, match=r"4 of the n_synthetic=6 prompts asked were kept after max_rounds=2 rounds "
                                         r"\(4 candidates\)"):
        kept, sampled, rounds = tl.synthesize(lambda n: (["a =>", "b =>"], 2), lambda ps: torch.ones(len(ps)), config)
    assert (len(kept), sampled, rounds) == (4, 4, 2)


def test_prompt_end_and_cut():
    seeds = [Example("reverse: a b =>", " b a"), Example("reverse: x y z =>", " z y x")]
    assert default_prompt_end(seeds) == " =>"
    assert default_prompt_end([Example("ab", ""), Example("cd", "")]) == ""
    assert cut_candidate("reverse: q w => w q\nreverse: e =>", "\n", " =>") == "reverse: q w =>"
    assert cut_candidate("reverse: q w\nreverse: e =>", "\n", " =>") is None  # the line ended first
    assert cut_candidate(" =>", "\n", " =>") is None
    assert cut_candidate("whole line\nnext", "\n", "") == "whole line"


def test_seed_with_separator_is_a_clear_error(tokenizer):
    seeds = [Example("line one\nline two =>", " x")] * 3
    with pytest.raises(ConfigError, match="separator"):
        tl.sample_candidates(_source(tokenizer), tokenizer, seeds, 2, TransLoraConfig(**FAST, separator="\n"),
                             random.Random(0))


def test_mismatched_tokenizers_error_for_logit_distillation(tokenizer, real):
    from lk_models import word_level_tokenizer

    other = word_level_tokenizer(real)
    with pytest.raises(LorakitError, match="tokenizers differ"):
        check_same_tokenizer(tokenizer, other)
    check_same_tokenizer(tokenizer, load_tokenizer("bundled"))  # the same vocabulary passes
    with pytest.raises(LorakitError, match="tokenizers differ"):
        transfer_models(_source(tokenizer), tokenizer, tiny_llama_for(other), other, real,
                        TransLoraConfig(**FAST, distill="logits"))


@pytest.mark.parametrize("overrides, match", [
    ({"generator": "targte"}, "generator.*target"),
    ({"distill": "logit"}, "distill.*logits"),
    ({"threshold": 1.0}, "threshold"),
    ({"n_seeds": 0}, "n_seeds"),
    ({"top_p": 0.0}, "top_p"),
    ({"separator": ""}, "separator"),
    # inf passed `> 0`: the transfer sampled NaN probabilities (or trained to NaN weights) minutes later
    ({"temperature": float("inf")}, "temperature must be > 0 and finite"),
    ({"kd_temperature": float("inf")}, "kd_temperature"),
    ({"lr": float("inf")}, r"\.lr must"),
    ({"disc_lr": float("inf")}, "disc_lr"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        TransLoraConfig(**overrides)


def test_too_few_real_examples_and_unknown_adapter(tokenizer, real):
    with pytest.raises(LorakitError, match="n_seeds=3"):
        transfer_models(_source(tokenizer), tokenizer, _target(tokenizer), tokenizer, real[:2], TransLoraConfig(**FAST))
    with pytest.raises(LorakitError, match="no adapter 'missing'"):
        transfer_models(_source(tokenizer), tokenizer, _target(tokenizer), tokenizer, real, TransLoraConfig(**FAST),
                        adapter_name="missing")


def test_transfer_refuses_an_existing_output_folder_without_overwrite(tokenizer, real, tmp_path):
    """``transfer`` replaced a non-empty output folder silently while ``lorakit transfer`` refuses it without
    --overwrite; now the Python function has the same rule, checked before any model loads."""
    from lorakit.compose.translora import transfer

    save_adapter(_source(tokenizer), tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(LorakitError, match=r"already exists and is not empty; pass overwrite=True"):
        transfer(tmp_path / "src", "bundled", "bundled-small", real, out,
                 TransLoraConfig(**FAST))
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_unknown_adapter_path_is_a_clear_error(tmp_path, capsys):
    from lorakit.cli import main

    code = main(["transfer", "--adapter", str(tmp_path / "nope"), "--target-model", "bundled-small", "--data",
                 "reverse", "--output", str(tmp_path / "out")])
    assert code == 2
    assert "adapter folder" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_unknown_target_model_is_a_clear_error(tmp_path, capsys, tokenizer):
    from lorakit.cli import main

    model = _source(tokenizer)
    save_adapter(model, tmp_path / "src")
    code = main(["transfer", "--adapter", str(tmp_path / "src"), "--target-model", str(tmp_path / "no-model"),
                 "--data", "reverse", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err  # named before the source model loads (tests/test_cli_checks_first.py)
    assert code == 2 and f"--target-model {str(tmp_path / 'no-model')!r} is not a local folder" in err, err


def test_loaded_source_adapter_is_the_teacher(tokenizer, real, tmp_path):
    """A saved adapter reloaded on the source gives the teacher labels: its greedy answers on the kept prompts."""
    from lorakit.data import generate_completions

    source = _source(tokenizer)
    save_adapter(source, tmp_path / "src")
    reloaded = tiny_llama_for(tokenizer, seed=0, pad_token_id=tokenizer.pad_token_id).eval()
    load_adapter(reloaded, tmp_path / "src")
    result = transfer_models(reloaded, tokenizer, _target(tokenizer), tokenizer, real, TransLoraConfig(**FAST))
    prompts = [ex.prompt for ex in result.examples]
    assert [ex.completion for ex in result.examples] == generate_completions(source, tokenizer, prompts,
                                                                             max_new_tokens=FAST["max_new_tokens"])


def test_cli_transfer_writes_adapter_and_record(tmp_path, tokenizer, capsys):
    """``lorakit transfer`` end to end on two tiny model folders (the bundled tokenizer saved with each)."""
    from lorakit.cli import main
    from lorakit.io.peft_format import read_adapter_config

    source = tiny_llama_for(tokenizer, seed=0, pad_token_id=tokenizer.pad_token_id)
    source.save_pretrained(tmp_path / "S")
    tokenizer.save_pretrained(tmp_path / "S")
    _target(tokenizer).save_pretrained(tmp_path / "T")
    tokenizer.save_pretrained(tmp_path / "T")
    add_adapter(source, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    save_adapter(source, tmp_path / "A")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    code = main(["transfer", "--adapter", str(tmp_path / "A"), "--source-model", str(tmp_path / "S"),
                 "--target-model", str(tmp_path / "T"), "--data", "reverse", "--real-examples", "6",
                 "--output", str(tmp_path / "out"), *flags])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads((tmp_path / "out" / "translora.json").read_text())
    assert record["kept"] == summary["kept"] > 0 and record["paper"] == "arXiv:2405.17258"
    assert record["target_model"] == str(tmp_path / "T") and record["config"]["n_seeds"] == 3
    assert read_adapter_config(tmp_path / "out").r == 2
    load_adapter(_target(tokenizer), tmp_path / "out")


@pytest.mark.parametrize("generator", ["target", "source", "teacher"])
def test_who_writes_the_synthetic_prompts(tokenizer, real, generator, monkeypatch):
    """Paper Fig. 1: the source *base* writes the discriminator's synthetic data; the transfer candidates come from
    the target base ("target", the paper's choice), the source base ("source") or the source base + LoRA ("teacher")."""
    from lorakit.core.model import active_adapters, adapter_state

    source, target = _source(tokenizer), _target(tokenizer)
    calls = []
    real_sample = tl.sample_candidates

    def spy(model, *args, **kwargs):
        on = adapter_state(model).disabled == 0
        calls.append(("target" if model is target else "source",
                      tuple(active_adapters(model)) if on else ()))
        return real_sample(model, *args, **kwargs)

    monkeypatch.setattr(tl, "sample_candidates", spy)
    transfer_models(source, tokenizer, target, tokenizer, real, TransLoraConfig(**{**FAST, "max_rounds": 1},
                                                                                generator=generator))
    assert calls[0] == ("source", ())  # discriminator data: the source base, adapters off
    expected = {"target": ("target", ()), "source": ("source", ()), "teacher": ("source", ("default",))}[generator]
    assert calls[1:] == [expected]


def test_kept_none_says_whether_candidates_reached_the_discriminator(tokenizer, real):
    """One sampled token cannot hold a prompt ending in "=>", so nothing reaches the discriminator: the error names
    --max-new-tokens, not the discriminator's threshold. With candidates but an unreachable threshold, it names
    --threshold. Errors name the CLI flags, not the config fields."""
    short = {**FAST, "max_new_tokens": 1, "prompt_end": "=>"}
    with pytest.raises(LorakitError, match="nothing reached the discriminator") as err:
        transfer_models(_source(tokenizer), tokenizer, _target(tokenizer), tokenizer, real, TransLoraConfig(**short))
    assert "--max-new-tokens 1" in str(err.value) and "--prompt-end" in str(err.value)
    assert "--threshold" not in str(err.value) and "TransLoraConfig" not in str(err.value)
    at_transfer = tl.nothing_kept_message(64, 0, TransLoraConfig(**short), real[:3])
    assert "transfer set, the target model" in at_transfer and "--max-new-tokens 1" in at_transfer
    assert "--threshold" not in at_transfer
    strict = {**FAST, "threshold": 0.999999}
    with pytest.raises(LorakitError, match=r"rejected all \d+ candidate prompts") as err:
        transfer_models(_source(tokenizer), tokenizer, _target(tokenizer), tokenizer, real, TransLoraConfig(**strict))
    assert "--threshold 0.999999" in str(err.value) and "--max-new-tokens" not in str(err.value)


def test_cli_separator_and_prompt_end_read_backslash_escapes():
    r"""docs/transfer.md tells users to pass ``"\n"`` as the separator for models that continue lists of lines; from
    a shell that arrives as the two characters ``\`` ``n``, which no sampled text contains, so every candidate was
    dropped. The CLI reads C-style escapes in --separator / --prompt-end (``\n`` a newline, ``\t`` a tab,
    ``\\`` one backslash); other text, non-ASCII included, is unchanged."""
    from lorakit.compose.translora import build_parser

    args = build_parser().parse_args(["--adapter", "a", "--target-model", "t", "--data", "d", "--output", "o",
                                      "--separator", r"\n", "--prompt-end", r" =>\t"])
    assert args.separator == "\n" and args.prompt_end == " =>\t"
    args = build_parser().parse_args(["--adapter", "a", "--target-model", "t", "--data", "d", "--output", "o",
                                      "--separator", r"§\\", "--prompt-end", "é =>"])
    assert args.separator == "§\\" and args.prompt_end == "é =>"
    assert build_parser().parse_args(["--adapter", "a", "--target-model", "t", "--data", "d",
                                      "--output", "o"]).separator is None


def test_a_transfer_that_fails_leaves_the_source_model_as_it_was(tokenizer, real):
    """Was: transfer_models added its discriminator adapter to the source model and made it active, and took it off
    only on success, so after a failed synthesis (here: the threshold keeps nothing) the user's source model kept
    the discriminator as its active adapter. Now it is removed and the source's active adapters restored on any
    exit."""
    import lorakit as lk
    from lorakit.core.model import adapter_state

    source = _source(tokenizer)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        before = source(input_ids=ids).logits
    with pytest.raises(LorakitError, match="rejected all"):
        transfer_models(source, tokenizer, _target(tokenizer), tokenizer, real,
                        TransLoraConfig(**{**FAST, "threshold": 0.999999}))
    assert lk.core.model.adapter_names(source) == ["default"] and adapter_state(source).active == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(source(input_ids=ids).logits, before, atol=0, rtol=0)


def test_cli_too_few_real_examples_fail_before_the_models_load(tmp_path, capsys, tokenizer):
    """``--real-examples 2`` under ``--n-seeds 3`` was found only after both models loaded (and after any error
    loading them); the target folder here holds a config.json but no weights, so only the first check can pass."""
    from lorakit.cli import main

    model = _source(tokenizer)
    save_adapter(model, tmp_path / "src")
    (tmp_path / "T").mkdir()
    (tmp_path / "T" / "config.json").write_text("{}")
    code = main(["transfer", "--adapter", str(tmp_path / "src"), "--target-model", str(tmp_path / "T"),
                 "--data", "reverse", "--real-examples", "2", "--n-seeds", "3", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "needs at least --n-seeds 3 real examples" in err and "got 2" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_transferred_adapter_names_the_target_base(tmp_path, tokenizer, capsys):
    """The transferred adapter's adapter_config.json said base_model_name_or_path = the *source* base (copied with
    the source adapter's config), so PEFT's AutoPeftModel and lorakit's defaults loaded the wrong base for it."""
    from lorakit.cli import main

    source = tiny_llama_for(tokenizer, seed=0, pad_token_id=tokenizer.pad_token_id)
    source.save_pretrained(tmp_path / "S")
    tokenizer.save_pretrained(tmp_path / "S")
    _target(tokenizer).save_pretrained(tmp_path / "T")
    tokenizer.save_pretrained(tmp_path / "T")
    source = tiny_llama_for(tokenizer, seed=0, pad_token_id=tokenizer.pad_token_id)
    source.name_or_path = str(tmp_path / "S")
    add_adapter(source, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    save_adapter(source, tmp_path / "A")
    assert json.loads((tmp_path / "A" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "S")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    assert main(["transfer", "--adapter", str(tmp_path / "A"), "--source-model", str(tmp_path / "S"),
                 "--target-model", str(tmp_path / "T"), "--data", "reverse", "--real-examples", "6",
                 "--output", str(tmp_path / "out"), *flags]) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "T")


def test_candidates_of_an_encoder_decoder_are_its_decoder_tokens(tokenizer, real, monkeypatch):
    """An encoder-decoder (T5) returns only decoder tokens from ``generate`` (transformers' GenerationMixin), its
    sample after the decoder start token; the few-shot context is the encoder's. Was: the first ``width`` (context
    length) columns were cut as for a decoder-only model, so every sample was empty or lost its start. Reference: the
    recorded ``generate`` output decoded from column 1; the cut into prompts is bypassed to see every sample."""
    from lk_models import tiny_t5

    model = tiny_t5(seed=0)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.decoder_start_token_id = tokenizer.pad_token_id
    model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    generated = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: generated.append(generate(**kw)) or generated[-1])
    monkeypatch.setattr(tl, "cut_candidate", lambda text, separator, prompt_end: text)
    config = TransLoraConfig(max_new_tokens=6)
    texts, sampled = tl.sample_candidates(model, tokenizer, real[:3], 2, config, random.Random(0))
    [out] = generated
    assert sampled == 2 and out.shape[1] <= config.max_new_tokens + 1
    assert texts == tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    assert any(texts)
