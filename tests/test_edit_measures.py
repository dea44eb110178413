"""The edit measures of tools/edit_measures.py on edits whose answer is known: the target style applied exactly,
blurred, with two stripe draws blended, copied from the source, with the sprites moved."""
import math

import pytest
import torch
import torch.nn.functional as F

from tve.tools.edit_measures import (band_energy, edit_strength, fidelity_error, latent_flow, latent_warp_error,
                                     structure_error, warp_error_parts)
from tve.tools.train_test_model import HELD_OUT_SEED, STRIPE_AMPLITUDE, TESTBEDS, recolour, target_style
from tve.tools.video_world import frames_to_latent, render_clip

TESTBED = TESTBEDS["test_model_256"]
PERIOD = TESTBED.stripe_period / 8  # cells


@pytest.fixture(scope="module")
def clip():
    return render_clip(4, TESTBED.frame_size, TESTBED.frame_size, seed=HELD_OUT_SEED + 1, sprites=2)


def styled_latent(frames: torch.Tensor, seed: int) -> torch.Tensor:
    return frames_to_latent(target_style(frames, torch.Generator().manual_seed(seed), TESTBED.stripe_period))


def blurred(latent: torch.Tensor, sigma_cells: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma_cells)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma_cells) ** 2)
    taps = (taps / taps.sum()).to(latent.dtype)
    channels = latent.shape[1]
    x = F.pad(latent, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def test_band_energy_of_a_stripe_is_half_its_squared_amplitude_at_any_angle():
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for angle in (0.0, 0.4, 1.3, 2.5):
        grey = 0.1 * torch.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / PERIOD + 0.7)
        assert float(band_energy(grey[None].double(), PERIOD)[0]) == pytest.approx(0.1 ** 2 / 2, rel=0.15)
        off_band = 0.1 * torch.sin(2 * math.pi * xs / (3 * PERIOD))  # 3x the period: outside the band
        assert float(band_energy(off_band[None].double(), PERIOD)[0]) < 0.1 * 0.1 ** 2 / 2


def test_edit_strength_is_the_stripe_energy_of_the_exact_style_and_zero_for_the_recolour_alone(clip):
    full = edit_strength(styled_latent(clip.frames, 0), clip.frames, PERIOD)
    assert full == pytest.approx(STRIPE_AMPLITUDE ** 2 / 2, rel=0.25)
    assert edit_strength(frames_to_latent(recolour(clip.frames)), clip.frames, PERIOD) < 1e-3 * full


def test_edit_strength_falls_under_blur_blending_and_copying(clip):
    full = edit_strength(styled_latent(clip.frames, 0), clip.frames, PERIOD)
    assert edit_strength(blurred(styled_latent(clip.frames, 0), PERIOD / 4), clip.frames, PERIOD) < 0.5 * full
    blend = (styled_latent(clip.frames, 0) + styled_latent(clip.frames, 1)) / 2  # two unrelated stripe draws
    assert 0.25 * full < edit_strength(blend, clip.frames, PERIOD) < 0.75 * full
    assert edit_strength(frames_to_latent(recolour(clip.frames)), clip.frames, PERIOD) < 1e-3 * full
    assert edit_strength(frames_to_latent(clip.frames), clip.frames, PERIOD) < 1e-3 * full  # the source, unstyled


def test_structure_error_ignores_the_stripes_and_sees_blur_and_moved_sprites(clip):
    exact = structure_error(styled_latent(clip.frames, 0), clip.frames, PERIOD)
    assert exact < 0.1
    assert structure_error(blurred(styled_latent(clip.frames, 0), 1.0), clip.frames, PERIOD) > 4 * exact
    later = render_clip(4, TESTBED.frame_size, TESTBED.frame_size, seed=HELD_OUT_SEED + 1, sprites=2, speed=1.0)
    moved = styled_latent(torch.cat([later.frames[:1], later.frames[3:], later.frames[1:3]]), 0)  # frames swapped
    assert structure_error(moved, clip.frames, PERIOD) > 8 * exact
    flat = frames_to_latent(torch.full_like(clip.frames, 0.5))
    assert structure_error(flat, clip.frames, PERIOD) == pytest.approx(1.0)


def test_fidelity_sees_the_colour_and_not_the_stripes(clip):
    exact = fidelity_error(styled_latent(clip.frames, 0), clip.frames, PERIOD)
    unstyled = fidelity_error(frames_to_latent(clip.frames), clip.frames, PERIOD)
    assert exact < 0.05 * unstyled


def test_latent_warp_error_is_low_on_the_source_and_high_when_every_frame_draws_other_stripes(clip):
    cell_flow, occluded = latent_flow(clip.flow_forward, clip.occlusion_forward)
    source = latent_warp_error(frames_to_latent(clip.frames), cell_flow, occluded)
    per_frame = latent_warp_error(styled_latent(clip.frames, 0), cell_flow, occluded)
    assert per_frame > 3 * source


def test_warp_error_parts_put_the_flicker_where_the_edit_put_it(clip):
    cell_flow, occluded = latent_flow(clip.flow_forward, clip.occlusion_forward)
    # the source copied: all of its warp error is explained by the source
    source = frames_to_latent(clip.frames)
    parts = warp_error_parts(source, clip.frames, PERIOD, cell_flow, occluded)
    assert parts["explained"] == pytest.approx(latent_warp_error(source, cell_flow, occluded), rel=1e-3)
    assert parts["stripes"] < 1e-6 and parts["rest"] < 1e-6
    # a still clip with other stripes in every frame: the flicker is the stripes, the recolour holds still
    still = render_clip(4, TESTBED.frame_size, TESTBED.frame_size, seed=HELD_OUT_SEED + 1, camera="static",
                        sprites=0)
    flow, hidden = latent_flow(still.flow_forward, still.occlusion_forward)
    styled = styled_latent(still.frames, 0)
    parts = warp_error_parts(styled, still.frames, PERIOD, flow, hidden)
    whole = latent_warp_error(styled, flow, hidden)
    assert parts["stripes"] > 0.8 * whole and parts["explained"] < 0.05 * whole and parts["rest"] < 0.2 * whole
    # the same clip with per-cell noise that changes every frame: the flicker is outside the band
    noise = 0.3 * torch.randn(styled.shape, generator=torch.Generator().manual_seed(0), dtype=styled.dtype)
    noisy = frames_to_latent(recolour(still.frames)) + noise
    parts = warp_error_parts(noisy, still.frames, PERIOD, flow, hidden)
    assert parts["rest"] > 2 * parts["stripes"] and parts["rest"] > 10 * parts["explained"]
