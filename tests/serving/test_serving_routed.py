"""A routed adapter (routed_lora) served by task key: each request's ``task`` is looked up in the adapter's saved
task index (``task_index.json``) and reaches the experts as ``lorakit.routing(keys=...)``. Greedy outputs equal
offline ``with lk.routing(keys=[id]): model.generate(...)``, in the engine (rows of both tasks and the base in one
batch) and through the real server with the real ``openai`` client; an unknown task, a missing task and a task
on an adapter without keys are 4xx errors naming the adapter's tasks."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.data import save_task_index
from lorakit.hub import load_model_and_tokenizer
from lorakit.methods.routed import RoutedLoraConfig
from lorakit.serving.engine import Engine
from lorakit.serving.sampling import SamplingParams
from lorakit.serving.store import AdapterStore, AdapterTaskError

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

TASKS = {"reverse": 0, "rotate": 1}
PROMPT = "The quick brown fox"


def bundled():
    return load_model_and_tokenizer()[0]


@pytest.fixture(scope="module")
def routed(tmp_path_factory, sh):
    """roots/: ``routed`` (routed_lora over two random LoRAs, saved with a task index) and ``plain`` (a LoRA)."""
    src, root = tmp_path_factory.mktemp("experts"), tmp_path_factory.mktemp("routed_root")
    experts = [str(sh.make_adapter(src / n, seed=60 + i, factory=bundled, r=4, target_modules=["q_proj", "v_proj"]))
               for i, n in enumerate(TASKS)]
    model = bundled()
    lk.add_adapter(model, RoutedLoraConfig(adapter_paths=experts, adapter_names=list(TASKS)), "m")
    lk.save_adapter(model, root / "routed", "m")
    save_task_index(root / "routed", TASKS)
    sh.make_adapter(root / "plain", seed=70, factory=bundled, r=4, target_modules=["q_proj", "v_proj"])
    reference = bundled()
    lk.load_adapter(reference, root / "routed", "routed")
    return root, reference


def offline(reference, tok, ids, key, max_tokens=8):
    """Greedy new tokens of the routed adapter with routing key ``key`` (None: adapters disabled)."""
    x = torch.tensor([ids])
    if key is None:
        with lk.disable_adapters(reference):
            out = reference.generate(x, max_new_tokens=max_tokens, do_sample=False)
    else:
        lk.set_adapter(reference, "routed")
        with lk.routing(keys=[key]):
            out = reference.generate(x, max_new_tokens=max_tokens, do_sample=False)
        lk.set_adapter(reference, [])
    new = out[0, len(ids):].tolist()
    return new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new


def test_engine_routes_rows_by_task_key(routed):
    root, reference = routed
    model, tok = load_model_and_tokenizer()
    store = AdapterStore(model, [root])
    store.register_dir(root)
    assert store.tasks == {"routed": TASKS} and "plain" not in store.tasks
    engine = Engine(model, tok, store=store, kv_cache_bytes=1 << 20, block_size=4, max_batch=8)
    prompts = [PROMPT, "Once upon a time", PROMPT, "1 2 3 4"]
    tasks = ["rotate", "reverse", "reverse", None]
    reqs = engine.generate(prompts, ["routed", "routed", "routed", None], SamplingParams(max_tokens=8), tasks=tasks)
    outs = []
    for p, t, r in zip(prompts, tasks, reqs):
        assert r.error is None, r.error
        want = offline(reference, tok, tok(p)["input_ids"], None if t is None else TASKS[t])
        assert r.output_ids == want, t
        outs.append(r.output_ids)
    assert outs[0] != outs[2]  # the two tasks' experts differ on the same prompt
    with pytest.raises(AdapterTaskError, match=r"unknown task 'rotat'.*reverse, rotate.*Did you mean: rotate"):
        engine.submit(PROMPT, "routed", task="rotat")
    with pytest.raises(AdapterTaskError, match=r"routes each request by its task key.*reverse, rotate"):
        engine.submit(PROMPT, "routed")
    with pytest.raises(AdapterTaskError, match="'plain' takes no task key"):
        engine.submit(PROMPT, "plain", task="rotate")
    assert engine.cache.used_blocks == 0


def test_choices_on_a_routed_adapter_keep_their_task(routed):
    """n seeded choices of one prompt on the routed adapter with a task key (Engine.submit_choices): they fork the
    prompt's prefill and each gives the tokens of a request alone with that task; a tight cache (6 blocks) preempts
    forked choices and they recompute with their task's expert."""
    root, _ = routed
    model, tok = load_model_and_tokenizer()
    store = AdapterStore(model, [root])
    store.register_dir(root)
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=12 + i, ignore_eos=True) for i in range(3)]
    alone_engine = Engine(model, tok, store=store, kv_cache_bytes=1 << 20, block_size=4, max_batch=8)
    alone = alone_engine.generate([PROMPT] * 3, ["routed"] * 3, params, tasks=["rotate"] * 3)
    layers, heads, dim = alone_engine.cache.geometry(model.config)
    for blocks in (64, 6):
        engine = Engine(model, tok, store=store, kv_cache_bytes=(blocks * 4 + 1) * 2 * layers * heads * dim * 4,
                        block_size=4, max_batch=4)
        got = engine.generate_choices(PROMPT, "routed", params, task="rotate")
        assert [r.output_ids for r in got] == [r.output_ids for r in alone], blocks
        assert engine.stats["forked"] > 0 and engine.cache.used_blocks == 0
    assert engine.stats["preemptions"] > 0
    other = engine.generate_choices(PROMPT, "routed", params[:1], task="reverse")[0]
    assert other.output_ids != got[0].output_ids  # the task chose the expert

