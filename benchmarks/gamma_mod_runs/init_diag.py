"""Exact match / test loss of the UNTRAINED bundled base wrapped by γ-MoD (LoRA B=0, router at init): how much
does routing alone cost before any training? Usage: python init_diag.py TASKS"""
import copy, json, sys
import torch
import lorakit as lk
from lorakit.bench.gamma_mod import TARGETS, _test_loss
from lorakit.data import evaluate_examples, load_examples
from lorakit.hub import load_model_and_tokenizer
from lorakit.methods.gamma_mod import GammaModConfig

tasks = sys.argv[1]
base, tok = load_model_and_tokenizer(None)
ev = load_examples(tasks, "test", n=40, seed=1234)
rows = {}
def run(name, model):
    model.eval()
    rows[name] = {"exact_match": evaluate_examples(model, tok, ev)["exact_match"], "test_loss": _test_loss(model, tok, ev)[0]}
    print(name, rows[name], flush=True)
run("base", copy.deepcopy(base))
for layers, cap in (([0, 1, 2], 0.5), ([0, 1, 2], 1.0), ([3, 4], 0.5), ([3, 4], 1.0)):
    m = copy.deepcopy(base)
    torch.manual_seed(0)
    lk.add_adapter(m, GammaModConfig(r=8, lora_alpha=16, target_modules=TARGETS, mod_layers=layers, capacity_factor=cap))
    run(f"gamma_mod layers={layers} capacity={cap}", m)
json.dump(rows, open(sys.argv[2], "w"), indent=1)
