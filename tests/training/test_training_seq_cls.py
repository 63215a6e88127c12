"""SEQ_CLS: a LoRA encoder with its classification head in modules_to_save, trained by the plain loop, saved in
PEFT's layout and loaded by real peft (task_type SEQ_CLS) and by lorakit with the same logits; the CLI path."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

import lorakit
from lorakit import LoraConfig
from lorakit.cli import main
from lorakit.data import Example
from lorakit.data.classification import evaluate_classification
from lorakit.training import TrainConfig, train
from lorakit.training.objectives import CausalLM, SequenceClassification, objective_for
from lk_models import tiny_bert, tiny_llama, word_level_tokenizer

LABELS = {"neg": 0, "pos": 1}


def _examples(n: int = 24) -> list[Example]:
    # Label = whether the text holds the word "good": learnable by a 2-layer encoder in a few steps.
    words = ["good", "bad", "film", "plot", "cast", "long", "short", "music"]
    out = []
    for i in range(n):
        text = " ".join(words[(i * 3 + j) % len(words)] for j in range(1 + i % 4))
        out.append(Example(text, "pos" if "good" in text.split() else "neg"))
    return out


def _tiny_classifier(tokenizer, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                     num_labels=2, id2label={0: "neg", 1: "pos"}, label2id=LABELS)
    return BertForSequenceClassification(cfg).eval()


def test_objective_follows_the_models_head():
    assert isinstance(objective_for(tiny_bert()), SequenceClassification)
    assert isinstance(objective_for(tiny_llama()), CausalLM)


def test_head_is_trained_saved_and_loaded_by_peft_with_identical_logits(tmp_path):
    examples = _examples()
    tok = word_level_tokenizer(examples)
    model = _tiny_classifier(tok)
    head_before = model.classifier.weight.detach().clone()
    lorakit.add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                          modules_to_save=["classifier"]))
    result = train(model, tok, examples[:20], TrainConfig(steps=6, batch_size=4, lr=5e-3, output_dir=str(tmp_path / "run"),
                                                          log_every=1), eval_examples=examples[20:], progress=False)
    assert set(result.final_metrics) >= {"accuracy", "f1", "mcc", "n"} and result.final_metrics["n"] == 4
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert not torch.equal(tensors["base_model.model.classifier.weight"], head_before)  # the head trained
    assert any(k.endswith("query.lora_A.weight") for k in tensors)

    ids = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 8, 2, 0]])
    mask = (ids != 0).long()
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        peft_model = PeftModel.from_pretrained(_tiny_classifier(tok), str(adapter)).eval()
        assert type(peft_model).__name__ == "PeftModelForSequenceClassification"
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        reloaded = _tiny_classifier(tok)
        lorakit.load_adapter(reloaded, adapter)
        again = reloaded.eval()(input_ids=ids, attention_mask=mask).logits
        plain = _tiny_classifier(tok)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours)
    torch.testing.assert_close(again, ours)
    assert not torch.allclose(plain, ours)


def test_cli_train_seq_cls(tmp_path, capsys):
    examples = _examples(30)
    tok = word_level_tokenizer(examples)
    folder = tmp_path / "encoder"
    _tiny_classifier(tok).bert.save_pretrained(folder)  # a bare encoder, as a sentence-embedding checkpoint ships
    tok.save_pretrained(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": ex.prompt, "label": ex.completion}) + "\n" for ex in examples))
    out = tmp_path / "out"
    assert main(["train", "--task-type", "seq-cls", "--model", str(folder), "--data", str(data), "--steps", "4",
                 "--batch-size", "4", "--r", "4", "--target-modules", "query", "value", "--max-length", "32", "--output", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "MCC" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task_type"] == "SEQ_CLS" and set(summary["after"]) >= {"accuracy", "f1", "mcc"}
    assert summary["trainable_params"] < summary["total_params"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    assert json.loads((out / "adapter" / "labels.json").read_text()) == {"labels": ["neg", "pos"]}
    # `lorakit eval` rebuilds the classifier and scores the hold-out (the file's last tenth) as training did.
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(data.read_text().splitlines(keepends=True)[-3:]))
    assert main(["eval", "--model", str(folder), "--adapter", str(out / "adapter"), "--data", str(held_out),
                 "--json", "--quiet"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed[printed.index("{"):])
    assert metrics == pytest.approx({k: summary["after"][k] for k in metrics})


def test_cli_rejects_unknown_task_type(tmp_path, capsys):
    assert main(["train", "--task-type", "seq-clss", "--output", str(tmp_path / "o")]) == 2
    assert "seq-cls" in capsys.readouterr().err


def test_cli_eval_classifies_with_an_adapter_that_leaves_the_head_alone(tmp_path, capsys):
    """A LoRA on a classifier whose head it does not train is saved as PEFT saves a config without task_type
    (``task_type`` null, ``auto_mapping`` naming BertForSequenceClassification; PEFT loads it with the same logits:
    tests/io/test_peft_interop_hosts.py). Was: ``lorakit eval`` read only ``task_type``, so it loaded the folder as a
    causal LM (BertLMHeadModel) and scored generated text; now the auto_mapping's class says SEQ_CLS, as it tells
    PEFT's AutoPeftModel which class to build."""
    examples = _examples(30)
    tok = word_level_tokenizer(examples)
    folder = tmp_path / "classifier"
    _tiny_classifier(tok).save_pretrained(folder)  # a classifier checkpoint: its head is the base's
    tok.save_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    torch.manual_seed(0)
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["auto_mapping"]["base_model_class"] == "BertForSequenceClassification"
    (tmp_path / "adapter" / "labels.json").write_text(json.dumps({"labels": ["neg", "pos"]}))
    expected = evaluate_classification(model, tok, examples, LABELS)

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": ex.prompt, "label": ex.completion}) + "\n" for ex in examples))
    assert main(["eval", "--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--data", str(data),
                 "--json", "--quiet"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed[printed.index("{"):])
    assert metrics == pytest.approx(expected)


def _classifier_folder(tmp_path, tok, labels: list[str], name: str = "classifier"):
    """A BertForSequenceClassification checkpoint whose head has ``labels`` in that order (config.id2label)."""
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                     num_labels=len(labels), id2label=dict(enumerate(labels)),
                     label2id={n: i for i, n in enumerate(labels)})
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # a head that reads the data: a clear accuracy, so a swap of its outputs shows
        model.classifier.weight.normal_(0, 2.0)
    model.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    return tmp_path / name, model


