"""ICM-LoRA (arXiv 2501.17635): CVAE loss vs the official formula, flattening, generator save/load, generated
adapters loading in lorakit and the real peft, and bad collections / tasks. Tiny CVAEs on the bundled base."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.compose.icm_lora import (AdapterLayout, CvaeConfig, LoraCvae, denormalize, flatten_tensors, kl_divergence,
                                      normalize, tensor_stats, unflatten_tensors)
from lorakit.compose.icm_lora_generator import (ANY_TASK, IcmLoraConfig, IcmLoraGenerator, generate_adapter,
                                                read_collection, train_icm_lora)
from lorakit.core.errors import AdapterError, ConfigError
from lorakit.data.keys import save_task_index
from lorakit.hub import load_model_and_tokenizer

TINY = dict(cvae=CvaeConfig(latent_dim=8, channels=(4, 4), divide_slice_length=4), epochs=2, n_shots=2, n_queries=2)


# ---------------------------------------------------------------- the CVAE


def _tiny_cvae(input_length: int, kld_weight: float = 0.005) -> LoraCvae:
    return LoraCvae(CvaeConfig(latent_dim=2, channels=(2, 2), divide_slice_length=4, kld_weight=kld_weight),
                    input_length, condition_dim=3)


def test_icm_lora_loss_matches_official_formula_by_hand():
    # model/CVAE_design.py l.120-122 (YihuaJerry/ICM-LoRA @ 0b0057c):
    #   recons_loss = F.mse_loss(recons, padded_x, reduction='mean')
    #   kld_loss = mean_b(-0.5 * sum_j(1 + log_var - mu**2 - exp(log_var)))
    #   loss = recons_loss + kld_weight * kld_loss
    cvae = _tiny_cvae(4)
    x = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    recons = torch.zeros(2, 4)
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    log_var = torch.tensor([[0.0, 0.0], [math.log(2.0), 0.0]])
    loss, recon, kld = cvae.loss(recons, x, mu, log_var)
    # recon: (1 + 0 + 1 + 4 + 0·4) / 8 = 0.75
    # kld row 1: -0.5·((1+0-1-1) + (1+0-0-1)) = 0.5; row 2: -0.5·((1+ln2-0-2) + (1+0-4-1)) = 2.5 - ln2/2
    want_kld = (0.5 + 2.5 - math.log(2.0) / 2) / 2
    assert recon.item() == pytest.approx(0.75)
    assert kld.item() == pytest.approx(want_kld, rel=1e-6)
    assert loss.item() == pytest.approx(0.75 + 0.005 * want_kld, rel=1e-6)
    assert kl_divergence(mu, log_var).item() == pytest.approx(want_kld, rel=1e-6)


def test_icm_lora_loss_compares_with_the_zero_padded_input():
    # CVAE_design.py l.19-20, 60-72: the input is padded with zeros to a multiple of divide_slice_length.
    cvae = _tiny_cvae(3, kld_weight=0.0)
    loss, recon, _ = cvae.loss(torch.tensor([[0.0, 0.0, 0.0, 5.0]]), torch.tensor([[1.0, -1.0, 2.0]]),
                               torch.zeros(1, 2), torch.zeros(1, 2))
    assert recon.item() == pytest.approx((1 + 1 + 4 + 25) / 4)
    assert loss.item() == recon.item()


def test_icm_lora_cvae_shapes_and_official_sizes():
    cvae = _tiny_cvae(5)
    assert cvae.padded_length == 8 and cvae.last_length == 2
    x, c = torch.randn(3, 5), torch.randn(3, 3)
    mu, log_var = cvae.encode(x, c)
    assert mu.shape == log_var.shape == (3, 2)
    assert cvae.decode(mu, c).shape == (3, 8)
    loss, _, _ = cvae(x, c)
    loss.backward()
    assert all(p.grad is not None for p in cvae.parameters())
    # The official default: 1,929,928 values padded to 1,929,928 -> 1,933,312 (472·4096), 12 halvings -> 472.
    official = LoraCvae(CvaeConfig(), 1_929_928, 768)
    assert official.padded_length == 472 * 4096 and official.last_length == 472
    assert official.to_latent.in_features == 472 * 8 and official.fc_mu.in_features == 256 + 768


def test_icm_lora_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="divide_slice_length"):
        CvaeConfig(channels=(8, 8, 8), divide_slice_length=4)
    with pytest.raises(ConfigError, match="kernel_size"):
        CvaeConfig(kernel_size=4)
    with pytest.raises(ConfigError, match="epochs"):
        IcmLoraConfig(epochs=0)


def test_icm_lora_flatten_unflatten_round_trip_is_exact():
    g = torch.Generator().manual_seed(0)
    tensors = {"b.lora_B.weight": torch.randn(6, 2, generator=g), "a.lora_A.weight": torch.randn(2, 5, generator=g),
               "c.lora_A.weight": torch.full((2, 3), 0.25)}
    layout = AdapterLayout.of(tensors)
    assert layout.keys == sorted(tensors) and layout.length == 12 + 10 + 6
    flat = flatten_tensors(tensors, layout)
    back = unflatten_tensors(flat, layout)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    means, stds = tensor_stats(tensors, layout)
    z = normalize(flat, layout, means, stds)
    first = z[:10]  # a.lora_A.weight, normalised on its own (normalizeLoraWeight_small.py l.34)
    assert first.mean().abs() < 1e-6 and first.std().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(z[22:], torch.zeros(6))  # a constant tensor (std 0) maps to zeros, and back to its mean
    assert torch.allclose(denormalize(z, layout, means, stds), flat, atol=1e-6)
    with pytest.raises(ValueError, match="28 values"):
        unflatten_tensors(flat[:-1], layout)


# ---------------------------------------------------------------- collections on the bundled base


@pytest.fixture(scope="module")
def base():
    return load_model_and_tokenizer(None)


def _adapter(base, path, task, seed, r=2, targets=("q_proj",)):
    model, _ = base
    torch.manual_seed(seed)
    lk.add_adapter(model, lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False),
                   name="icm_tmp")
    lk.save_adapter(model, path, name="icm_tmp")
    lk.delete_adapter(model, "icm_tmp")
    if task is not None:
        save_task_index(path, {task: 0})
    return str(path)


@pytest.fixture(scope="module")
def collection(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("icm")
    return [_adapter(base, root / f"{task}-{seed}", task, seed)
            for task in ("rotate", "rotate2") for seed in (0, 1)]


@pytest.fixture(scope="module")
def generator(base, collection, tmp_path_factory):
    gen = train_icm_lora(collection, IcmLoraConfig(**TINY), model=base[0], tokenizer=base[1])
    return gen.save(tmp_path_factory.mktemp("gen") / "g")


def test_icm_lora_generator_round_trip(generator, collection):
    gen = IcmLoraGenerator.load(generator)
    assert sorted(gen.conditions) == ["rotate", "rotate2"] and ANY_TASK in gen.stats
    assert gen.conditions["rotate"].shape == (256,) and len(gen.history) == 2
    samples, _ = read_collection(collection)
    rec = gen.reconstruct(samples[0].tensors, samples[0].task)
    assert set(rec) == set(samples[0].tensors)
    a = gen.generate(gen.conditions["rotate"], gen.stats["rotate"], n=2, seed=3)
    b = IcmLoraGenerator.load(generator).generate(gen.conditions["rotate"], gen.stats["rotate"], n=2, seed=3)
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])  # same seed, same adapter
    key = next(iter(a[0]))
    assert not torch.equal(a[0][key], a[1][key])  # two draws of z differ


@pytest.mark.parametrize("task", ["rotate2", "rotate3"])  # seen, and an offset the collection does not have
def test_icm_lora_generated_adapter_loads_in_lorakit_and_peft(base, generator, task, tmp_path):
    peft = pytest.importorskip("peft")
    out = generate_adapter(generator, task, tmp_path / "out", model=base[0], tokenizer=base[1])
    assert json.loads((out / "icm_lora_generation.json").read_text())["seen_task"] is (task == "rotate2")
    ids = torch.tensor([[0, 5, 9, 14, 3, 7]])
    assert not lk.adapter_names(base[0])
    fresh = copy.deepcopy(base[0])
    with torch.no_grad():
        plain = fresh(input_ids=ids).logits
        lk.load_adapter(fresh, out)
        ours = fresh(input_ids=ids).logits
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base[0]), str(out)).eval()
    with torch.no_grad():
        theirs = ref(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-4)  # the generated delta is not zero


def test_icm_lora_generate_adapter_refuses_an_existing_folder_without_overwrite(base, generator, tmp_path):
    """The Python function wrote into an existing folder silently (old files left beside the new adapter) while
    ``lorakit generate-adapter`` refused it without --overwrite: now the same rule, and overwrite=True replaces the
    folder whole."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(lk.LorakitError, match=r"output .*out already exists and is not empty; pass overwrite=True"):
        generate_adapter(generator, "rotate2", out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written, nothing lost
    with pytest.raises(lk.LorakitError, match="holds the input"):  # the generator's own folder is never replaced
        generate_adapter(generator, "rotate2", Path(generator).parent, overwrite=True)
    generate_adapter(generator, "rotate2", out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "adapter_config.json").is_file()


def test_icm_lora_collection_with_other_targets_names_the_tensor(base, collection, tmp_path):
    odd = _adapter(base, tmp_path / "odd", "rotate", 0, targets=("v_proj",))
    with pytest.raises(AdapterError, match=r"tensor '.*q_proj.lora_A.weight' is in .* but not in .*odd"):
        read_collection([collection[0], odd])


def test_icm_lora_collection_with_other_rank_names_the_tensor(base, collection, tmp_path):
    odd = _adapter(base, tmp_path / "r4", "rotate", 0, r=4)
    with pytest.raises(AdapterError, match=r"tensor '.*lora_A.weight' has shape \(2, 256\) .* but \(4, 256\)"):
        read_collection([collection[0], odd])


def test_icm_lora_collection_task_from_spec_or_error(base, tmp_path):
    bare = _adapter(base, tmp_path / "bare", None, 0)
    with pytest.raises(AdapterError, match="TASK="):
        read_collection([bare])
    samples, config = read_collection([f"rotate4={bare}"])
    assert samples[0].task == "rotate4" and config["r"] == 2


def test_icm_lora_collection_with_a_mistyped_folder_lists_the_near_ones(collection):
    """Was "runs/c/rotat2: no adapter here (no adapter_config.json, ...)": a folder that does not exist at all was
    described as an empty one, with no word of the folder one letter off beside it."""
    mistyped = collection[0].replace("rotate-0", "rotat-0")
    with pytest.raises(lk.AdapterLoadError, match=re.escape(f"{mistyped} does not exist. Did you mean: {collection[0]}")):
        read_collection([mistyped, collection[2]])


def test_icm_lora_collection_of_another_method_or_dora_is_refused(base, collection, tmp_path):
    from lorakit.methods.increlora import IncreLoraConfig

    model, _ = base
    lk.add_adapter(model, IncreLoraConfig(r=2, target_rank=2, target_modules=["q_proj"]), name="icm_odd")
    lk.save_adapter(model, tmp_path / "incre", name="icm_odd")
    lk.delete_adapter(model, "icm_odd")
    with pytest.raises(AdapterError, match="plain LoRA.*increlora"):
        read_collection([collection[0], f"rotate={tmp_path / 'incre'}"])
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), name="icm_odd")
    lk.save_adapter(model, tmp_path / "dora", name="icm_odd")
    lk.delete_adapter(model, "icm_odd")
    with pytest.raises(AdapterError, match="DoRA"):
        read_collection([f"rotate={tmp_path / 'dora'}"])


