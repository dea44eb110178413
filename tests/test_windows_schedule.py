"""Frame-window schedules and blending (engine/frame_windows.py): coverage, weights, exact batches; pinned to core."""
import pytest
import torch

from tve.engine.frame_windows import Blend, Window, batches, overlapping_windows, pyramid_weights, windows_with_shared


@pytest.mark.parametrize("frames,size,overlap", [(1, 4, 0), (16, 16, 4), (17, 16, 4), (240, 16, 4), (37, 8, 7),
                                                 (20, 6, 0)])
def test_overlapping_windows_cover_every_frame_with_full_windows_and_the_overlap(frames, size, overlap):
    windows = overlapping_windows(frames, size, overlap)
    assert sorted({f for w in windows for f in w}) == list(range(frames))
    assert all(len(w) == min(size, frames) and w == list(range(w[0], w[0] + len(w))) for w in windows)
    for a, b in zip(windows, windows[1:]):
        assert len(set(a) & set(b)) >= overlap                     # neighbours share at least the overlap


def test_batches_cover_each_frame_once():
    assert batches(10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("bad", [(0, 4, 0), (4, 0, 0), (4, 4, 4), (4, 4, -1)])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(ValueError, match="frame windows"):
        overlapping_windows(*bad)


def test_pyramid_weights_rise_to_the_middle_and_fall_symmetrically():
    assert pyramid_weights(4) == [1, 2, 2, 1] and pyramid_weights(5) == [1, 2, 3, 2, 1] and pyramid_weights(1) == [1]


def test_shared_frames_join_each_window_with_weight_zero():
    windows = windows_with_shared([[0, 1, 2], [2, 3, 4]], lambda own: [0])
    assert windows[1].frames.tolist() == [0, 2, 3, 4] and windows[1].weights[0] == 0
    assert windows[0].weights.tolist() == [1, 2, 1]               # own frame 0 keeps its weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blend_of_batches_is_exact_and_of_overlaps_is_the_weighted_mean(dtype):
    x = torch.randn(6, 3, dtype=dtype)
    blend = Blend(6)
    for w in windows_with_shared(batches(6, 4)):
        blend.add(w, [x[w.frames]])
    assert torch.equal(blend.result(dtype)[0], x)
    blend = Blend(4)
    a, b = torch.ones(3, 1, dtype=dtype), 3 * torch.ones(3, 1, dtype=dtype)
    first, second = windows_with_shared([[0, 1, 2], [1, 2, 3]])
    blend.add(first, [a])
    blend.add(second, [b])
    out = blend.result(dtype)[0].float().flatten()                # pyramid weights 1, 2, 1 in each window
    assert torch.allclose(out, torch.tensor([1.0, 5 / 3, 7 / 3, 3.0]), atol=1e-6 if dtype == torch.float32 else 2e-2)


def test_a_frame_in_no_window_with_weight_is_an_error():
    blend = Blend(3)
    blend.add(Window(torch.tensor([0, 1]), torch.ones(2)), [torch.zeros(2, 1)])
    with pytest.raises(RuntimeError, match=r"frames \[2\]"):
        blend.result(torch.float32)


@pytest.mark.real_host
@pytest.mark.parametrize("frames,size,overlap", [(16, 16, 4), (17, 16, 4), (64, 16, 4), (240, 12, 3), (30, 8, 0)])
def test_schedules_and_weights_are_cores_standard_static_batched_and_pyramid(frames, size, overlap):
    from tve.tests.hosts import core_context_handler
    static, batched = (core_context_handler(size, overlap, schedule) for schedule in ("standard_static", "batched"))
    assert overlapping_windows(frames, size, overlap) == static.context_schedule.func(frames, static, {})
    assert batches(frames, size) == batched.context_schedule.func(frames, batched, {})
    assert all(pyramid_weights(n) == static.fuse_method.func(n) for n in range(1, 20))
