"""bench smaller's loram_aligned row with a shorter alignment (sys.argv[1] steps of 16 x 128 tokens), everything else
as `lorakit bench smaller --steps 80 --tasks reverse --only loram_aligned`; writes sys.argv[2] (JSON + .md)."""
import json, sys
from dataclasses import replace
from lorakit.bench.smaller import FULL, run_smaller, smaller_markdown
profile = replace(FULL, steps=80, tasks="reverse", variants=("loram_aligned",), align_steps=int(sys.argv[1]))
result = run_smaller(profile)
json.dump(result, open(sys.argv[2] + ".json", "w"), indent=1)
open(sys.argv[2] + ".md", "w").write(smaller_markdown(result))
print(smaller_markdown(result))