def _jsonl(path, examples):
    path.write_text("".join(json.dumps({"text": ex.prompt, "label": ex.completion}) + "\n" for ex in examples))
    return path


CLS_ARGS = ["--task-type", "seq-cls", "--steps", "1", "--batch-size", "4", "--r", "4", "--target-modules", "query",
            "value", "--max-length", "32", "--quiet"]


def test_cli_train_on_a_classifier_keeps_its_label_order(tmp_path, capsys):
    """A classifier checkpoint whose id2label is (pos, neg) trains with that order: output 0 still means 'pos' (was:
    the data's names sorted, (neg, pos), relabelled the trained head's outputs, swapping every prediction)."""
    examples = _examples(30)
    tok = word_level_tokenizer(examples)
    folder, model = _classifier_folder(tmp_path, tok, ["pos", "neg"])
    data = _jsonl(tmp_path / "train.jsonl", examples)
    expected = evaluate_classification(model, tok, examples[27:], {"pos": 0, "neg": 1}, max_length=32)
    assert main(["train", *CLS_ARGS, "--model", str(folder), "--data", str(data), "--output",
                 str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "adapter" / "labels.json").read_text()) == {"labels": ["pos", "neg"]}
    before = json.loads((tmp_path / "out" / "summary.json").read_text())["before"]
    assert before == pytest.approx({k: expected[k] for k in before})
    assert "note:" not in capsys.readouterr().err


def test_cli_classifier_with_another_label_count_gets_a_new_head(tmp_path, capsys):
    """A classifier checkpoint with a 3-way head (A, B, C) trained on data labelled pos / neg: a new 2-way head, said
    in a note (was: transformers' size-mismatch RuntimeError traceback). Its adapter then evaluates on that same
    checkpoint with the head it saved; an adapter that saves no head is refused there, before the model loads."""
    examples = _examples(30)
    tok = word_level_tokenizer(examples)
    folder, _ = _classifier_folder(tmp_path, tok, ["A", "B", "C"])
    data = _jsonl(tmp_path / "train.jsonl", examples)
    assert main(["train", *CLS_ARGS, "--model", str(folder), "--data", str(data), "--output",
                 str(tmp_path / "out")]) == 0
    assert "its classification head has 3 outputs (A, B, C); the data's 2 labels ['neg', 'pos'] get a new head" in \
        capsys.readouterr().err
    adapter = tmp_path / "out" / "adapter"
    assert load_file(adapter / "adapter_model.safetensors")["base_model.model.classifier.weight"].shape == (2, 32)
    held_out = _jsonl(tmp_path / "held_out.jsonl", examples[27:])
    assert main(["eval", "--model", str(folder), "--adapter", str(adapter), "--data", str(held_out), "--json",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    after = json.loads((tmp_path / "out" / "summary.json").read_text())["after"]
    assert json.loads(printed[printed.index("{"):]) == pytest.approx({k: after[k] for k in ("accuracy", "f1", "mcc",
                                                                                               "exact_match", "n")})
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None}))
    assert main(["eval", "--model", str(folder), "--adapter", str(adapter), "--data", str(held_out)]) == 2
    assert "does not save the classification head" in capsys.readouterr().err


