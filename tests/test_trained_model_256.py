"""The 256 px test model (tools/test_model_256, ``TESTBEDS["test_model_256"]``) inside the real ComfyUI: what
bench/consistency.py relies on it for. Short clips (3-4 frames of 32 x 32 latents, 12-25 steps) keep each test to
seconds. (Not tested because it holds only in part: that the sprites keep their outline under the edit; the
structure error of bench/consistency.py measures it, 0.48 for per-frame PnP where the exact style scores about 0.1.)"""
import json

import pytest
import torch

from tve.tests.trained_model import TOOLS, load_trained_model, trained_conditioning
from tve.tools.edit_measures import edit_strength, latent_flow, latent_warp_error, warp_error_parts
from tve.tools.train_test_model import HELD_OUT_SEED, STRIPE_AMPLITUDE, TESTBEDS, UNET_CONFIG_256, recolour
from tve.tools.video_world import frames_to_latent, render_clip

pytestmark = pytest.mark.real_host
TESTBED = TESTBEDS["test_model_256"]
NAME = "test_model_256"
WEIGHTS = TOOLS / NAME / "unet.safetensors"
PERIOD = TESTBED.stripe_period / 8  # cells
STYLE_ENERGY = STRIPE_AMPLITUDE ** 2 / 2  # edit strength of the exact style
RECONSTRUCTION_BOUND = 0.15  # 25 steps; measured 0.102 (this clip) and 0.101 (bench clip 0)


def _clip(frames: int, index: int = 7):
    return render_clip(frames, TESTBED.frame_size, TESTBED.frame_size, seed=HELD_OUT_SEED + index, sprites=2)


def _edit(model, x_T, sigmas, cfg: float = 5.0):
    from tve.engine import host
    return host.sample(model, torch.zeros_like(x_T), cfg, "euler", sigmas, trained_conditioning("target", NAME),
                       trained_conditioning("empty", NAME), x_T, seed=0)


def test_weights_are_fp16_under_10_mb_with_sd15s_four_levels_and_attention_on_the_first_three():
    from safetensors import safe_open

    assert WEIGHTS.stat().st_size <= 10_000_000
    with safe_open(str(WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
        assert json.loads(metadata["unet_config"]) == UNET_CONFIG_256
        assert json.loads(metadata["testbed"]) == {"frame_size": 256, "stripe_period": TESTBED.stripe_period}
        keys = list(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    unet = load_trained_model(NAME).model.diffusion_model
    levels = len(UNET_CONFIG_256["channel_mult"])
    assert levels >= 3 and len(unet.input_blocks) == 1 + levels * 2 - 1  # stem, one ResBlock per level, downsamples
    with_attention = [any("transformer_blocks" in k for k in keys if k.startswith(f"input_blocks.{i}."))
                      for i in range(1, len(unet.input_blocks)) if i % 2 == 1]  # the ResBlock entry of each level
    assert with_attention == [True] * (levels - 1) + [False]
    assert any(k.startswith("middle_block.1.transformer_blocks") for k in keys)


def test_inversion_then_reconstruction_of_a_held_out_clip_is_faithful():
    from tve.engine import host
    from tve.engine.inversion import invert

    model, cond = load_trained_model(NAME), trained_conditioning("source", NAME)
    raw = frames_to_latent(_clip(3).frames)  # (3, 4, 32, 32), a world seed never trained on
    x_T, inversion = invert(model, raw, cond, 25, "ddim_uniform")
    recon = host.sample(model, torch.zeros_like(x_T), 1.0, "euler", inversion.sigmas, cond, cond, x_T)
    assert float((recon - raw).norm() / raw.norm()) < RECONSTRUCTION_BOUND
    assert float((x_T - raw).norm() / raw.norm()) > 1.0  # x_T really is the noisy end of the walk


def test_per_frame_pnp_edit_applies_the_stripes_and_flickers():
    from tve.engine.injection import apply_feature_injection
    from tve.engine.inversion import invert

    clip = _clip(4)
    raw = frames_to_latent(clip.frames)
    model = load_trained_model(NAME)
    # the measured figures below are of the current_sigma inversion they were measured with
    x_T, inversion = invert(model, raw, trained_conditioning("source", NAME), 12, "ddim_uniform",
                            formula="current_sigma")
    out = _edit(apply_feature_injection(model, inversion, 0.5, 0.8, "tokenflow", "sigma-matched"), x_T,
                inversion.sigmas)
    # the target style is applied: stripe-band energy the source does not explain (measured 0.57 of the exact
    # style's here; the source itself has none)
    assert edit_strength(out, clip.frames, PERIOD) > 0.3 * STYLE_ENERGY
    assert edit_strength(raw, clip.frames, PERIOD) < 0.01 * STYLE_ENERGY
    # frame by frame the stripes do not follow the content: the output flickers far more than the style's
    # deterministic part (the recolour) moves (measured 30x), and most of it is in the stripe band (measured 2.1 of
    # 2.6, the rest 0.8, the part the source explains 0.2)
    cell_flow, occluded = latent_flow(clip.flow_forward, clip.occlusion_forward)
    flicker = latent_warp_error(out, cell_flow, occluded)
    assert flicker > 10 * latent_warp_error(frames_to_latent(recolour(clip.frames)), cell_flow, occluded)
    parts = warp_error_parts(out, clip.frames, PERIOD, cell_flow, occluded)
    assert parts["stripes"] > 0.5 * flicker and parts["stripes"] > 2 * parts["rest"] > 2 * parts["explained"]
