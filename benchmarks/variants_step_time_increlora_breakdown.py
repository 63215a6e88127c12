"""Where IncreLoRA's extra step time goes: interleaved CPU-time ratios vs LoRA of ablated setups (same bench batch).

Run: PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/variants_step_time_increlora_breakdown.py ROUNDS OUT.json
"""
import copy, time, sys, statistics, json, torch
import lorakit as lk
from lorakit.core.model import adapter_state
from lorakit.data import CausalLMCollator, TokenizedDataset, load_examples
from lorakit.hub import load_model_and_tokenizer
from lorakit.training.config import TrainConfig
from lorakit.training.loop import make_optimizer
from lorakit.bench.methods import _config_for
from lorakit.methods.increlora import _deltas
torch.set_num_threads(1)
base, tok = load_model_and_tokenizer(None)
ex = load_examples("reverse,sort", "train", n=16, seed=0)
ds = TokenizedDataset(ex, tok, max_length=128)
batch = CausalLMCollator.from_tokenizer(tok)([ds[i] for i in range(len(ds))][:16])
inc = _config_for(lk.get_method("increlora"), "increlora_short", 4)
from dataclasses import replace
setups = {}
for name, cfg in [("lora", _config_for(lk.get_method("lora"), "lora", 4)), ("increlora", inc),
                  ("increlora reg_orth=0", replace(inc, reg_orth=0.0)), ("increlora after growth (no scoring)", inc)]:
    m = copy.deepcopy(base); torch.manual_seed(0)
    lk.add_adapter(m, cfg); m.train()
    if "after growth" in name:
        for _, d in _deltas(m, "default"):
            d.ranknum.fill_(4); d.finished.fill_(True)  # the budget spent: average rank = target_rank
    opt, _ = make_optimizer(m, "default", TrainConfig(lr=2e-3))
    setups[name] = (m, opt, lk.get_method(adapter_state(m).configs["default"]))
parts = ("fwd", "extra", "bwd", "opt", "on_step")
def step(name, s):
    m, opt, meth = setups[name]
    t = [time.thread_time()]
    loss = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    t.append(time.thread_time())
    if meth.extra_loss is not None:
        loss = loss + meth.extra_loss(m, "default")
    t.append(time.thread_time())
    loss.backward(); t.append(time.thread_time())
    opt.step(); opt.zero_grad(set_to_none=True); t.append(time.thread_time())
    if meth.on_step is not None:
        meth.on_step(m, "default", s, 100); lk.refresh_trainable(m)
    t.append(time.thread_time())
    return [b - a for a, b in zip(t, t[1:])]
rounds, per = int(sys.argv[1]), 3
for n in setups: step(n, 1)
acc = {n: [] for n in setups}
for k in range(rounds):
    for n in setups:
        for j in range(per):
            acc[n].append(step(n, 4 + (k * per + j) % 18))  # bench's timed steps 4..21
ref = acc["lora"]
out = {}
for n, ts in acc.items():
    med = {p: statistics.median(t[i] for t in ts) * 1e3 for i, p in enumerate(parts)}
    tot = [sum(t) for t in ts]
    ratio = statistics.median(a / b for a, b in zip(tot, [sum(t) for t in ref]))
    out[n] = {"ms": {p: round(v, 1) for p, v in med.items()}, "total_ms": round(statistics.median(tot) * 1e3, 1), "ratio": round(ratio, 3)}
    print(f"{n:40s} total {out[n]['total_ms']:7.1f} ms  ×LoRA {ratio:.3f}  ", out[n]["ms"])
json.dump(out, open(sys.argv[2], "w"), indent=1)
