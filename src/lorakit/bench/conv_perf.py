"""``lorakit bench perf`` rows: LoRA on a diffusers UNet2DModel's convolutions, lorakit vs PEFT, as ratios.

Rows (``--only conv``): forward with one adapter, training step (forward + MSE loss + backward + AdamW), and a
mixed batch of four adapters (``routing(adapter_names=...)``: one grouped convolution + bmm per layer, against
PEFT's ``adapter_names=`` loop over the adapters present). Same base, same adapter weights, same batch.
Registered in ``perf.EXTRA_ROWS`` when imported (by ``lorakit bench perf``); needs diffusers (``lorakit[diffusion]``).
"""

from __future__ import annotations

import copy

import torch

from .perf import EXTRA_ROWS
from .timing import ratio, time_interleaved

TARGETS = ["conv_in", "conv1", "conv2", "conv_shortcut", "conv", "conv_out"]
SIZES = {"unet-tiny": dict(block_out_channels=(8, 16), sample_size=8, norm_num_groups=4),
         "unet-32x32": dict(block_out_channels=(32, 64), sample_size=32, norm_num_groups=8)}


def _unet(size: str, device):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(in_channels=3, out_channels=3, layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, **SIZES[size]).to(device).eval()


def conv_perf_rows(profile, device) -> list[dict]:
    import peft

    import lorakit as lk

    size = "unet-tiny" if profile.batch <= 2 else "unet-32x32"
    try:
        base = _unet(size, device)
    except ImportError as e:
        return [{"row": "conv LoRA forward, one adapter", "model": size, "error": f"{e} (pip install 'lorakit[diffusion]')"}]
    r, names = profile.r, [f"a{i}" for i in range(4)]
    ours = copy.deepcopy(base)
    for i, name in enumerate(names):
        lk.add_adapter(ours, lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False),
                       name="default" if i == 0 else name)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    peft.set_peft_model_state_dict(theirs, lk.adapter_state_dict(ours, "default"))
    for name in names[1:]:
        theirs.add_adapter(name, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
        peft.set_peft_model_state_dict(theirs, lk.adapter_state_dict(ours, name), adapter_name=name)
    theirs.set_adapter("default")
    theirs.eval()  # PEFT refuses adapter_names= in training mode
    side = SIZES[size]["sample_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(profile.batch, 3, side, side, generator=g).to(device)
    t_in = torch.randint(0, 1000, (profile.batch,), generator=g).to(device)
    common = {"model": size, "batch": profile.batch, "r": r, "image": f"3x{side}x{side}"}
    rows = []

    with torch.inference_mode():
        diff = (ours(x, t_in).sample - theirs(x, t_in).sample).abs().max().item()
        t = time_interleaved({"base": lambda: base(x, t_in), "lorakit": lambda: ours(x, t_in),
                              "peft": lambda: theirs(x, t_in)}, repeats=profile.repeats)
    rows.append({"row": "conv LoRA forward, one adapter", **common, "max_abs_diff_vs_peft": diff, "times": t,
                 "lorakit/base": ratio(t["lorakit"], t["base"]), "peft/base": ratio(t["peft"], t["base"]),
                 "lorakit/peft": ratio(t["lorakit"], t["peft"])})

    rows_names = [(["default", *names[1:]])[i % 4] for i in range(profile.batch)]
    with torch.inference_mode():
        def mixed_ours():
            with lk.routing(adapter_names=rows_names):
                return ours(x, t_in).sample

        def mixed_theirs():
            return theirs(x, t_in, adapter_names=rows_names).sample

        diff = (mixed_ours() - mixed_theirs()).abs().max().item()
        t = time_interleaved({"base": lambda: base(x, t_in), "lorakit": mixed_ours, "peft": mixed_theirs},
                             repeats=profile.repeats)
    rows.append({"row": "conv LoRA mixed batch, 4 adapters", **common, "max_abs_diff_vs_peft": diff, "times": t,
                 "lorakit/base": ratio(t["lorakit"], t["base"]), "peft/base": ratio(t["peft"], t["base"]),
                 "lorakit/peft": ratio(t["lorakit"], t["peft"])})

    steps = {}
    for key, m in (("lorakit", ours), ("peft", theirs)):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m=m, opt=opt):
            m(x, t_in).sample.pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[key] = step
    t = time_interleaved(steps, repeats=profile.repeats)
    rows.append({"row": "conv LoRA training step", **common, "times": t, "lorakit/peft": ratio(t["lorakit"], t["peft"])})
    return rows


EXTRA_ROWS["conv"] = conv_perf_rows