def test_checkpoints_of_a_classifier_evaluate_with_their_labels(tmp_path, capsys):
    """labels.json is written with every checkpoint and by the Python train() too (was: only `lorakit train`'s final
    adapter had it, so `lorakit eval --adapter run/checkpoint-N`, e.g. of a run stopped with Ctrl-C, was refused)."""
    examples = _examples(30)
    tok = word_level_tokenizer(examples)
    folder, model = _classifier_folder(tmp_path, tok, ["pos", "neg"])
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    train(model, tok, examples, TrainConfig(steps=2, batch_size=4, lr=5e-3, save_every=1,
                                            output_dir=str(tmp_path / "run")), progress=False)
    for adapter in ("checkpoint-1", "checkpoint-2", "adapter"):
        assert json.loads((tmp_path / "run" / adapter / "labels.json").read_text()) == {"labels": ["pos", "neg"]}
    held_out = _jsonl(tmp_path / "held_out.jsonl", examples[:6])
    expected = evaluate_classification(model, tok, examples[:6], {"pos": 0, "neg": 1})
    assert main(["eval", "--model", str(folder), "--adapter", str(tmp_path / "run" / "checkpoint-2"), "--data",
                 str(held_out), "--json", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):]) == pytest.approx(expected)
    # `lorakit generate` with a classifier prints each prompt's label (was: a causal-LM load that refused the
    # adapter's tensors as 'for a different base model')
    from lorakit.data.classification import predict_labels

    texts = [ex.prompt for ex in examples[:6]]
    predicted = predict_labels(model, tok, examples[:6], {"pos": 0, "neg": 1})
    assert main(["generate", "--model", str(folder), "--adapter", str(tmp_path / "run" / "adapter"),
                 *[a for t in texts for a in ("--prompt", t)]]) == 0
    lines = capsys.readouterr().out.splitlines()[-6:]
    assert lines == [f"{t}\t{['pos', 'neg'][i]}" for t, i in zip(texts, predicted)]


def test_integer_labels_order_the_head_by_number():
    """Class ids 0..11 give head output i to label i, as a transformers / PEFT user reads a classifier's logits
    (was: sorted as strings, so output 2 meant label 10)."""
    from lorakit.data.classification import label_names

    examples = [Example(f"text {i}", str(i % 12)) for i in range(24)]
    assert label_names(examples) == [str(i) for i in range(12)]
    assert label_names([Example("a", "-1"), Example("b", "10"), Example("c", "2")]) == ["-1", "2", "10"]
    assert label_names([Example("a", "10"), Example("b", "9"), Example("c", "x")]) == ["10", "9", "x"]  # not all ids


def test_cli_train_refuses_an_evaluation_label_the_head_lacks_before_loading(tmp_path, capsys, monkeypatch):
    """An evaluation example (here in the hold-out) whose label the training data lacks: refused by name before the
    model loads (was: after loading it, at the 'before' evaluation)."""
    import lorakit.hub

    examples = _examples(30)
    tok = word_level_tokenizer(examples)
    folder, _ = _classifier_folder(tmp_path, tok, ["neg", "pos"])
    data = _jsonl(tmp_path / "train.jsonl", [*examples, Example("good plot", "meh")])

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lorakit.hub, "load_model_and_tokenizer", no_load)
    assert main(["train", *CLS_ARGS, "--model", str(folder), "--data", str(data), "--output",
                 str(tmp_path / "out")]) == 2
    assert "evaluation example 2 has label 'meh', which is not one of the head's labels ['neg', 'pos']" in \
        capsys.readouterr().err


