"""Multi-LoRA composition during sampling, on a tiny diffusers UNet2DModel (8×8, random LoRAs, 3 steps).

Every reference below is computed from separate single-LoRA forwards (``set_adapter`` one LoRA at a time, no
per-row routing) and the papers' equations / official code, cited per test; the methods under test run all LoRAs
in one routed batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from lorakit.core.model import add_adapter, disable_adapters, set_adapter  # noqa: E402
from lorakit.core.errors import ConfigError  # noqa: E402
from lorakit.core.routing import routing  # noqa: E402
from lorakit.diffusion import (LORA_TARGETS, NULL_CLASS, UNetSpec, build_scheduler, build_unet,  # noqa: E402
                               compose_images, make_config, sampling_scheduler)
from lorakit.diffusion.methods.cmlora import (cmlora_schedule, dominant_weights, frequency_order,  # noqa: E402
                                              mean_relative_log_amplitude, refresh_steps)
from lorakit.diffusion.methods.composer import RegionSelfAttention, isolation_bias, region_masks  # noqa: E402
from lorakit.diffusion.methods.switch import switch_schedule  # noqa: E402
from lorakit.diffusion.unet_cache import cached_unet_forward  # noqa: E402
from lorakit.methods.lora import LoraConfig  # noqa: E402

STEPS, N = 3, 2


@pytest.fixture(scope="module")
def unet():
    model = build_unet(UNetSpec(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4))
    model.eval()
    for i, name in enumerate(["a", "b", "c"]):
        torch.manual_seed(10 + i)
        add_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False), name)
    return model


def _sched():
    return sampling_scheduler(build_scheduler(), "ddim")


def _reference_loop(unet, eps_fn, *, seed=0, label=NULL_CLASS, width=8):
    """The diffusers sampling loop, with ``eps_fn(step, t, x, labels)`` giving the guided ε."""
    sched = _sched()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((N, 1, 8, width), generator=g)
    sched.set_timesteps(STEPS)
    x = x * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        x = sched.step(eps_fn(i, t, sched.scale_model_input(x, t)), t, x).prev_sample
    return x.clamp(-1, 1)


def _single(unet, name, x, t, label, w):
    """Guided ε of one LoRA (or the base for None) by plain forwards: ε(∅) + w (ε(c) − ε(∅))."""
    def fwd(labels):
        if name is None:
            with disable_adapters(unet):
                return unet(x, t, class_labels=labels).sample
        set_adapter(unet, name)
        return unet(x, t, class_labels=labels).sample

    cond = fwd(torch.full((N,), label))
    if w <= 1:
        return cond
    uncond = fwd(torch.full((N,), NULL_CLASS))
    return uncond + w * (cond - uncond)


@torch.no_grad()
def test_composite_is_the_mean_of_the_per_lora_guided_predictions(unet):
    # Zhong et al. arXiv:2402.16843 Eq. 4-5; official pipeline/pipeline_0.26.3.py l.1037-1071 (mean over LoRAs of
    # uncond and cond, then guidance — equal to the mean of guided predictions by linearity).
    w, label = 3.0, 4
    ref = _reference_loop(unet, lambda i, t, x: torch.stack([_single(unet, n, x, t, label, w) for n in "ab"]).mean(0))
    got = compose_images(unet, _sched(), ["a", "b"], "composite", num_images=N, num_inference_steps=STEPS,
                         guidance_scale=w, class_label=label)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _official_switch(num_steps, loras, switch_step):
    """Multi-LoRA-Composition callbacks.py l.4-12 replayed: the active LoRA used at each step."""
    active, used = loras[0], []
    for step_index in range(num_steps):
        used.append(active)
        if step_index > 0 and step_index % switch_step == 0:
            for cur, lora in enumerate(loras):
                if lora == active:
                    active = loras[(cur + 1) % len(loras)]
                    break
    return used


@torch.no_grad()
def test_ddpm_sampling_noise_comes_from_the_seed(unet):
    # A stochastic sampler's per-step noise is drawn from the run's seeded generator, as diffusers pipelines pass
    # `generator` to scheduler.step (DiffusionPipeline.prepare_extra_step_kwargs; DDPMScheduler.step draws its
    # variance noise with randn_tensor(..., generator=generator)). Before, it came from torch's global generator:
    # the same seed gave other images (max difference 2.0 on this model).
    def reference():
        sched = sampling_scheduler(build_scheduler(), "ddpm")
        g = torch.Generator().manual_seed(3)
        x = torch.randn((N, 1, 8, 8), generator=g)
        sched.set_timesteps(STEPS)
        for t in sched.timesteps:
            x = sched.step(_single(unet, "a", x, t, NULL_CLASS, 1.0), t, x, generator=g).prev_sample
        return x.clamp(-1, 1)

    got = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        got.append(compose_images(unet, sampling_scheduler(build_scheduler(), "ddpm"), ["a"], "composite",
                                  num_images=N, num_inference_steps=STEPS, seed=3))
    torch.testing.assert_close(got[0], reference(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], got[0], atol=0, rtol=0)


@pytest.mark.parametrize("num_steps,k,s", [(20, 2, 5), (17, 3, 4), (7, 3, 1)])
def test_switch_schedule_is_the_official_callbacks(num_steps, k, s):
    loras = [f"l{i}" for i in range(k)]
    assert [loras[i] for i in switch_schedule(num_steps, k, s)] == _official_switch(num_steps, loras, s)


@torch.no_grad()
def test_switch_runs_exactly_the_scheduled_lora_at_each_step(unet):
    sched = switch_schedule(STEPS, 3, 1)  # steps 0,1 -> a, step 2 -> b
    assert sched == [0, 0, 1]
    ref = _reference_loop(unet, lambda i, t, x: _single(unet, "abc"[sched[i]], x, t, NULL_CLASS, 1.0))
    got = compose_images(unet, _sched(), ["a", "b", "c"], make_config("switch", switch_step=1), num_images=N,
                         num_inference_steps=STEPS)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_merge_equals_all_loras_active_and_restores_the_base(unet):
    # compose_lora.py l.77-79: set_adapters(cur_loras) = the deltas added up.
    before = {k: v.clone() for k, v in unet.state_dict().items()}

    def both(i, t, x):
        set_adapter(unet, ["a", "b"])
        return unet(x, t, class_labels=torch.full((N,), NULL_CLASS)).sample

    ref = _reference_loop(unet, both)
    got = compose_images(unet, _sched(), ["a", "b"], "merge", num_images=N, num_inference_steps=STEPS)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@torch.no_grad()
def test_lora_scale_scales_each_delta(unet):
    x, t = torch.randn(N, 1, 8, 8), torch.tensor(300)
    with disable_adapters(unet):
        base = unet(x, t, class_labels=torch.full((N,), NULL_CLASS)).sample
    from lorakit.diffusion.sampler import lora_scaling
    with lora_scaling(unet, ["a"], 0.0 + 1e-12):
        with routing(adapter_names=["a"] * N):
            tiny = unet(x, t, class_labels=torch.full((N,), NULL_CLASS)).sample
    torch.testing.assert_close(tiny, base, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cached_forward_matches_the_full_forward_and_reuses_the_cache(unet):
    x, t = torch.randn(4, 1, 8, 8), torch.tensor(500)
    names, labels = ["a", "b", "a", "c"], torch.tensor([1, 2, NULL_CLASS, 3])
    with routing(adapter_names=names):
        ref = unet(x, t, class_labels=labels).sample
    out, feature = cached_unet_forward(unet, x, t, labels, names, torch.zeros(4, dtype=torch.bool), None)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    # An exact cache (same input) gives the full forward on every row; a wrong cache changes only cached rows.
    out, _ = cached_unet_forward(unet, x, t, labels, names, torch.tensor([True, False, False, False]), feature)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out, kept = cached_unet_forward(unet, x, t, labels, names, torch.tensor([True, False, False, False]),
                                    torch.zeros_like(feature))
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    assert (out[1:] - ref[1:]).abs().amax() > 1e-3
    assert kept[1:].abs().max() == 0


def test_frequency_score_orders_known_spectra():
    # pipeline_online.py l.63-91: radial mean of |FFT| normalised by its max (the DC bin here), averaged over the
    # radii from 0.22 of the largest radius outward (bins 2..11 of a 16×16 image). A checkerboard puts amplitude
    # 256·a at the Nyquist corner (radius 11); a cosine of frequency 1 sits at radius 1, below the band.
    size = 16
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    blob = np.exp(-((yy - 8) ** 2 + (xx - 8) ** 2) / 30.0)
    checker = np.where((yy + xx) % 2 == 0, 1.0, -1.0)
    slow_wave = np.cos(2 * np.pi * xx / size)
    scores = {"blob": mean_relative_log_amplitude(blob), "strong_edges": mean_relative_log_amplitude(blob + 0.2 * checker),
              "weak_edges": mean_relative_log_amplitude(blob + 0.1 * checker),
              "slow_wave": mean_relative_log_amplitude(blob + 0.5 * slow_wave)}
    assert frequency_order(scores)[:2] == ["strong_edges", "weak_edges"]
    assert scores["slow_wave"] == pytest.approx(scores["blob"], abs=1e-6)  # radius 1 lies below the band
    # The corner (radius 11, alone in its bin) gets 256·a; relative to the DC bin (Σ blob, larger than 256·a
    # for a = 0.2) and averaged over the 10 bins 2..11, the score grows by 256·a / Σ blob / 10.
    gain = scores["strong_edges"] - scores["blob"]
    assert gain == pytest.approx(256 * 0.2 / blob.sum() / 10, rel=1e-6)
    assert mean_relative_log_amplitude(np.ones((size, size))) == 0.0


def _official_offline_schedule(num_steps, adapters_high, adapters_low, cache_interval, switch_step):
    """pipeline_offline.py l.1101-1175 replayed (refreshed index, dominant index); the no-op slice assignment
    `prv_features_list[1:][j] = None` is read as refreshing index 1 + j (see the method's docstring)."""
    if cache_interval == 0:
        a, b = int(0.375 * num_steps), int(0.875 * num_steps)
        seq = list(range(0, a, 2)) + list(range(a, b, 3)) + list(range(b, num_steps, 2))
    elif cache_interval == 1:
        seq = list(range(num_steps))
    else:
        seq = list(range(0, num_steps, cache_interval))
    h, indicator, out = len(adapters_high), 0, []
    for i in range(num_steps):
        refreshed = None
        if i in seq:
            if len(adapters_low) == 0 or i <= switch_step:
                refreshed = indicator % h
            else:
                refreshed = 1 + indicator % h
            indicator += 1
        if len(adapters_low) == 0 or i <= switch_step:
            dom = (indicator - 1) % h
        else:
            dom = ((indicator - 1) % h) + 1
        out.append((refreshed, dom))
    return out


@pytest.mark.parametrize("steps,high,low,interval", [(20, 1, 1, 2), (22, 2, 1, 3), (16, 3, 0, 0), (9, 2, 1, 1)])
def test_cmlora_schedule_is_the_official_offline_schedule(steps, high, low, interval):
    switch = int(round(120 / 220 * steps))
    expect = _official_offline_schedule(steps, list(range(high)), list(range(low)), interval, switch)
    assert cmlora_schedule(steps, high, low, interval, switch) == expect
    assert refresh_steps(steps, interval) == sorted({i for i, (r, _) in enumerate(expect) if r is not None})


def test_cmlora_dominant_weights_are_the_official_ones():
    # pipeline_offline.py l.1088-1091: c = K - 0.5, w_nondom = K / (c + K - 1), w_dom = c * w_nondom.
    assert dominant_weights(2) == pytest.approx((1.5 * 2 / 2.5, 2 / 2.5))
    for k in (2, 3, 5):
        dom, nondom = dominant_weights(k)
        assert dom + (k - 1) * nondom == pytest.approx(k)


@torch.no_grad()
def test_cmlora_without_cache_is_the_weighted_mean_with_the_scheduled_dominant(unet):
    # cache_interval=1: every step a full forward for every LoRA (quick_replicate = cache_interval > 1 is False);
    # ε = (1/K) Σ_k w_k ε_k with w_dom on the scheduled dominant LoRA (pipeline_offline.py l.1162-1200).
    order = ["b", "a"]
    plan = cmlora_schedule(STEPS, 1, 1, 1, int(round(120 / 220 * STEPS)))
    dom_w, nondom_w = dominant_weights(2)

    def eps(i, t, x):
        preds = [_single(unet, n, x, t, NULL_CLASS, 1.0) for n in order]
        w = [dom_w if k == plan[i][1] else nondom_w for k in range(2)]
        return sum(wk * p for wk, p in zip(w, preds)) / 2

    ref = _reference_loop(unet, eps)
    cfg = make_config("cmlora", cache_interval=1, order=order)
    got = compose_images(unet, _sched(), ["a", "b"], cfg, num_images=N, num_inference_steps=STEPS)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cmlora_with_cache_runs_the_deep_part_only_for_refreshed_loras(unet):
    cfg = make_config("cmlora", cache_interval=2, profile_images=1, profile_steps=2)
    images, run = compose_images(unet, _sched(), ["a", "b", "c"], cfg, num_images=N, num_inference_steps=4,
                                 return_run=True)
    assert images.shape == (N, 1, 8, 8) and torch.isfinite(images).all()
    assert sorted(run.state["order"]) == ["a", "b", "c"] and set(run.state["scores"]) == {"a", "b", "c"}
    # step 0: all 3 LoRAs full; step 2: one LoRA refreshed; steps 1, 3: none -> (3 + 1) * N full rows of 12 * N.
    assert (run.state["full_rows"], run.state["rows"]) == (4 * N, 12 * N)


@torch.no_grad()
def test_composer_takes_each_lora_inside_its_region_and_the_base_outside(unet):
    # region_rewrite (multi_lora_sample.py l.246-309): base outside all regions, Σ_r region outputs / overlap count.
    boxes = [(0.0, 0.0, 1.0, 0.5), (0.0, 0.25, 1.0, 0.75)]  # overlapping on the middle quarter, base on the right
    masks = region_masks(boxes, 8, 16)

    def eps(i, t, x):
        base, a, b = (_single(unet, n, x, t, NULL_CLASS, 1.0) for n in (None, "a", "b"))
        count = masks.sum(0)
        inside = (masks[0] * a + masks[1] * b) / count.clamp_min(1)
        return torch.where(count > 0, inside, base)

    ref = _reference_loop(unet, eps, width=16)
    cfg = make_config("composer", regions=boxes, self_attn_mask=False)
    got = compose_images(unet, _sched(), ["a", "b"], cfg, num_images=N, num_inference_steps=STEPS, width=16)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_isolation_bias_blocks_only_other_regions():
    # new_forward l.392-402: queries in region k get -1e6 on keys in the other regions; background is free.
    boxes = [(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)]
    bias = isolation_bias(boxes, 2, 4).reshape(2, 4, 2, 4)
    assert bias[0, 0, 0, 3] == -1e6 and bias[0, 3, 0, 0] == -1e6  # left query -> right key and back
    assert bias[0, 0, 1, 1] == 0 and bias[1, 3, 0, 2] == 0  # within a region


@torch.no_grad()
def test_region_self_attention_without_other_regions_is_the_default_processor(unet):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    attn = next(m for m in unet.modules() if isinstance(m, Attention))
    h = torch.randn(2, attn.to_q.base_layer.in_features if hasattr(attn.to_q, "base_layer") else attn.to_q.in_features, 4, 4)
    with disable_adapters(unet):
        ref = AttnProcessor2_0()(attn, h)
        got = RegionSelfAttention([(0.0, 0.0, 1.0, 1.0)], AttnProcessor2_0())(attn, h)
        isolated = RegionSelfAttention([(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)], AttnProcessor2_0())(attn, h)
    torch.testing.assert_close(got, ref)
    assert (isolated - ref).abs().max() > 1e-4


@torch.no_grad()
def test_composer_a_region_that_covers_no_pixel_is_named_not_dropped(unet):
    """Boxes are rounded inward to whole pixels (ceil start, floor end, as the official ``replace_latents``): a box
    inside one pixel covered nothing, so its LoRA was silently left out of the image. Now a ConfigError names the
    region, its LoRA and its size, before any forward pass; the attention processors are put back."""
    from diffusers.models.attention_processor import Attention

    before = [m.processor for m in unet.modules() if isinstance(m, Attention)]
    tiny = make_config("composer", regions=[(0.0, 0.0, 1.0, 0.5), (0.3, 0.6, 0.35, 0.7)])  # 0.4 × 0.8 of a pixel
    with pytest.raises(ConfigError, match=r"region 1 \(0.3, 0.6, 0.35, 0.7\) of LoRA 'b' covers no pixel of the "
                                          r"8×8 image \(0.4×0.8 pixels\)"):
        compose_images(unet, _sched(), ["a", "b"], tiny, num_images=1, num_inference_steps=1)
    assert [m.processor for m in unet.modules() if isinstance(m, Attention)] == before


@torch.no_grad()
def test_region_self_attention_warns_for_a_region_gone_at_a_coarser_map(unet):
    """A box of 2×2 pixels at 8×8 is 1×1 at a 4×4 feature map but straddles four positions, so rounded inward it
    covers none: its isolation is lost there, said once per map size (the LoRA itself still applies at the image's
    resolution)."""
    import warnings

    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    attn = next(m for m in unet.modules() if isinstance(m, Attention))
    channels = attn.to_q.base_layer.in_features if hasattr(attn.to_q, "base_layer") else attn.to_q.in_features
    processor = RegionSelfAttention([(0.0, 0.5, 1.0, 1.0), (0.125, 0.125, 0.375, 0.375)], AttnProcessor2_0())
    with disable_adapters(unet):
        with pytest.warns(UserWarning, match=r"region 1 \(0.125, 0.125, 0.375, 0.375\) covers no position of the "
                                             r"4×4 self-attention map \(1×1 positions\)"):
            processor(attn, torch.randn(1, channels, 4, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            processor(attn, torch.randn(1, channels, 4, 4))  # once per map size
            processor(attn, torch.randn(1, channels, 8, 8))  # 2×2 positions at 8×8: no warning


def test_bad_input_is_named(unet):
    with pytest.raises(ConfigError, match="cmlora"):
        make_config("cmlor")
    with pytest.raises(ConfigError, match="cache_interval"):
        make_config("cmlora", cache_intervall=2)
    with pytest.raises(ConfigError, match="regions"):
        make_config("composer")
    with pytest.raises(Exception, match="unknown adapter"):
        compose_images(unet, _sched(), ["a", "zz"], "composite", num_images=1, num_inference_steps=1)
    with pytest.raises(ConfigError, match="regions for 2 LoRAs"):
        compose_images(unet, _sched(), ["a", "b"], make_config("composer", regions=[(0, 0, 1, 1)]),
                       num_images=1, num_inference_steps=1)
    # a failed start leaves nothing to undo (was an AttributeError hiding the message), and the sizes are checked
    with pytest.raises(ConfigError, match="1 weights for 2 LoRAs"):
        compose_images(unet, _sched(), ["a", "b"], make_config("merge", weights=[1.0]), num_images=1,
                       num_inference_steps=1)
    for bad in (0, 7, -8):
        with pytest.raises(ConfigError, match="height must be a positive multiple"):
            compose_images(unet, _sched(), ["a"], "composite", num_images=1, num_inference_steps=1, height=bad)


def test_nan_weights_and_guidance_are_refused(unet):
    """A NaN merge weight made every image NaN; a NaN guidance_scale (NaN > 1 is False) turned guidance off silently."""
    with pytest.raises(ConfigError, match="weights must be finite"):
        make_config("merge", weights=[float("nan"), 1.0])
    with pytest.raises(ConfigError, match="guidance_scale must be a finite number"):
        compose_images(unet, _sched(), ["a"], "composite", num_images=1, num_inference_steps=1,
                       guidance_scale=float("nan"))


def test_benchmark_readme_states_the_cmlora_weights_the_code_uses():
    """benchmarks/diffusion/README.md explained CMLoRA's result with "weight 1.5 vs 0.5 for K = 2"; the official
    weights (pipeline_offline.py l.1088-1091, dominant_weights) are 1.2 and 0.8."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "benchmarks" / "diffusion" / "README.md").read_text()
    stated = re.search(r"weight ([\d.]+) vs ([\d.]+) for K = 2", text)
    assert stated is not None
    assert (float(stated.group(1)), float(stated.group(2))) == pytest.approx(dominant_weights(2))