def test_icm_lora_collection_refuses_an_adapter_for_a_changed_base(collection, tmp_path):
    """A PiSSA / OLoRA adapter file (init_lora_weights "pissa": PEFT's and lorakit's on-disk form) holds factors for
    the residual base its init left; read as a plain LoRA of the untouched base it is another adapter (break32 found
    the same fault in merging, serving, LoRAM and mixture sources)."""
    import shutil

    for spec in ("pissa", "olora", "pissa_niter_4"):
        folder = tmp_path / spec
        shutil.copytree(collection[0], folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": spec}))
        with pytest.raises(AdapterError, match=f"init_lora_weights='{spec}' moved part of the base"):
            read_collection([collection[0], f"rotate={folder}"])


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_icm_lora_temperature_must_be_finite_and_non_negative(generator, tmp_path, temperature):
    with pytest.raises(ValueError, match="temperature"):
        generate_adapter(generator, "rotate", tmp_path / "t", temperature=temperature)
    assert not (tmp_path / "t").exists()


def test_icm_lora_unknown_task_names_near_matches(generator, collection, tmp_path):
    """A mistyped task is lorakit's ConfigError (was: a plain ValueError) with core's near-match hint, in
    generate_adapter and in train_icm_lora (before any model loads: none is given here)."""
    with pytest.raises(lk.ConfigError, match="Did you mean: rotate3"):
        generate_adapter(generator, "rotat3", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(lk.ConfigError, match=rf"unknown task 'revers'. Did you mean: reverse\?.*adapter {collection[0]}"):
        train_icm_lora([f"revers={collection[0]}", *collection[1:]])


def test_icm_lora_cli_train_names_an_unknown_task_before_the_model_loads(collection, tmp_path, capsys, monkeypatch):
    """Was: a typo in TASK=DIR was found only after the base model loaded, when its task vector was computed."""
    import lorakit.compose.icm_lora_generator as icm

    loaded = []
    monkeypatch.setattr(icm, "_base_model", lambda *a: loaded.append(a) or pytest.fail("the base model loaded"))
    assert main(["generate-adapter", "train", "--adapters", f"rotat3={collection[0]}", *collection[1:],
                 "--output", str(tmp_path / "g"), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'rotat3'. Did you mean: rotate3" in err and f"adapter {collection[0]}" in err, err
    assert "Traceback" not in err
    assert loaded == [] and not (tmp_path / "g").exists()


def test_icm_lora_cli_train_and_generate(collection, tmp_path, capsys):
    gen = tmp_path / "gen"
    assert main(["generate-adapter", "train", "--adapters", *collection, "--output", str(gen), "--epochs", "1",
                 "--latent-dim", "8", "--channels", "4", "4", "--divide-slice-length", "4", "--n-shots", "2",
                 "--n-queries", "2", "--quiet"]) == 0
    assert main(["generate-adapter", "--task", "rotate", "--generator", str(gen), "--output", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert main(["generate-adapter", "--task", "rotat", "--generator", str(gen), "--output", str(tmp_path / "b")]) == 2
    assert "Did you mean" in capsys.readouterr().err


def test_icm_lora_cli_overwrite_replaces_the_output_folder_whole(generator, tmp_path, capsys):
    """--overwrite says 'replace an existing --output folder' (as merge-adapters and transfer do); generate-adapter
    wrote into it instead, so an old run's files stayed beside the new adapter."""
    out = tmp_path / "a"
    out.mkdir()
    (out / "old_metrics.jsonl").write_text("{}\n")
    assert main(["generate-adapter", "--task", "rotate", "--generator", str(generator), "--output", str(out),
                 "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "icm_lora_generation.json"]
    # an output folder that holds the generator would delete it
    assert main(["generate-adapter", "--task", "rotate", "--generator", str(generator),
                 "--output", str(Path(generator).parent), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err and Path(generator).is_dir()


def test_icm_lora_unseen_task_on_a_base_of_another_width_is_named(generator, tmp_path, capsys):
    """The generator's collection is on ``bundled`` (hidden 256); ``--model bundled-small`` (hidden 192) reads the
    unseen task into a 192-value vector, which was a RuntimeError traceback (mat1 and mat2 shapes) in the CVAE."""
    out = tmp_path / "g"
    code = main(["generate-adapter", "--task", "rotate3", "--generator", str(generator), "--output", str(out),
                 "--model", "bundled-small"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "has 192 values" in err and "task vectors of 256" in err and "--model" in err
    assert not out.exists()


def test_icm_lora_reconstruct_with_an_unknown_task_names_the_tasks(generator, collection):
    gen = IcmLoraGenerator.load(generator)
    samples, _ = read_collection(collection)
    with pytest.raises(AdapterError, match=r"no task 'rotate3' .*'rotate', 'rotate2'.*Did you mean"):
        gen.reconstruct(samples[0].tensors, "rotate3")


def test_icm_lora_cli_mistyped_subcommand_is_named(tmp_path, capsys):
    """``generate-adapter trian --adapters ...`` said ``--task, --generator`` were required and suggested
    ``--task`` for ``--adapters``; the typo itself was never named."""
    with pytest.raises(SystemExit) as exit_info:
        main(["generate-adapter", "trian", "--adapters", str(tmp_path), "--output", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown subcommand 'trian'" in err and "Did you mean: train?" in err
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("damage", ["no_config_section", "layout_cut", "condition_dim_string"])
def test_icm_lora_damaged_generator_config_names_the_file(generator, tmp_path, capsys, damage):
    """A generator whose icm_lora_config.json lost a section was a KeyError traceback; one whose layout lost a
    tensor loaded and then failed in generation with a RuntimeError (repeats size) traceback."""
    import shutil

    gen = tmp_path / "gen"
    shutil.copytree(generator, gen)
    meta = json.loads((gen / "icm_lora_config.json").read_text())
    if damage == "no_config_section":
        del meta["config"]
    elif damage == "layout_cut":  # the last two tensors as one of the same total size: the CVAE still loads
        (key, a), (_, b) = meta["layout"][-2:]
        meta["layout"] = meta["layout"][:-2] + [[key, [math.prod(a) + math.prod(b)]]]
    else:
        meta["condition_dim"] = "wide"
    (gen / "icm_lora_config.json").write_text(json.dumps(meta))
    code = main(["generate-adapter", "--task", "rotate", "--generator", str(gen), "--output", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(gen / "icm_lora") in err, err
    assert not (tmp_path / "a").exists()


def test_icm_lora_cli_output_that_is_an_input_is_refused(generator, collection, tmp_path, capsys):
    """``--output`` = ``--generator`` with --overwrite replaced the generator by the adapter it generated (and
    ``train --output`` = a collection folder replaced that adapter by the generator): both inputs were lost."""
    import shutil

    gen = tmp_path / "gen"
    shutil.copytree(generator, gen)
    code = main(["generate-adapter", "--task", "rotate", "--generator", str(gen), "--output", str(gen),
                 "--overwrite"])
    assert code == 2 and f"--output {gen} is the --generator folder" in capsys.readouterr().err
    assert (gen / "icm_lora_config.json").is_file() and not (gen / "adapter_config.json").exists()
    member = tmp_path / "member"
    shutil.copytree(collection[0], member)
    code = main(["generate-adapter", "train", "--adapters", str(member), *collection[1:], "--output", str(member),
                 "--overwrite", "--epochs", "1", "--quiet"])
    assert code == 2 and "is an adapter of the collection" in capsys.readouterr().err
    assert (member / "adapter_config.json").is_file() and not (member / "icm_lora_config.json").exists()


def test_icm_lora_collection_with_an_adapter_given_twice_is_refused(collection, tmp_path):
    """The same folder twice (or a run folder and one of its checkpoints) trained the CVAE on duplicated samples,
    silently weighing that adapter double."""
    with pytest.raises(AdapterError, match="in the collection twice"):
        read_collection([collection[0], collection[1], collection[0] + "/"])
    run = tmp_path / "run"
    import shutil

    for step in (1, 2):
        shutil.copytree(collection[step - 1], run / f"checkpoint-{step}")
    with pytest.raises(AdapterError, match="checkpoint-2 is in the collection twice"):
        read_collection([str(run), f"rotate={run / 'checkpoint-2'}"])
    assert len(read_collection([str(run), *collection[2:]])[0]) == 4
