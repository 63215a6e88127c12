"""Combine the γ-MoD runs (JSONs copied into this folder) into benchmarks/gamma_mod.json. From the repo root.

``runs``: before the fidelity fixes (ARank unbounded, every token routable, training top-k at inference, generation
without KV cache); ``after``: the method's new defaults (official block bounds, answer tokens kept, official
inference thresholds with KV-cache decoding), files ``after_*.json``; ``answers_only``: the same defaults before the
token predicting each answer token was kept too (and before a padded row routed as alone under the training top-k
at inference), files ``answers_only_*.json``."""
import json, os
old = json.load(open("benchmarks/gamma_mod_runs/original_run.json"))  # the run before the fix
runs = {}
def add(label, path, command, note):
    if not os.path.exists(path):
        return
    d = json.load(open(path))
    for row in d["rows"]:
        runs[label] = {**row, "command": command, "profile": d["profile"], "note": note}
old_rows = {r["method"]: r for r in old["rows"]}
runs["lora_80"] = {**old_rows["lora"], "command": old["command"], "profile": old["profile"],
                   "note": "LoRA code unchanged by this issue; row from the earlier run"}
runs["gamma_mod_80_whole_block_r"] = {**old_rows["gamma_mod"], "command": old["command"], "profile": old["profile"],
                                      "note": "before the fix: r weighted the whole block update"}
add("gamma_mod_80", "benchmarks/gamma_mod_runs/gamma_mod.json", "lorakit bench gamma_mod --only gamma_mod", "ARank blocks")
add("gamma_mod_arank_mod_80", "benchmarks/gamma_mod_runs/gamma_mod_arank_mod.json",
    "lorakit bench gamma_mod --only gamma_mod_arank_mod", "official arank_mod blocks")
add("gamma_mod_arank_mod_80_capacity_0.75", "benchmarks/gamma_mod_runs/arank_mod_cap075.json",
    "run_gamma_mod(replace(FULL, variants=('gamma_mod_arank_mod',), capacity_factor=0.75))", "capacity 0.75")
add("lora_160", "benchmarks/gamma_mod_runs/lora_160.json", "lorakit bench gamma_mod --only lora --steps 160", "160 steps")
add("gamma_mod_arank_mod_160", "benchmarks/gamma_mod_runs/gamma_mod_arank_mod_160.json",
    "lorakit bench gamma_mod --only gamma_mod_arank_mod --steps 160", "160 steps")
init = {"before_fix": json.load(open("benchmarks/gamma_mod_runs/init_diag_before_fix.json")),
        "after_fix": json.load(open("benchmarks/gamma_mod_runs/init_diag_after_fix.json")),
        "command": "python benchmarks/gamma_mod_runs/init_diag.py reverse,add OUT.json (bundled base, 40 test examples per task, "
                   "seed 1234; LoRA B = 0 and the router at its seed-0 init: no training)"}
after = {}
for label, note in [("lora", "LoRA, re-run: same numbers as lora_80"),
                    ("gamma_mod", "defaults: blocks by ARank within the official arank_mod bounds, answers kept"),
                    ("gamma_mod_arank_mod", "the official blocks named explicitly (same blocks as the default)"),
                    ("gamma_mod_unmasked", "keep_supervised=False: answer tokens routed too"),
                    ("gamma_mod_160", "defaults, 160 steps"), ("lora_160", "LoRA 160 steps, re-run")]:
    path = f"benchmarks/gamma_mod_runs/after_{label}.json"
    if os.path.exists(path):
        d = json.load(open(path))
        after[label] = {**d["rows"][0], "command": d["command"], "profile": d["profile"], "note": note}
answers_only = {}
for label in ("gamma_mod", "gamma_mod_arank_mod", "gamma_mod_unmasked", "gamma_mod_160"):
    path = f"benchmarks/gamma_mod_runs/answers_only_{label}.json"
    if os.path.exists(path):
        d = json.load(open(path))
        answers_only[label] = {**d["rows"][0], "command": d["command"], "profile": d["profile"],
                               "note": "before: only the answer tokens always kept, not the positions predicting them"}
json.dump({"machine": old["machine"], "runs": runs, "after": after, "answers_only": answers_only,
           "untrained_routing": init}, open("benchmarks/gamma_mod.json", "w"),
          indent=2, sort_keys=True)
for k, r in runs.items():
    print(k, r["exact_match"], round(r["test_loss"], 3), round(r["flops_ratio"], 3), round(r["final_train_loss"], 3))
for k, r in [*(("answers_only " + k, r) for k, r in answers_only.items()), *(("after " + k, r) for k, r in after.items())]:
    topk = r.get("topk_inference") or {}
    print(k, r["exact_match"], round(r["test_loss"], 3), round(r["flops_ratio"], 3),
          round(r.get("train_flops_ratio", 1.0), 3), topk.get("exact_match"), topk.get("flops_ratio"))
