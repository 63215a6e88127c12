"""Combine issue 19's LoRAM-with-alignment runs (JSONs copied into this folder) into
benchmarks/smaller_loram_aligned.json. From the repo root."""
import json
import os

D = "benchmarks/smaller_runs"
out = {"untrained_base_exact_match": 0.38,  # python benchmarks/smaller_runs/base_reverse.py (the same 50 test examples)
       "runs": []}
# run_set "first": issue 19's runs (the aligned ones while stdlib_texts read budget-sized windows, commit d05f7cb,
# reverted in 1ad70ce); "rerun": every row again with one code state, plus the 200-step row (benchmarks/smaller.md).
for name, command, run_set in (
        ("lora", "lorakit bench smaller --steps 80 --tasks reverse --only lora", "first"),
        ("loram", "lorakit bench smaller --steps 80 --tasks reverse --only loram", "first"),
        ("loram_aligned40", "python benchmarks/smaller_runs/loram_aligned_short.py 40 OUT", "first"),
        ("loram_aligned100", "python benchmarks/smaller_runs/loram_aligned_short.py 100 OUT", "first"),
        ("lora_loram_rerun", "lorakit bench smaller --steps 80 --tasks reverse --only lora loram", "rerun"),
        ("loram_aligned40_rerun", "python benchmarks/smaller_runs/loram_aligned_short.py 40 OUT", "rerun"),
        ("loram_aligned100_rerun", "python benchmarks/smaller_runs/loram_aligned_short.py 100 OUT", "rerun"),
        ("loram_aligned200", "lorakit bench smaller --steps 80 --tasks reverse --only loram_aligned", "rerun")):
    path = f"{D}/{name}.json"
    if os.path.exists(path):
        d = json.load(open(path))
        out["runs"] += [{**run, "command": command, "run_set": run_set, "align_steps": d["profile"]["align_steps"]
                         if run["variant"] == "loram_aligned" else None} for run in d["runs"]]
        out.setdefault("profile", d["profile"])
json.dump(out, open("benchmarks/smaller_loram_aligned.json", "w"), indent=2, sort_keys=True)
for run in out["runs"]:
    print(run["run_set"], run["variant"], run["align_steps"], run["exact_match"], run.get("exact_match_pruned"),
          run.get("align_eval_loss_after"))
