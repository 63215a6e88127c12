"""γ-MoD's `lorakit bench methods` row with the faithful blocks (mod_layers=None: ARank within the official
arank_mod bounds, blocks 3, 4 of the bundled model) at the old registry variant's r=4 (lora_alpha 16, as the bench
set it): separates the block change from the r change in methods.md. Same profile as the table's rows.

    python benchmarks/methods_runs/gamma_mod_r4.py SEED OUT.json
"""
import dataclasses
import json
import sys

import lorakit
from lorakit.bench.methods import FULL, run_methods
from lorakit.core import registry

method = lorakit.get_method("gamma_mod")
registry._METHODS["gamma_mod"] = dataclasses.replace(method, bench_variants={"gamma_mod_r4": {"r": 4}})
profile = dataclasses.replace(FULL, tasks="reverse,rotate,sort,upper", steps=100, seeds=(int(sys.argv[1]),),
                              methods=("gamma_mod",), all_variants=False)
result = run_methods(profile)
result["command"] = f"python benchmarks/methods_runs/gamma_mod_r4.py {sys.argv[1]} {sys.argv[2]}"
json.dump(result, open(sys.argv[2], "w"), indent=1)
print(json.dumps(result["table"], indent=1))
