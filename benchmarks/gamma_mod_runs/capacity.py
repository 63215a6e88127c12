"""bench gamma_mod's gamma_mod_arank_mod row at another capacity_factor (argv[1]), 80 steps; writes argv[2].json."""
import json, sys
from dataclasses import replace
from lorakit.bench.gamma_mod import FULL, run_gamma_mod
result = run_gamma_mod(replace(FULL, variants=("gamma_mod_arank_mod",), capacity_factor=float(sys.argv[1])))
json.dump(result, open(sys.argv[2] + ".json", "w"), indent=1)
print(result)
