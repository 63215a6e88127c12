"""Evaluation: scoring on hand-written predictions, an oracle model, and a random tiny Llama."""

from __future__ import annotations

import torch

from lorakit.data import Example, evaluate_examples, get_task, score_predictions


def test_score_predictions_by_hand() -> None:
    examples = [
        Example("reverse: a b =>", " b a", "reverse"),
        Example("reverse: c d =>", " d c", "reverse"),
        Example("add: 1 + 2 =>", " 3", "add"),
        Example("free text", " yes"),
    ]
    result = score_predictions(examples, [" b a\n", "c d", "03", "yes "])
    assert result["n"] == 4
    assert result["exact_match"] == 0.75
    assert result["per_task"] == {
        "add": {"exact_match": 1.0, "n": 1},
        "default": {"exact_match": 1.0, "n": 1},
        "reverse": {"exact_match": 0.5, "n": 2},
    }


def test_score_strips_special_tokens_from_reference(tokenizer) -> None:
    result = score_predictions([Example("p", "two</s>")], ["two"], tokenizer)
    assert result["exact_match"] == 1.0


class OracleLM(torch.nn.Module):
    """Answers every prompt it was built for with the gold completion, then EOS, then junk."""

    def __init__(self, tokenizer, examples: list[Example]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.answers = {ex.prompt: tokenizer.encode(ex.completion, add_special_tokens=False) for ex in examples}

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        assert kwargs["do_sample"] is False
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            assert mask == sorted(mask), "prompts must be left-padded"
            prompt = self.tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
            new = (self.answers[prompt] + [eos_token_id] + [5, 6, 7] * max_new_tokens)[:max_new_tokens]
            rows.append(ids + new)
        return torch.tensor(rows)


def test_oracle_scores_one_and_wrong_oracle_scores_zero(tokenizer) -> None:
    examples = get_task("reverse").generate("test", 5, 0) + get_task("add").generate("test", 6, 0)
    result = evaluate_examples(OracleLM(tokenizer, examples), tokenizer, examples, batch_size=4,
                               return_predictions=True)
    assert result["exact_match"] == 1.0 and result["n"] == 11
    assert set(result["per_task"]) == {"reverse", "add"}
    assert [p.strip() for p in result["predictions"]] == [ex.completion.strip() for ex in examples]

    shifted = examples[1:] + examples[:1]
    wrong = [Example(ex.prompt, other.completion, ex.task) for ex, other in zip(examples, shifted)]
    result = evaluate_examples(OracleLM(tokenizer, wrong), tokenizer, examples)
    assert result["exact_match"] < 0.2


def test_random_tiny_llama(tokenizer, tiny_model) -> None:
    examples = get_task("sort").generate("test", 6, 0) + get_task("lookup").generate("test", 5, 0)
    padding_side = tokenizer.padding_side
    result = evaluate_examples(tiny_model, tokenizer, examples, batch_size=4, return_predictions=True)
    assert tokenizer.padding_side == padding_side
    assert result["n"] == 11 and 0.0 <= result["exact_match"] <= 1.0
    assert {name: r["n"] for name, r in result["per_task"].items()} == {"sort": 6, "lookup": 5}
    assert len(result["predictions"]) == 11 and all(isinstance(p, str) for p in result["predictions"])
    # Greedy decoding: the same inputs in another batching give the same outputs.
    again = evaluate_examples(tiny_model, tokenizer, examples[::-1], batch_size=3, return_predictions=True)
    assert again["predictions"] == result["predictions"][::-1]
