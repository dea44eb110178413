"""Flow colour wheel (Middlebury), occlusion pictures and trajectory drawings."""
import math

import pytest
import torch

from tve.flow.estimate import FlowField
from tve.flow.preview import draw_tracks, flow_to_color, occlusion_to_image
from tve.flow.trajectories import build_trajectory_grid
from tve.tools.video_world import translation_clip

DTYPES = [torch.float32, torch.bfloat16]


def uniform_flow(dx: float, dy: float, frames: int = 1, size: int = 4) -> torch.Tensor:
    return torch.tensor([dx, dy]).view(1, 2, 1, 1).expand(frames, 2, size, size).clone()


def colour_of(dx: float, dy: float, max_magnitude: float | None = 1.0) -> torch.Tensor:
    return flow_to_color(uniform_flow(dx, dy), max_magnitude)[0, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_colours_are_images_in_the_unit_range(dtype):
    flow = (torch.randn(3, 2, 20, 30) * 5).to(dtype)
    image = flow_to_color(flow)
    assert image.shape == (3, 20, 30, 3) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1


def test_zero_flow_is_white():
    assert torch.equal(flow_to_color(torch.zeros(2, 2, 5, 7)), torch.ones(2, 5, 7, 3))


def test_colour_depends_on_direction():
    angles = [k * math.pi / 4 for k in range(8)]
    colours = torch.stack([colour_of(math.cos(a), math.sin(a)) for a in angles])          # (8, 3)
    distances = torch.cdist(colours, colours) + torch.eye(8) * 10
    assert distances.min() > 0.2
    right, left, down = colour_of(1, 0), colour_of(-1, 0), colour_of(0, 1)
    torch.testing.assert_close(right, torch.tensor([1.0, 0.0, 0.0]), atol=0.02, rtol=0)    # the wheel's red
    assert left[0] < 0.1 and left[1] > 0.5 and left[2] > 0.5                               # cyan side
    assert down[0] > 0.9 and down[2] < 0.1                                                 # orange-yellow


def test_saturation_grows_with_speed_and_overflow_is_darkened():
    whiteness = [float(colour_of(s, 0).min()) for s in (0.25, 0.5, 1.0)]
    assert whiteness[0] > whiteness[1] > whiteness[2]
    torch.testing.assert_close(colour_of(2, 0), 0.75 * colour_of(1, 0))


def test_one_speed_scale_for_all_frames():
    flow = torch.cat([uniform_flow(1, 0), uniform_flow(2, 0)])
    image = flow_to_color(flow)
    torch.testing.assert_close(image[1, 0, 0], colour_of(1, 0))                          # the fastest is full
    torch.testing.assert_close(image[0, 0, 0], colour_of(0.5, 0))


def test_occlusion_is_white_on_black():
    mask = torch.rand(2, 6, 9) > 0.5
    image = occlusion_to_image(mask)
    assert image.shape == (2, 6, 9, 3)
    assert torch.equal(image, mask[..., None].float().expand(-1, -1, -1, 3))


# ------------------------------------------------------------------------------------------------ tracks
@pytest.fixture(scope="module")
def moving():
    clip = translation_clip(4, 48, 80, 9.0, 4.0, seed=5)
    flow = FlowField(clip.flow_forward, clip.flow_backward, clip.occlusion_forward, "exact")
    return clip.frames, build_trajectory_grid(flow, (6, 10))


def changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return (before != after).any(-1)                                          # (F, H, W)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_still_track_is_drawn_around_one_cell_centre_and_nothing_else_changes(dtype):
    frames = torch.rand(3, 48, 80, 3).to(dtype)
    flow = FlowField(torch.zeros(2, 2, 48, 80), torch.zeros(2, 2, 48, 80), torch.zeros(2, 48, 80, dtype=torch.bool),
                     "still")
    grid = build_trajectory_grid(flow, (6, 10))
    drawn = draw_tracks(frames, grid, 1, seed=0)
    assert drawn.shape == frames.shape and drawn.dtype == dtype
    touched = changed(frames, drawn)
    assert touched.all(0).any()                                               # the same spot on every frame
    ys, xs = touched.any(0).nonzero(as_tuple=True)
    centre_y, centre_x = ys.float().mean(), xs.float().mean()
    assert (ys.float() - centre_y).abs().max() <= 3 and (xs.float() - centre_x).abs().max() <= 3
    assert torch.isclose((centre_y + 0.5) / 8 % 1, torch.tensor(0.5), atol=0.1)  # a cell centre: 8k + 3.5
    assert torch.isclose((centre_x + 0.5) / 8 % 1, torch.tensor(0.5), atol=0.1)


def test_moving_tracks_draw_their_history(moving):
    frames, grid = moving
    drawn = draw_tracks(frames, grid, 3, seed=1)
    touched = changed(frames, drawn).sum((1, 2))                              # (F,) pixels drawn per frame
    assert touched[0] > 0 and touched[-1] > touched[0]
    assert drawn.min() >= 0 and drawn.max() <= 1


def test_the_sample_is_seeded_among_the_longest_tracks(moving):
    frames, grid = moving
    first = draw_tracks(frames, grid, 2, seed=3)
    assert torch.equal(first, draw_tracks(frames, grid, 2, seed=3))
    assert any(not torch.equal(first, draw_tracks(frames, grid, 2, seed=s)) for s in range(4, 8))
    longest = int((grid.tracks >= 0).sum(1).max())
    full = grid.tracks[(grid.tracks >= 0).sum(1) == longest]
    touched = changed(frames, first)[0]                                       # frame 0: dots of the chosen tracks
    ys, xs = touched.nonzero(as_tuple=True)
    cells = (ys // 8) * 10 + xs // 8
    assert torch.isin(cells, full[:, 0]).float().mean() > 0.5                 # drawn at long tracks' cells


def test_asking_for_more_tracks_than_exist_draws_them_all(moving):
    frames, grid = moving
    assert draw_tracks(frames, grid, 10_000, seed=0).shape == frames.shape