def test_server_routes_requests_by_task(routed, sh):
    from lorakit.serving.server import create_app

    root, reference = routed
    model, tok = load_model_and_tokenizer()
    store = AdapterStore(model, [root])
    store.register_dir(root)
    server = sh.LiveServer(create_app(Engine(model, tok, store=store, kv_cache_bytes=1 << 20), model_name="bundled"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        for task, key in TASKS.items():
            r = client.completions.create(model="routed", prompt=PROMPT, max_tokens=8, temperature=0,
                                          extra_body={"task": task})
            want = offline(reference, tok, tok(PROMPT)["input_ids"], key)
            assert r.choices[0].text == tok.decode(want, skip_special_tokens=True), task
        messages = [{"role": "user", "content": "Name a colour."}]
        r = client.chat.completions.create(model="routed", messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"task": "rotate"})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert r.choices[0].message.content == tok.decode(offline(reference, tok, list(ids), 1),
                                                          skip_special_tokens=True)
        with pytest.raises(openai.BadRequestError, match=r"unknown task 'rotat'.*reverse, rotate.*Did you mean: rotate"):
            client.completions.create(model="routed", prompt=PROMPT, max_tokens=4, extra_body={"task": "rotat"})
        with pytest.raises(openai.BadRequestError, match=r"add .task. to the request; its tasks: reverse, rotate"):
            client.chat.completions.create(model="routed", messages=messages, max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="'plain' takes no task key"):
            client.completions.create(model="plain", prompt=PROMPT, max_tokens=4, extra_body={"task": "rotate"})
        with pytest.raises(openai.BadRequestError, match="must be a non-empty string"):
            client.completions.create(model="routed", prompt=PROMPT, max_tokens=4, extra_body={"task": 3})
    finally:
        server.stop()


def test_routed_lora_trained_on_a_subset_of_its_key_to_expert_serves_each_task_its_expert(tmp_path):
    """key_to_expert names reverse, rotate, sort; training saw rotate and sort only (task_index.json: rotate=0,
    sort=1). The layers read a bare id as a position among the mapping's names, so the store must send sort as 2:
    it sent the file's id 1, and sort got rotate's expert."""
    model = bundled()
    torch.manual_seed(5)  # before add_adapter: lora_A is drawn too (the test depended on the order it ran in)
    lk.add_adapter(model, RoutedLoraConfig(num_experts=3, expert_r=[2, 2, 2], target_modules=["q_proj", "v_proj"],
                                           key_to_expert={"reverse": 0, "rotate": 1, "sort": 2}), "m")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lk.save_adapter(model, tmp_path / "routed", "m")
    save_task_index(tmp_path / "routed", {"rotate": 0, "sort": 1})
    reference = bundled()
    lk.load_adapter(reference, tmp_path / "routed", "routed")
    lk.set_adapter(reference, [])
    served, tok = load_model_and_tokenizer()
    store = AdapterStore(served, [tmp_path])
    store.register_dir(tmp_path)
    engine = Engine(served, tok, store=store, kv_cache_bytes=1 << 20, block_size=4, max_batch=4)
    reqs = engine.generate([PROMPT, PROMPT], ["routed", "routed"], SamplingParams(max_tokens=6), tasks=["sort", "rotate"])
    ids = tok(PROMPT)["input_ids"]
    want = [offline(reference, tok, ids, task, 6) for task in ("sort", "rotate")]  # string keys: looked up by name
    assert want[0] != want[1]
    assert [r.output_ids for r in reqs] == want