def test_cli_resumes_a_checkpoint_without_labels_json_in_the_string_order_it_was_trained_in(tmp_path, capsys):
    """A checkpoint written before labels.json was saved with checkpoints (older lorakit) trained its head in the
    labels' string order ('1', '10', '11', '2', ...): resuming it keeps that order (was: the new numeric order,
    so its head's trained outputs were read as other classes, silently)."""
    examples = [Example(ex.prompt, str(i % 12)) for i, ex in enumerate(_examples(36))]
    tok = word_level_tokenizer(examples)
    folder = tmp_path / "encoder"
    _tiny_classifier(tok).bert.save_pretrained(folder)
    tok.save_pretrained(folder)
    data = _jsonl(tmp_path / "train.jsonl", examples)
    common = [*CLS_ARGS[:2], *CLS_ARGS[4:], "--model", str(folder), "--data", str(data),
              "--save-every", "1"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", *common, "--steps", "1", "--output", str(first)]) == 0
    string_order = sorted(str(i) for i in range(12))
    assert json.loads((first / "checkpoint-1" / "labels.json").read_text()) == {"labels": [str(i) for i in range(12)]}
    # as an older lorakit wrote it: no labels.json, the head in string order
    (first / "checkpoint-1" / "labels.json").unlink()
    assert main(["train", *common, "--steps", "2", "--output", str(second), "--resume-from",
                 str(first / "checkpoint-1")]) == 0
    assert json.loads((second / "adapter" / "labels.json").read_text()) == {"labels": string_order}


def test_cli_eval_takes_a_peft_seq_cls_adapters_labels_from_id2label(tmp_path, capsys):
    """A SEQ_CLS adapter saved by real PEFT has no labels.json (PEFT writes adapter_config.json and the weights only).
    Was: `lorakit eval` refused it until a labels.json was written by hand. Now the labels are the id2label of a
    config.json beside the adapter, else of the base classifier's config, in id order (here "pos" before "neg": not
    the names' sorted order); the scores equal those of PEFT's own model. With neither, the error names the file."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    examples = _examples(30)
    tok = word_level_tokenizer(examples)
    folder, _ = _classifier_folder(tmp_path, tok, ["pos", "neg"])
    peft_model = get_peft_model(BertForSequenceClassification.from_pretrained(folder),
                                PeftLoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                                               init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    assert not (tmp_path / "peft" / "labels.json").exists()
    expected = evaluate_classification(peft_model.eval(), tok, examples, {"pos": 0, "neg": 1})
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": ex.prompt, "label": ex.completion}) + "\n" for ex in examples))

    def evaluate(model) -> tuple[int, dict | None, str]:
        code = main(["eval", "--model", str(model), "--adapter", str(tmp_path / "peft"), "--data", str(data),
                     "--json", "--quiet"])
        out, err = capsys.readouterr()
        return code, json.loads(out[out.index("{"):]) if code == 0 else None, err

    code, metrics, err = evaluate(folder)
    assert code == 0 and metrics == pytest.approx(expected)
    assert "its labels ['pos', 'neg'] are the id2label of the base" in err

    encoder = tmp_path / "encoder"  # a bare encoder (no classifier config): nothing names the head's outputs
    from transformers import BertModel

    BertModel(BertForSequenceClassification.from_pretrained(folder).config).save_pretrained(encoder)
    tok.save_pretrained(encoder)
    code, _, err = evaluate(encoder)
    assert code == 2 and f"Write {tmp_path / 'peft' / 'labels.json'} as" in err and "Traceback" not in err, err
    # a config.json saved beside the adapter names them (JSON keys are strings)
    (tmp_path / "peft" / "config.json").write_text(json.dumps({"id2label": {"1": "neg", "0": "pos"}}))
    code, metrics, err = evaluate(folder)
    assert code == 0 and metrics == pytest.approx(expected) and "id2label of " + str(tmp_path / "peft") in err


def test_a_classifiers_labels_are_read_once_per_config_file(tmp_path, monkeypatch):
    """eval / train / generate of a classifier asked hub.classifier_labels before the model loaded and
    load_model_and_tokenizer asked it again: two AutoConfig builds of one file (2-8 ms each here). Now one per
    config.json state; a rewritten config.json is read again."""
    import transformers

    from lorakit.hub import classifier_labels

    tok = word_level_tokenizer(_examples())
    folder, _ = _classifier_folder(tmp_path, tok, ["pos", "neg"])
    reads = []
    real = transformers.AutoConfig.from_pretrained.__func__
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        classmethod(lambda cls, path, **kw: reads.append(path) or real(cls, path, **kw)))
    assert classifier_labels(folder) == classifier_labels(str(folder)) == ["pos", "neg"]
    assert len(reads) == 1
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "negative", "1": "positive"}
    (folder / "config.json").write_text(json.dumps(config))
    assert classifier_labels(folder) == ["negative", "positive"] and len(reads) == 2
