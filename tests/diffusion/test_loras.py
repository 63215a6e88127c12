"""Data, concept-LoRA training and files: the saved concept LoRAs load in real ``peft`` on the diffusers UNet."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

pytest.importorskip("diffusers")

from lorakit.core.errors import ConfigError  # noqa: E402
from lorakit.core.routing import routing  # noqa: E402
from lorakit.diffusion import (ConceptSpec, LoraSpec, TrainSpec, UNetSpec, apply_styles, build_scheduler,  # noqa: E402
                               build_unet, load_base, load_digit_images, load_loras, train_base,
                               train_concept_loras)
from lorakit.diffusion.model import NULL_CLASS, concepts_by_name  # noqa: E402


def test_digits_ship_offline_and_styles_do_what_they_say():
    x, y = load_digit_images(16)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,) and set(y.tolist()) == set(range(10))
    assert x.min() >= -1 and x.max() <= 1
    thick = apply_styles(x[:50], ["thick"])
    assert (thick >= x[:50]).all() and (thick > 0).sum() > (x[:50] > 0).sum()  # dilation only adds ink
    torch.testing.assert_close(apply_styles(x[:5], ["inverted"]), -x[:5])
    # thick then inverted whatever the order given (dilation acts on the ink)
    torch.testing.assert_close(apply_styles(x[:5], ["inverted", "thick"]), -apply_styles(x[:5], ["thick"]))
    with pytest.raises(ConfigError, match="thick"):
        apply_styles(x[:1], ["thik"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("loras")
    unet = build_unet(UNetSpec(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4))
    base = copy.deepcopy(unet)
    summary = train_concept_loras(unet, build_scheduler(), [ConceptSpec("digit3", digit=3),
                                                            ConceptSpec("thick", styles=("thick",))],
                                  out, LoraSpec(r=2, lora_alpha=4), TrainSpec(steps=2, batch_size=2, lr=1e-2),
                                  log_every=0)
    return unet, base, out, summary


def test_concept_loras_train_together_and_change_the_output(trained):
    unet, base, out, summary = trained
    assert (out / "digit3" / "adapter_model.safetensors").is_file() and (out / "thick" / "adapter_config.json").is_file()
    assert summary["final_loss"] > 0
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor(400), torch.full((2,), NULL_CLASS)
    with torch.no_grad(), routing(adapter_names=["digit3", "thick"]):
        out_lora = unet(x, t, class_labels=y).sample
        out_base = base(x, t, class_labels=y).sample
    assert (out_lora - out_base).abs().amax(dim=(1, 2, 3)).min() > 0  # both LoRAs moved away from zero init


def test_saved_concept_loras_load_in_peft_with_identical_outputs(trained):
    from peft import PeftModel

    _, base, out, _ = trained
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor(250), torch.full((2,), NULL_CLASS)
    for name in ("digit3", "thick"):
        ours = copy.deepcopy(base)
        load_loras(ours, [out / name])
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(out / name)).eval()
        with torch.no_grad():
            a = ours(x, t, class_labels=y).sample
            b = theirs(x, t, class_labels=y).sample
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a, base(x, t, class_labels=y).sample)


def test_a_lora_of_another_model_names_its_folder(trained, tmp_path):
    """Loading several --lora folders, one made for a text model: the error names that folder (was: only the module
    problem, not which of the folders it was)."""
    import lorakit as lk
    from lk_models import tiny_llama

    text_model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lk.save_adapter(text_model, tmp_path / "text_lora")
    _, base, out, _ = trained
    # load_adapter names the folder itself now; load_loras adds "LoRA folder ..." only to errors that do not
    with pytest.raises(lk.LorakitError, match=re.escape(f"{tmp_path / 'text_lora'}: ")) as error:
        load_loras(copy.deepcopy(base), [out / "digit3", tmp_path / "text_lora"])
    assert str(out / "digit3") not in str(error.value)


def test_concept_spec_errors_name_the_problem():
    with pytest.raises(ConfigError, match="digit must be in 0..9"):
        ConceptSpec("digit12", digit=12)
    with pytest.raises(ConfigError, match="neither a digit nor a style"):
        ConceptSpec("nothing")
    with pytest.raises(ConfigError, match="thick"):
        ConceptSpec("x", styles=("thicc",))


def test_base_save_is_atomic(tmp_path, monkeypatch):
    """The base folder appears whole or not at all: a save that fails midway (the scheduler's write, after the
    UNet's) leaves the previous base loadable and no temp folder behind."""
    from diffusers import DDPMScheduler

    spec = UNetSpec(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
    one_step = TrainSpec(steps=1, batch_size=2)
    out = tmp_path / "base"
    train_base(out, spec, one_step, log_every=0)
    before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(DDPMScheduler, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        train_base(out, spec, TrainSpec(steps=1, batch_size=2, seed=1), log_every=0, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    unet, _ = load_base(out)
    assert json.loads((out / "base.json").read_text())["train"]["seed"] == 0 and unet.config.sample_size == 8


def test_python_training_refuses_a_non_empty_out_dir_without_overwrite(trained, tmp_path):
    """train_base / train_concept_loras replaced a non-empty out_dir silently while their commands refuse one
    without --overwrite: the same rule now, before any training."""
    from lorakit.core.errors import LorakitError

    unet, _, _, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    tiny = UNetSpec(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
    with pytest.raises(LorakitError, match=r"out_dir .*out already exists and is not empty; pass overwrite=True"):
        train_base(out, tiny, TrainSpec(steps=1, batch_size=2), log_every=0)
    with pytest.raises(LorakitError, match="pass overwrite=True"):
        train_concept_loras(unet, build_scheduler(), [ConceptSpec("digit3", digit=3)], out, LoraSpec(r=2),
                            TrainSpec(steps=1, batch_size=2), log_every=0)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    train_base(out, tiny, TrainSpec(steps=1, batch_size=2), log_every=0, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "base.json").is_file()


def test_cli_train_loras_unknown_concept_lists_valid_names(tmp_path, capsys):
    from lorakit.cli import main

    code = main(["diffusion", "train-loras", "--base", str(tmp_path / "nope"), "--concepts", "digit33"])
    err = capsys.readouterr().err
    assert code == 2 and "--concepts: unknown concept 'digit33'" in err and "Did you mean: digit3" in err
    assert "digit0 ... digit9" in err and "thin" in err and "train-base" not in err  # checked before the base loads
    assert [c.name for c in concepts_by_name(["digit3", "thin"])] == ["digit3", "thin"]


def test_cli_compose_image_same_lora_twice_names_the_argument(tmp_path, capsys):
    from lorakit.cli import main

    lora = str(tmp_path / "loras" / "digit3")
    code = main(["compose-image", "--base", str(tmp_path / "nope"), "--lora", lora, "--lora", lora + "/",
                 "--method", "merge"])
    err = capsys.readouterr().err
    assert code == 2 and f"--lora {lora}/ is given twice" in err and "delete_adapter" not in err
    code = main(["compose-image", "--base", str(tmp_path / "nope"), "--lora", lora,
                 "--lora", str(tmp_path / "other" / "digit3"), "--method", "merge"])
    err = capsys.readouterr().err
    assert code == 2 and "would both load as adapter 'digit3'" in err


def test_cli_compose_image_reports_a_missing_base(tmp_path, capsys):
    from lorakit.cli import main

    code = main(["compose-image", "--base", str(tmp_path / "nope"), "--lora", str(tmp_path / "l"), "--method", "cmlora"])
    assert code == 2 and "train-base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compose-image", "--lora", "x", "--method", "cmlor"])


@pytest.mark.slow
def test_cli_pipeline_end_to_end(tmp_path, capsys):
    """train-base → train-loras → train-classifier → compose-image (every method), at 1-2 steps each."""
    from lorakit.cli import main

    run = tmp_path / "run"
    assert main(["diffusion", "train-base", "--out", str(run / "base"), "--steps", "1", "--batch-size", "2"]) == 0
    assert main(["diffusion", "train-loras", "--base", str(run / "base"), "--out", str(run / "loras"), "--concepts",
                 "digit3", "thick", "--steps", "1", "--batch-size", "1"]) == 0
    assert main(["diffusion", "train-classifier", "--out", str(run / "classifier"), "--steps", "1"]) == 0
    loras = ["--lora", str(run / "loras" / "digit3"), "--lora", str(run / "loras" / "thick")]
    common = ["--base", str(run / "base"), *loras, "--num-images", "2", "--steps", "2",
              "--classifier", str(run / "classifier")]
    for method, extra in [("merge", []), ("switch", ["--switch-step", "1"]), ("composite", []),
                          ("cmlora", ["--cache-interval", "2", "--set", "profile_images=1", "--set", "profile_steps=1"]),
                          ("composer", ["--region", "0,0,1,0.5", "--region", "0,0.5,1,1", "--width", "32"])]:
        out = tmp_path / f"{method}.png"
        assert main(["compose-image", *common, "--method", method, *extra, "--out", str(out)]) == 0, method
        assert out.is_file()
    assert "concept rates: digit3" in capsys.readouterr().out


@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"), (".bmp", "BMP"), ("", "PNG")])
def test_grid_image_is_written_in_the_format_its_name_asks_for(tmp_path, suffix, fmt):
    """``--out thick3.jpg`` used to write PNG bytes under a .jpg name; the file's format follows its suffix
    (PIL's own extension table), no suffix keeps PNG, and no temp file is left beside it."""
    from PIL import Image

    from lorakit.diffusion.cli import _grid_png

    out = tmp_path / f"grid{suffix}"
    path = _grid_png(torch.zeros(3, 1, 4, 4), out, nrow=2)
    assert path == out and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    with Image.open(out) as img:
        assert img.format == fmt


def test_cli_compose_image_refuses_an_unknown_image_suffix_before_loading(tmp_path, capsys):
    from lorakit.cli import main

    code = main(["compose-image", "--base", str(tmp_path / "nope"), "--lora", str(tmp_path / "l"),
                 "--out", str(tmp_path / "grid.pgnn")])
    err = capsys.readouterr().err
    assert code == 2 and "--out" in err and ".pgnn" in err and "train-base" not in err
