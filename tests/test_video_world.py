"""The procedural video world: reproducible clips whose flow and occlusion are exact ground truth."""
import math

import pytest
import torch
import torch.nn.functional as nnf

from tve.tools.video_world import (
    CAMERAS, LATENT_BIAS, LATENT_FROM_RGB, frames_to_latent, latent_to_frames, render_clip, rotation_clip,
    translation_clip,
)


def _sample_at(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Bilinear sample of image (C, H, W) at p + flow(p), flow (2, H, W) in pixels -> (C, H, W)."""
    _, height, width = image.shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                            torch.arange(width, dtype=torch.float32), indexing="ij")
    grid = torch.stack([(xs + flow[0]) * 2 / (width - 1) - 1, (ys + flow[1]) * 2 / (height - 1) - 1], dim=-1)
    return nnf.grid_sample(image[None].float(), grid[None], align_corners=True, padding_mode="border")[0]


def _warp_errors(frames: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean |frame t - frame t+1 sampled at p + flow_t(p)| -> (F-1, H, W)."""
    images = frames.float().permute(0, 3, 1, 2)  # (F, 3, H, W)
    return torch.stack([(_sample_at(images[t + 1], flow[t]) - images[t]).abs().mean(0)
                        for t in range(len(flow))])


def _identity_grid(height: int, width: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                            torch.arange(width, dtype=torch.float64), indexing="ij")
    return torch.stack([xs, ys])  # (2, H, W)


def test_same_seed_gives_identical_clip_and_other_seed_a_different_one():
    first = render_clip(5, 48, 40, seed=7, camera="random", sprites=3)
    again = render_clip(5, 48, 40, seed=7, camera="random", sprites=3)
    other = render_clip(5, 48, 40, seed=8, camera="random", sprites=3)
    for name in ("frames", "flow_forward", "flow_backward", "occlusion_forward", "occlusion_backward"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert (first.frames - other.frames).abs().mean() > 0.1
    assert not torch.allclose(first.flow_forward, other.flow_forward)


@pytest.mark.parametrize("height,width", [(64, 64), (40, 72), (72, 40)])
def test_clip_layout_and_value_ranges(height, width):
    clip = render_clip(6, height, width, seed=1, camera="random", sprites=2)
    assert clip.frames.shape == (6, height, width, 3) and clip.frames.dtype == torch.float32
    assert 0.0 <= clip.frames.min() and clip.frames.max() <= 1.0
    for flow in (clip.flow_forward, clip.flow_backward):
        assert flow.shape == (5, 2, height, width) and flow.dtype == torch.float32
    for mask in (clip.occlusion_forward, clip.occlusion_backward):
        assert mask.shape == (5, height, width) and mask.dtype == torch.bool
    single = render_clip(1, height, width, seed=1)
    assert single.frames.shape == (1, height, width, 3) and single.flow_forward.shape == (0, 2, height, width)


@pytest.mark.parametrize("camera", CAMERAS)
@pytest.mark.parametrize("height,width", [(64, 64), (40, 72)])
def test_flow_warps_the_other_frame_onto_each_visible_pixel(camera, height, width):
    clip = render_clip(6, height, width, seed=3, camera=camera, sprites=3)
    flipped = clip.frames.flip(0)
    for frames, flow, occluded in ((clip.frames, clip.flow_forward, clip.occlusion_forward),
                                   (flipped, clip.flow_backward.flip(0), clip.occlusion_backward.flip(0))):
        visible = ~occluded
        moving = visible & (flow.norm(dim=1) > 0.5)
        error = _warp_errors(frames, flow)
        unwarped = _warp_errors(frames, torch.zeros_like(flow))
        assert error[visible].mean() < 0.02
        assert moving.float().mean() > 0.05
        assert unwarped[moving].median() > 5 * error[moving].median()
        assert occluded.any()  # every scene has moving sprites
        assert error[occluded].median() > 5 * error[visible].median()


@pytest.mark.parametrize("camera", CAMERAS)
def test_forward_and_backward_flows_cancel_on_visible_pixels(camera):
    clip = render_clip(6, 64, 48, seed=4, camera=camera, sprites=3)
    for t in range(5):
        forward, visible = clip.flow_forward[t], ~clip.occlusion_forward[t]
        cycle = (forward + _sample_at(clip.flow_backward[t], forward)).norm(dim=0)  # (H, W)
        assert cycle[visible].mean() < 0.05
        assert cycle[visible].median() < 1e-3
        assert cycle[~visible].mean() > 0.2


@pytest.mark.parametrize("dx,dy", [(1.0, 0.0), (1.25, -0.5), (-2.7, 3.1)])
def test_translation_clip_flow_is_the_requested_constant(dx, dy):
    height, width = 40, 56
    clip = translation_clip(5, height, width, dx, dy, seed=2)
    expected = torch.tensor([dx, dy]).view(1, 2, 1, 1)
    assert torch.allclose(clip.flow_forward, expected.expand_as(clip.flow_forward), atol=1e-5)
    assert torch.allclose(clip.flow_backward, -expected.expand_as(clip.flow_backward), atol=1e-5)
    target = _identity_grid(height, width) + torch.tensor([dx, dy], dtype=torch.float64).view(2, 1, 1)
    leaves = (target[0] < -0.5) | (target[0] >= width - 0.5) | (target[1] < -0.5) | (target[1] >= height - 0.5)
    assert torch.equal(clip.occlusion_forward, leaves.expand_as(clip.occlusion_forward))
    error = _warp_errors(clip.frames, clip.flow_forward)
    assert error[~clip.occlusion_forward].mean() < 0.02
    sampled = (target[0] >= 0) & (target[0] <= width - 1) & (target[1] >= 0) & (target[1] <= height - 1)
    whole_pixels = dx == round(dx) and dy == round(dy)
    assert error[:, sampled].max() < (1e-5 if whole_pixels else 0.05)


@pytest.mark.parametrize("height,width", [(48, 48), (40, 72)])
def test_rotation_clip_flow_is_the_analytic_rotation_field(height, width):
    degrees = 3.0
    clip = rotation_clip(4, height, width, degrees, seed=5)
    theta = math.radians(degrees)
    x, y = _identity_grid(height, width)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    expected = torch.stack([math.cos(theta) * (x - cx) - math.sin(theta) * (y - cy) + cx - x,
                            math.sin(theta) * (x - cx) + math.cos(theta) * (y - cy) + cy - y]).float()
    assert torch.allclose(clip.flow_forward, expected.expand_as(clip.flow_forward), atol=1e-4)
    centre = clip.flow_forward[:, :, height // 2, width // 2].norm(dim=1)
    corner = clip.flow_forward[:, :, 0, 0].norm(dim=1)
    assert (centre < 0.05).all() and (corner > 1.0).all()
    assert clip.occlusion_forward[:, 0, 0].all() and not clip.occlusion_forward[:, height // 2, width // 2].any()


def test_each_added_sprite_is_drawn_on_top_with_its_own_rigid_motion():
    below = render_clip(3, 64, 64, seed=11, camera="translate", sprites=2)
    above = render_clip(3, 64, 64, seed=11, camera="translate", sprites=3)
    footprint = (above.frames[0] != below.frames[0]).any(dim=-1)  # where the third sprite is on top
    assert footprint.float().mean() > 0.02
    homogeneous = torch.cat([_identity_grid(64, 64), torch.ones(1, 64, 64, dtype=torch.float64)])  # (3, H, W)
    flow = above.flow_forward[0].double()
    motion = torch.linalg.lstsq(homogeneous[:, footprint].T, flow[:, footprint].T).solution  # (3, 2)
    field = torch.einsum("kc,khw->chw", motion, homogeneous)  # (2, H, W) the footprint's affine flow
    assert (flow[:, footprint] - field[:, footprint]).abs().max() < 1e-3
    assert ((below.flow_forward[0] - field).norm(dim=0) < 1e-2).float().mean() < 0.01  # no other layer moves so


def test_static_camera_without_sprites_is_still_and_unoccluded():
    clip = render_clip(4, 32, 48, seed=6, camera="static", sprites=0)
    assert torch.equal(clip.frames[0].expand_as(clip.frames), clip.frames)
    assert clip.flow_forward.abs().max() < 1e-5 and clip.flow_backward.abs().max() < 1e-5
    assert not clip.occlusion_forward.any() and not clip.occlusion_backward.any()


def test_sprites_occlude_the_still_background():
    clip = render_clip(6, 64, 64, seed=6, camera="static", sprites=2)
    assert clip.occlusion_forward.any(dim=(1, 2)).all() and clip.occlusion_backward.any(dim=(1, 2)).all()
    moving = clip.flow_forward.norm(dim=1) > 0.1
    assert 0.05 < moving.float().mean() < 0.8  # the sprites move, the background does not


def test_zero_speed_stills_every_motion():
    clip = render_clip(4, 32, 32, seed=9, camera="random", sprites=3, speed=0.0)
    assert torch.equal(clip.frames[0].expand_as(clip.frames), clip.frames)
    assert clip.flow_forward.abs().max() < 1e-5 and not clip.occlusion_forward.any()


def test_motion_scales_with_image_size():
    small = render_clip(4, 64, 64, seed=5, camera="random", sprites=3)
    large = render_clip(4, 256, 256, seed=5, camera="random", sprites=3)
    ratio = large.flow_forward.norm(dim=1).mean() / small.flow_forward.norm(dim=1).mean()
    assert abs(ratio - 4.0) < 0.1
    assert 1.0 < small.flow_forward.norm(dim=1).mean() < 5.0  # a few pixels per frame at 64 px


def test_bf16_frames_round_the_fp32_frames_and_keep_the_flow():
    full = render_clip(4, 40, 48, seed=2, camera="zoom", sprites=1)
    half = render_clip(4, 40, 48, seed=2, camera="zoom", sprites=1, dtype=torch.bfloat16)
    assert half.frames.dtype == torch.bfloat16
    assert (half.frames.float() - full.frames).abs().max() <= 2 ** -9  # half a bf16 step below 1
    assert torch.equal(half.flow_forward, full.flow_forward)
    assert torch.equal(half.occlusion_forward, full.occlusion_forward)
    error = _warp_errors(half.frames, half.flow_forward)
    assert error[~half.occlusion_forward].mean() < 0.02


def test_dis_flow_locks_onto_the_texture():
    cv2 = pytest.importorskip("cv2")
    clip = render_clip(4, 96, 96, seed=0, camera="random", sprites=2)
    gray = (clip.frames.mean(-1) * 255).round().to(torch.uint8).numpy()
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    for t in range(3):
        estimate = torch.from_numpy(dis.calc(gray[t], gray[t + 1], None)).permute(2, 0, 1)
        visible = ~clip.occlusion_forward[t]
        end_point_error = (estimate - clip.flow_forward[t]).norm(dim=0)[visible].mean()
        assert end_point_error < 0.25 * clip.flow_forward[t].norm(dim=0)[visible].mean()


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_latent_to_frames_to_latent_is_identity_on_in_range_latents(dtype, rtol):
    rgb = torch.rand(3, 5, 6, 3, generator=torch.Generator().manual_seed(0))
    latent = torch.einsum("lc,fhwc->flhw", LATENT_FROM_RGB.float(), rgb) + LATENT_BIAS.float()[:, None, None]
    latent = latent.to(dtype)
    frames = latent_to_frames(latent)
    assert frames.shape == (3, 40, 48, 3) and frames.dtype == dtype
    again = frames_to_latent(frames)
    assert again.shape == latent.shape and again.dtype == dtype
    assert torch.allclose(again.float(), latent.float(), atol=rtol * float(latent.abs().max()))  # of the range


def test_frames_to_latent_averages_cells_and_decodes_to_the_cell_means():
    frames = torch.rand(2, 70, 45, 3, generator=torch.Generator().manual_seed(1))
    latent = frames_to_latent(frames)
    assert latent.shape == (2, 4, 8, 5)
    cell_means = frames[:, :64, :40].reshape(2, 8, 8, 5, 8, 3).mean(dim=(2, 4))  # (F, h, w, 3)
    decoded = latent_to_frames(latent)[:, ::8, ::8]
    assert torch.allclose(decoded, cell_means, atol=1e-5)
    far = latent_to_frames(torch.full((1, 4, 2, 2), 50.0))
    assert far.min() >= 0.0 and far.max() <= 1.0


def test_latent_map_is_well_conditioned():
    assert torch.linalg.cond(LATENT_FROM_RGB) < 3.0


@pytest.mark.parametrize("kwargs", [dict(camera="dolly"), dict(sprites=4), dict(speed=-1.0), dict(frames=0),
                                    dict(dtype=torch.int64)])
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        render_clip(**kwargs)


def test_bad_latent_shapes_raise_value_error():
    with pytest.raises(ValueError, match="frames"):
        frames_to_latent(torch.rand(2, 16, 16, 4))
    with pytest.raises(ValueError, match="latent"):
        latent_to_frames(torch.rand(2, 3, 4, 4))
