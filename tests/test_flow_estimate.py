"""Optical flow (DIS, RAFT plumbing), forward–backward occlusion and backward warping against the video world."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.optical_flow import raft_large, raft_small

from tve.flow.estimate import (FlowField, build_raft, estimate_flow, flow_resolution, occlusion_from_consistency,
                               raft_working_bytes, resize_flow)
from tve.flow.warp import backward_warp
from tve.tools.video_world import render_clip, rotation_clip, translation_clip

DTYPES = [torch.float32, torch.bfloat16]


def interior(mask: torch.Tensor, border: int = 4) -> torch.Tensor:
    """mask (..., H, W) with a ``border`` px frame cleared."""
    mask = mask.clone()
    mask[..., :border, :] = mask[..., -border:, :] = False
    mask[..., :, :border] = mask[..., :, -border:] = False
    return mask


def near(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, H, W) bool: within ``radius`` px (Chebyshev) of a True pixel of ``mask``."""
    return F.max_pool2d(mask.float()[:, None], 2 * radius + 1, 1, radius)[:, 0] > 0


@pytest.fixture(scope="module")
def clips():
    return {
        "subpixel_translation": translation_clip(3, 64, 64, 1.3, -0.7, seed=1),
        "rotation": rotation_clip(3, 64, 64, 3.0, seed=0),                      # OpenCV's MEDIUM preset: 0.13 px
        "non_square_rotation": rotation_clip(3, 48, 80, 3.0, seed=0),           # and 0.13 px here
    }


@pytest.fixture(scope="module")
def sprite_clip():
    return render_clip(3, 64, 96, seed=1, sprites=3)


# ------------------------------------------------------------------------------------------------ DIS accuracy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["subpixel_translation", "rotation", "non_square_rotation"])
def test_dis_end_point_error_is_below_a_tenth_of_a_pixel(clips, name, dtype):
    clip = clips[name]
    flow = estimate_flow(clip.frames.to(dtype), "dis")
    assert flow.forward.dtype == torch.float32 and flow.method == "dis"
    assert (flow.frames, flow.height, flow.width) == tuple(clip.frames.shape[:3])
    for estimate, truth, occluded in [(flow.forward, clip.flow_forward, clip.occlusion_forward),
                                      (flow.backward, clip.flow_backward, clip.occlusion_backward)]:
        visible = interior(~occluded)
        error = (estimate - truth).norm(dim=1)[visible].mean()
        assert error < 0.1, f"{name}: mean end-point error {error:.3f} px"


def test_dis_flags_the_pixels_that_leave_the_frame():
    clip = translation_clip(3, 64, 64, 2.6, -1.7, seed=4)
    occlusion = estimate_flow(clip.frames, "dis").occlusion
    truth = clip.occlusion_forward
    assert truth.any()
    hits = (occlusion & truth).sum()
    assert hits >= 0.95 * truth.sum() and hits >= 0.95 * occlusion.sum()


def test_consistency_of_exact_flows_finds_the_sprite_occlusions(sprite_clip):
    clip = sprite_clip
    occlusion = occlusion_from_consistency(clip.flow_forward, clip.flow_backward)
    truth = clip.occlusion_forward
    assert (occlusion & truth).sum() >= 0.9 * truth.sum()
    assert (occlusion & near(truth, 3)).sum() >= 0.8 * occlusion.sum()     # the rest: motion-boundary fringes


def test_dis_occlusion_catches_sprite_occlusions(sprite_clip):
    clip = sprite_clip
    occlusion = estimate_flow(clip.frames, "dis").occlusion
    truth = clip.occlusion_forward
    assert (occlusion & truth).sum() >= 0.5 * truth.sum()
    assert (near(occlusion, 2) & truth).sum() >= 0.75 * truth.sum()
    assert (occlusion & near(truth, 3)).sum() >= 0.8 * occlusion.sum()


def test_dis_reports_progress_per_pair():
    calls = []
    estimate_flow(torch.rand(3, 32, 40, 3), "dis", on_batch=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]


# ------------------------------------------------------------------------------------------------ capped resolution
def test_flow_resolution_keeps_small_frames_and_the_aspect_of_large_ones():
    assert flow_resolution((240, 426), 0) == (240, 426)
    assert flow_resolution((240, 426), 512) == (240, 426)
    assert flow_resolution((1080, 1920), 512) == (288, 512)
    assert flow_resolution((1920, 1080), 512) == (512, 288)


def test_resized_flow_scales_its_vectors_with_the_frame():
    flow = torch.zeros(1, 2, 6, 10)
    flow[:, 0], flow[:, 1] = 1.5, -0.5
    big = resize_flow(flow, (12, 40))
    assert big.shape == (1, 2, 12, 40)
    torch.testing.assert_close(big[:, 0], torch.full((1, 12, 40), 6.0))       # ×4 across
    torch.testing.assert_close(big[:, 1], torch.full((1, 12, 40), -1.0))      # ×2 down


