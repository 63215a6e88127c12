"""Combine issue 19's LoRAM-with-alignment runs (JSONs copied into this folder) into
benchmarks/smaller_loram_aligned.json. From the repo root."""
import json
import os

D = "benchmarks/smaller_runs"
out = {"untrained_base_exact_match": 0.38,  # python benchmarks/smaller_runs/base_reverse.py (the same 50 test examples)
       "runs": []}
for name, command in (
        ("lora", "lorakit bench smaller --steps 80 --tasks reverse --only lora"),
        ("loram", "lorakit bench smaller --steps 80 --tasks reverse --only loram"),
        ("loram_aligned40", "python benchmarks/smaller_runs/loram_aligned_short.py 40 OUT"),
        ("loram_aligned100", "python benchmarks/smaller_runs/loram_aligned_short.py 100 OUT")):
    path = f"{D}/{name}.json"
    if os.path.exists(path):
        d = json.load(open(path))
        out["runs"] += [{**run, "command": command, "align_steps": d["profile"]["align_steps"] if "aligned" in name
                         else None} for run in d["runs"]]
        out.setdefault("profile", d["profile"])
json.dump(out, open("benchmarks/smaller_loram_aligned.json", "w"), indent=2, sort_keys=True)
for run in out["runs"]:
    print(run["variant"], run["align_steps"], run["exact_match"], run.get("exact_match_pruned"),
          run.get("align_eval_loss_after"))
