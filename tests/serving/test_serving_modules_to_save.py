"""modules_to_save in serving banks (issue 10, faults 6 and 8): a whole trained Linear / Embedding copy is banked as
an exact delta, so each row equals its adapter loaded alone with lorakit.load_adapter (and the base for None)."""

from __future__ import annotations

import torch

import lorakit as lk
from lorakit import serving
from lk_models import tiny_llama


def _saved(tmp_path, name, seed, save):
    model = tiny_llama()
    torch.manual_seed(seed)
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False,
                                        modules_to_save=save), name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".copies." in n:
                p.add_(0.1 * torch.randn_like(p))
    return lk.save_adapter(model, tmp_path / name, name)


def test_banked_modules_to_save_equal_each_adapter_alone(tmp_path, ids):
    dirs = {"head": _saved(tmp_path, "head", 1, ["lm_head"]), "emb": _saved(tmp_path, "emb", 2, ["embed_tokens"])}
    model = tiny_llama()
    serving.load_adapters(model, dirs)
    names = ["emb", None, "head"]
    with torch.no_grad(), serving.bank_routing(model, names):
        got = model(input_ids=ids).logits
    for i, n in enumerate(names):
        alone = tiny_llama() if n is None else lk.load_adapter(tiny_llama(), dirs[n], n)
        with torch.no_grad():
            assert (got[i] - alone(input_ids=ids[i:i + 1]).logits[0]).abs().max() <= 1e-5, n
    kw = dict(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    out = serving.generate(model, ids[:2, :4], ["head", "emb"], **kw)
    for i, n in enumerate(["head", "emb"]):
        assert torch.equal(out[i:i + 1], lk.load_adapter(tiny_llama(), dirs[n], n).generate(input_ids=ids[i:i + 1, :4], **kw))