@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_estimated_at_half_resolution_is_the_full_resolution_motion(dtype):
    clip = translation_clip(3, 96, 128, 3.0, -2.0, seed=2)
    flow = estimate_flow(clip.frames.to(dtype), "dis", max_size=64)
    assert (flow.frames, flow.height, flow.width) == (3, 96, 128) and flow.forward.dtype == torch.float32
    visible = interior(~clip.occlusion_forward, border=8)
    error = (flow.forward - clip.flow_forward).norm(dim=1)[visible].mean()
    assert error < 0.25, f"mean end-point error {error:.3f} px at half resolution"
    assert (flow.occlusion & clip.occlusion_forward).sum() >= 0.8 * clip.occlusion_forward.sum()


def test_frames_within_the_cap_give_the_full_resolution_flow_exactly():
    frames = render_clip(3, 48, 64, seed=1, sprites=2).frames
    full = estimate_flow(frames, "dis")
    capped = estimate_flow(frames, "dis", max_size=64)
    assert torch.equal(full.forward, capped.forward) and torch.equal(full.occlusion, capped.occlusion)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("frames, method, match", [
    (torch.rand(1, 32, 32, 3), "dis", "at least 2 frames"),
    (torch.rand(3, 3, 32, 32), "dis", r"\(F, H, W, 3\)"),
    (torch.rand(3, 32, 32, 3), "farneback", "method"),
    (torch.rand(3, 32, 32, 3), "raft_large", "needs a RAFT module"),
    ((torch.rand(3, 32, 32, 3) * 255).to(torch.uint8), "dis", "float"),
])
def test_bad_input_raises_a_clear_error(frames, method, match):
    with pytest.raises(ValueError, match=match):
        estimate_flow(frames, method)


def test_flow_field_refuses_mismatched_parts():
    with pytest.raises(ValueError, match="occlusion"):
        FlowField(torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8), torch.zeros(2, 8, 9, dtype=torch.bool), "dis")


