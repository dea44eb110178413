"""Consistency metrics (Lai et al. 2018 warp error, flicker index) and the feature previews."""
import pytest
import torch

from tve.flow.consistency import flicker_index, measure_consistency
from tve.flow.estimate import FlowField
from tve.nodes.measure_nodes import ConsistencyMetrics
from tve.engine.feature_preview import nn_field_image, pca_image
from tve.tests.hosts import make_conditioning, make_latent, make_tiny_model
from tve.tools.video_world import render_clip, translation_clip


def flow_of(clip) -> FlowField:
    return FlowField(forward=clip.flow_forward, backward=clip.flow_backward, occlusion=clip.occlusion_forward,
                     method="ground truth")


def gain_flicker(frames: torch.Tensor, seed: int = 0, amount: float = 0.15) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    gains = 1 + amount * (2 * torch.rand(frames.shape[0], generator=g) - 1)
    return (frames * gains[:, None, None, None]).clamp(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_consistent_edit_scores_zero_under_ground_truth_flow(dtype):
    clip = translation_clip(6, 40, 56, dx=2.0, dy=-1.0, seed=3)
    edited = (1 - clip.frames).flip(-1).to(dtype)          # any per-pixel edit keeps the motion consistent
    result = measure_consistency(edited, clip.flow_forward, clip.occlusion_forward)
    assert result.warp_error == pytest.approx(0.0, abs=1e-10)
    assert result.per_pair.shape == (5,)


def test_per_frame_gain_flicker_scores_at_least_four_times_higher():
    clip = render_clip(8, 64, 64, seed=1, sprites=2)
    steady = measure_consistency(clip.frames, clip.flow_forward, clip.occlusion_forward)
    flickering = measure_consistency(gain_flicker(clip.frames), clip.flow_forward, clip.occlusion_forward)
    assert flickering.warp_error >= 4 * steady.warp_error
    assert flickering.flicker >= 4 * steady.flicker


def test_occluded_pixels_do_not_count():
    clip = render_clip(6, 64, 64, seed=2, sprites=3)
    assert clip.occlusion_forward.any()
    assert clip.occlusion_forward[0].any()
    garbage = clip.frames.clone()
    noise = torch.rand(garbage[0].shape, generator=torch.Generator().manual_seed(0))
    occluded = clip.occlusion_forward[0][..., None].expand_as(noise)
    garbage[0][occluded] = noise[occluded]     # frame 0 (only ever the pair's reference) garbled where it is occluded
    clean = measure_consistency(clip.frames, clip.flow_forward, clip.occlusion_forward)
    dirty = measure_consistency(garbage, clip.flow_forward, clip.occlusion_forward)
    assert dirty.warp_error == pytest.approx(clean.warp_error, rel=1e-6)


def test_flicker_index_is_the_mean_change_of_mean_intensity():
    frames = torch.stack([torch.full((4, 4, 3), v) for v in (0.2, 0.5, 0.4, 0.4)])
    assert flicker_index(frames) == pytest.approx((0.3 + 0.1 + 0.0) / 3)


def test_node_reports_numbers_summary_and_source_floor():
    clip = render_clip(6, 48, 64, seed=4, sprites=1)
    out = ConsistencyMetrics.execute(gain_flicker(clip.frames), flow_of(clip), clip.frames)
    warp_x1000, flicker, summary = out.result
    assert out.ui["text"] == [summary]
    assert warp_x1000 > 0 and flicker > 0
    assert "source warp error" in summary and "ground truth at 64x48" in summary


def test_frames_or_sizes_that_differ_from_the_flow_are_clear_errors():
    clip = render_clip(6, 48, 64, seed=4, sprites=1)
    with pytest.raises(ValueError, match="images"):
        ConsistencyMetrics.execute(clip.frames[:5], flow_of(clip))
    with pytest.raises(ValueError, match="source_images"):
        ConsistencyMetrics.execute(clip.frames, flow_of(clip), clip.frames[:, :40])


def test_pca_picture_is_in_range_and_a_keyframe_rebuilds_itself_through_its_own_field():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(5, 12, 16, generator=g)           # (F, T, C) on a 3x4 grid
    pca = pca_image(features, (3, 4))
    assert pca.shape == (5, 3, 4, 3) and pca.min() >= 0 and pca.max() <= 1
    field = nn_field_image(features, pca, interval=2)         # keyframes 0, 2, 4
    for f in (0, 2, 4):
        assert torch.equal(field[f], pca[f])
    shifted = torch.roll(features[0].reshape(3, 4, 16), 1, dims=1).reshape(12, 16)
    rebuilt = nn_field_image(torch.stack([features[0], shifted]), pca_image(torch.stack([features[0], shifted]),
                                                                          (3, 4)), interval=2)
    assert torch.equal(rebuilt[1], rebuilt[0].roll(1, dims=1))


@pytest.mark.real_host
def test_preview_features_node_draws_both_pictures_for_the_source():
    from tve.engine.inversion import invert
    from tve.nodes.measure_nodes import PreviewFeatures
    model = make_tiny_model("sd15")
    _, inversion = invert(model, make_latent(4, 8, 8)["samples"], make_conditioning(), 4, "ddim_uniform")
    shown = PreviewFeatures.execute(model, inversion, 0.5, "output latent", 2, 4)
    pca, field = shown.result
    assert len(shown.ui["images"]) == 4 + 4
    assert pca.shape == field.shape == (4, 32, 32, 3)
    assert torch.equal(field[0], pca[0]) and torch.equal(field[2], pca[2])
    assert 0 <= float(pca.min()) and float(pca.max()) <= 1
    with pytest.raises(ValueError, match="inversion"):
        PreviewFeatures.execute(make_tiny_model("sd2"), inversion, 0.5, "output latent", 2, 4)
