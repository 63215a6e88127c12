"""Exact match of the untrained bundled base on bench smaller's test examples (reverse, 50, seed 0)."""
from lorakit.data import evaluate_examples, load_examples
from lorakit.hub import load_model_and_tokenizer
model, tok = load_model_and_tokenizer(None)
ev = load_examples("reverse", "test", n=50, seed=0)
print(evaluate_examples(model.eval(), tok, ev, batch_size=64))