# ------------------------------------------------------------------------------------------------ RAFT plumbing
class DifferenceFlow(torch.nn.Module):
    """Stands in for RAFT: its last 'iteration' is (image2 − image1) of the first two channels, earlier ones
    are NaN; it records the inputs of every call."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=dtype))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, image1, image2):
        self.calls.append((image1, image2))
        flow = (image2 - image1)[:, :2] + self.anchor
        return [torch.full_like(flow, float("nan")), flow]


@pytest.mark.parametrize("dtype", DTYPES)
def test_raft_pairs_are_normalised_padded_cropped_and_ordered(dtype):
    frames = torch.rand(4, 36, 150, 3)                                        # neither side a multiple of 8
    raft = DifferenceFlow(dtype)
    flow = estimate_flow(frames, "raft_small", raft=raft, batch_size=4)
    x = frames.to(dtype).float().permute(0, 3, 1, 2)[:, :2] * 2               # the stand-in's flow in [-1, 1] units
    tolerance = 0 if dtype == torch.float32 else 2e-2
    assert flow.forward.dtype == torch.float32 and flow.forward.shape == (3, 2, 36, 150)
    torch.testing.assert_close(flow.forward, x[1:] - x[:-1], atol=tolerance + 1e-6, rtol=0)
    torch.testing.assert_close(flow.backward, x[:-1] - x[1:], atol=tolerance + 1e-6, rtol=0)
    for image1, image2 in raft.calls:
        assert image1.dtype == image2.dtype == dtype
        assert image1.min() >= -1 and image1.max() <= 1 and image1.min() < -0.9 and image1.max() > 0.9
        assert image1.shape[-2:] == (128, 152)          # rows: the pyramid minimum 128; columns: 150 → a multiple of 8
        for edge, inner in [(image1[..., 0, :], image1[..., 1, :]), (image1[..., -1, :], image1[..., -2, :]),
                            (image1[..., 0], image1[..., 1]), (image1[..., -1], image1[..., -2])]:
            assert torch.equal(edge, inner)                                    # replicate padding on every side


def test_raft_batches_hold_both_flows_of_their_pairs_and_report_progress_per_pair():
    frames = torch.rand(5, 16, 16, 3)
    raft, calls = DifferenceFlow(torch.float32), []
    batched = estimate_flow(frames, "raft_large", raft=raft, batch_size=3, on_batch=lambda d, t: calls.append((d, t)))
    assert [len(image1) for image1, _ in raft.calls] == [6, 2]                  # 3 pairs forward + backward, then 1
    assert calls == [(3, 4), (4, 4)]
    single = estimate_flow(frames, "raft_large", raft=DifferenceFlow(torch.float32), batch_size=1)
    assert torch.equal(batched.forward, single.forward) and torch.equal(batched.backward, single.backward)


class OutOfMemoryAbove(DifferenceFlow):
    """DifferenceFlow that runs out of memory on calls of more than ``limit`` flows."""

    def __init__(self, limit: int):
        super().__init__(torch.float32)
        self.limit, self.refused = limit, []

    def forward(self, image1, image2):
        if len(image1) > self.limit:
            self.refused.append(len(image1))
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return super().forward(image1, image2)


def test_a_batch_that_runs_out_of_memory_is_retried_in_halves_with_the_same_result():
    frames = torch.rand(6, 16, 16, 3)                                          # 5 pairs
    raft, emptied, calls = OutOfMemoryAbove(limit=4), [], []
    flow = estimate_flow(frames, "raft_small", raft=raft, batch_size=8, on_batch=lambda d, t: calls.append((d, t)),
                         on_out_of_memory=lambda: emptied.append(True))
    assert raft.refused == [10, 8] and len(emptied) == 2                        # 5 pairs, then 4, then 2 fit
    assert [len(image1) for image1, _ in raft.calls] == [4, 4, 2]
    assert calls == [(2, 5), (4, 5), (5, 5)]
    single = estimate_flow(frames, "raft_small", raft=DifferenceFlow(torch.float32), batch_size=1)
    assert torch.equal(flow.forward, single.forward) and torch.equal(flow.backward, single.backward)


def test_out_of_memory_on_one_pair_is_a_clear_error():
    with pytest.raises(torch.OutOfMemoryError, match="single frame pair at 16x12"):
        estimate_flow(torch.rand(3, 12, 16, 3), "raft_small", raft=OutOfMemoryAbove(limit=1), batch_size=4)


def test_raft_runs_at_the_capped_resolution():
    frames = torch.rand(3, 300, 604, 3)
    raft = DifferenceFlow(torch.float32)
    flow = estimate_flow(frames, "raft_small", raft=raft, batch_size=4, max_size=302)
    assert {tuple(image1.shape[-2:]) for image1, _ in raft.calls} == {(152, 304)}    # 150x302, padded to /8
    assert flow.forward.shape == (2, 2, 300, 604)


def test_raft_memory_estimate_grows_faster_than_the_pixels_and_linearly_in_flows():
    small, large = raft_working_bytes((256, 256), 2), raft_working_bytes((512, 512), 2)
    assert 8 < large / small <= 16                                          # 4x the pixels, the volume 16x
    assert raft_working_bytes((512, 512), 4) == 2 * large


@pytest.mark.parametrize("variant, constructor, prefix, frames", [("raft_small", raft_small, "", 3),
                                                                  ("raft_large", raft_large, "module.", 2)])
def test_random_raft_weights_load_and_give_flows_of_the_frames_shape(tmp_path, variant, constructor, prefix, frames):
    torch.manual_seed(0)
    path = tmp_path / f"{variant}.pth"
    torch.save({prefix + k: v for k, v in constructor(weights=None).state_dict().items()}, path)
    raft = build_raft(variant, torch.load(path, weights_only=True))
    assert not raft.training
    flow = estimate_flow(torch.rand(frames, 64, 96, 3), variant, raft=raft, batch_size=4)
    assert flow.forward.shape == flow.backward.shape == (frames - 1, 2, 64, 96)
    assert flow.occlusion.shape == (frames - 1, 64, 96) and flow.occlusion.dtype == torch.bool
    assert flow.forward.dtype == torch.float32 and flow.forward.isfinite().all() and flow.backward.isfinite().all()


def test_raft_small_weights_given_as_raft_large_are_named():
    with pytest.raises(ValueError, match="raft_large.*looks like a raft_small checkpoint"):
        build_raft("raft_large", raft_small(weights=None).state_dict())


def test_foreign_weights_are_refused():
    with pytest.raises(ValueError, match="not a torchvision RAFT checkpoint"):
        build_raft("raft_small", {"conv.weight": torch.zeros(4, 3, 3, 3)})
    with pytest.raises(ValueError, match="variant"):
        build_raft("raft_huge", {})


# ------------------------------------------------------------------------------------------------ warping
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["subpixel_translation", "rotation"])
def test_backward_warp_with_ground_truth_flow_reproduces_the_frames(clips, name, dtype):
    clip = clips[name]
    images = clip.frames.permute(0, 3, 1, 2).to(dtype)                        # (F, 3, H, W)
    warped, valid = backward_warp(images[1:], clip.flow_forward)
    assert warped.dtype == dtype and valid.dtype == torch.bool
    visible = valid & ~clip.occlusion_forward
    error = (warped.float() - images[:-1].float()).abs().amax(1)[visible]     # (visible,) worst channel
    assert error.mean() < 0.02 and error.max() < 0.1                           # bilinear interpolation only
    still = (images[1:].float() - images[:-1].float()).abs().amax(1)[visible]
    assert still.mean() > 5 * error.mean()                                     # the frames do move


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_warp_by_whole_pixels_is_a_shift(dtype):
    image = torch.rand(2, 3, 10, 14).to(dtype)
    flow = torch.zeros(2, 2, 10, 14)
    flow[:, 0], flow[:, 1] = 2.0, -1.0
    warped, valid = backward_warp(image, flow)
    expected_valid = torch.zeros(2, 10, 14, dtype=torch.bool)
    expected_valid[:, 1:, :12] = True
    assert torch.equal(valid, expected_valid)
    torch.testing.assert_close(warped[:, :, 1:, :12], image[:, :, :-1, 2:], atol=1e-5, rtol=0)
    unchanged, all_valid = backward_warp(image, torch.zeros(2, 2, 10, 14))
    torch.testing.assert_close(unchanged, image, atol=1e-5, rtol=0)
    assert all_valid.all()
