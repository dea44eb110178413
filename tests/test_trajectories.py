"""FLATTEN trajectories (FLATTEN §3.2) on the video world's exact flows: a partition of every frame's cells into
chains along the flow, seeded collisions, any grid shape."""
import pytest
import torch
import torch.nn.functional as F

from tve.flow.estimate import FlowField, estimate_flow
from tve.flow.trajectories import (MOTION_RULES, Trajectories, build_trajectories, build_trajectory_grid,
                                   unet_token_grids)
from tve.tools.video_world import Clip, render_clip, translation_clip


def exact_flow(clip: Clip, dtype: torch.dtype = torch.float32) -> FlowField:
    return FlowField(clip.flow_forward.to(dtype), clip.flow_backward.to(dtype), clip.occlusion_forward, "exact")


def decode(cells: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    return cells // w, cells % w


def expected_links(flow: FlowField, h: int, w: int, cut_occluded: bool, motion: str = "cell_mean"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The linking rule restated: (F-1, h·w) landing cell (clamped) and whether the cell links. cell_mean: the
    nearest cell to centre + area-mean flow; top_left: the cell plus the flow read by nearest down-sampling (the
    cell's first pixel) rounded half to even, as FLATTEN's code does."""
    y, x = decode(torch.arange(h * w), w)
    if motion == "cell_mean":
        mean = F.adaptive_avg_pool2d(flow.forward.float(), (h, w))           # area mean, (F-1, 2, h, w)
        land_x = torch.floor(x + mean[:, 0].flatten(1) * w / flow.width + 0.5).long()
        land_y = torch.floor(y + mean[:, 1].flatten(1) * h / flow.height + 0.5).long()
    else:
        corner = F.interpolate(flow.forward.float(), size=(h, w), mode="nearest")     # (F-1, 2, h, w) px
        land_x = x + torch.round(corner[:, 0].flatten(1) * w / flow.width).long()
        land_y = y + torch.round(corner[:, 1].flatten(1) * h / flow.height).long()
    links = (land_x >= 0) & (land_x < w) & (land_y >= 0) & (land_y < h)
    if cut_occluded:
        links &= F.adaptive_avg_pool2d(flow.occlusion.float()[:, None], (h, w)).flatten(1) <= 0.5
    return land_y.clamp(0, h - 1) * w + land_x.clamp(0, w - 1), links


def assert_partition(grid, frames: int) -> None:
    """Every cell of every frame lies on exactly one trajectory, and tracks and track_of agree."""
    h, w = grid.grid_hw
    tracks, track_of = grid.tracks, grid.track_of
    assert tracks.dtype == track_of.dtype == torch.long
    assert track_of.shape == (frames, h * w) and tracks.shape[1] == frames
    assert torch.equal(tracks[track_of, torch.arange(frames)[:, None]], torch.arange(h * w).expand(frames, -1))
    present = tracks >= 0
    assert int(present.sum()) == frames * h * w                               # no cell listed twice
    first = present.long().argmax(1)
    last = frames - 1 - present.flip(1).long().argmax(1)
    assert present.any(1).all() and torch.equal(present.sum(1), last - first + 1)   # non-empty, no gaps


# ------------------------------------------------------------------------------------------------ grids
def test_unet_token_grids_halve_like_stride_two_convolutions():
    assert unet_token_grids((64, 64)) == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert unet_token_grids((45, 80)) == [(45, 80), (23, 40), (12, 20), (6, 10)]
    assert unet_token_grids((9, 5), levels=5) == [(9, 5), (5, 3), (3, 2), (2, 1), (1, 1)]
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    x = torch.zeros(1, 1, 45, 81)
    sizes = [tuple(x.shape[-2:])]
    for _ in range(3):
        x = conv(x)
        sizes.append(tuple(x.shape[-2:]))
    assert unet_token_grids((45, 81)) == sizes


def test_bad_grid_sizes_are_refused():
    with pytest.raises(ValueError, match="latent_hw"):
        unet_token_grids((0, 8))


# ------------------------------------------------------------------------------------------------ translation
@pytest.fixture(scope="module")
def translation():
    """96x160 frames moving (13, -6) px per frame: offsets differ per grid and none is near a rounding tie."""
    return translation_clip(4, 96, 160, 13.0, -6.0, seed=2)


@pytest.mark.parametrize("motion", MOTION_RULES)
@pytest.mark.parametrize("cut_occluded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_translation_gives_straight_trajectories_with_the_right_offsets_at_every_grid(translation, dtype,
                                                                                      cut_occluded, motion):
    flow = exact_flow(translation, dtype)
    trajectories = build_trajectories(flow, (12, 20), cut_occluded=cut_occluded, motion=motion)
    assert list(trajectories.grids) == unet_token_grids((12, 20)) == [(12, 20), (6, 10), (3, 5), (2, 3)]
    for (h, w), (step_x, step_y) in zip(trajectories.grids, [(2, -1), (1, 0), (0, 0), (0, 0)]):
        grid = trajectories.at((h, w))
        assert_partition(grid, flow.frames)
        tracks = grid.tracks
        steps = (tracks[:, :-1] >= 0) & (tracks[:, 1:] >= 0)                  # (n, F-1) linked consecutive cells
        y0, x0 = decode(tracks[:, :-1], w)
        y1, x1 = decode(tracks[:, 1:], w)
        assert steps.any()
        assert torch.equal(x1[steps] - x0[steps], torch.full_like(x0[steps], step_x))
        assert torch.equal(y1[steps] - y0[steps], torch.full_like(y0[steps], step_y))
        if not cut_occluded:                                                  # chains end only at the grid's edge
            ends = (tracks[:, :-1] >= 0) & (tracks[:, 1:] < 0)
            y_end, x_end = y0[ends] + step_y, x0[ends] + step_x
            assert ((x_end < 0) | (x_end >= w) | (y_end < 0) | (y_end >= h)).all()
            starts = (tracks[:, :-1] < 0) & (tracks[:, 1:] >= 0)
            y_from, x_from = y1[starts] - step_y, x1[starts] - step_x
            assert ((x_from < 0) | (x_from >= w) | (y_from < 0) | (y_from >= h)).all()


def test_identical_frames_give_full_length_trajectories_over_every_cell(translation):
    frames = translation.frames[:1].expand(5, -1, -1, -1)
    trajectories = build_trajectories(estimate_flow(frames, "dis"), (12, 20))
    for (h, w), grid in trajectories.grids.items():
        assert torch.equal(grid.tracks, torch.arange(h * w)[:, None].expand(-1, 5))
        assert torch.equal(grid.track_of, torch.arange(h * w).expand(5, -1))


# ------------------------------------------------------------------------------------------------ sprites
@pytest.fixture(scope="module")
def sprites():
    """Camera motion plus three occluding sprites, sped up so that cells collide."""
    return exact_flow(render_clip(5, 64, 96, seed=3, sprites=3, speed=3.0))


@pytest.mark.parametrize("motion", MOTION_RULES)
@pytest.mark.parametrize("cut_occluded", [True, False])
def test_every_cell_lies_on_one_trajectory_that_follows_the_flow(sprites, cut_occluded, motion):
    flow = sprites
    trajectories = build_trajectories(flow, (8, 12), seed=7, cut_occluded=cut_occluded, motion=motion)
    assert trajectories.frames == 5 and trajectories.latent_hw == (8, 12)
    collisions = 0
    for (h, w), grid in trajectories.grids.items():
        assert_partition(grid, flow.frames)
        landing, links = expected_links(flow, h, w, cut_occluded, motion)   # (F-1, h·w)
        for t in range(flow.frames - 1):
            cells = torch.arange(h * w)
            after = grid.tracks[grid.track_of[t], t + 1]                     # each cell's next position, or -1
            continued = after >= 0
            assert torch.equal(after[continued], landing[t, continued])      # links follow the flow
            assert not (continued & ~links[t]).any()                         # and only where the rule allows
            lost = links[t] & ~continued                                     # collision losers: the landing cell
            winner = grid.tracks[grid.track_of[t + 1, landing[t, lost]], t]  # continues another chain from t
            assert (winner >= 0).all() and (winner != cells[lost]).all()
            collisions += int(lost.sum())
            started = grid.tracks[grid.track_of[t + 1], t] < 0             # chains born at t+1
            assert not torch.isin(cells[started], landing[t, links[t]]).any()
    assert collisions > 0


def test_same_seed_same_trajectories_and_the_seed_decides_collisions(sprites):
    first = build_trajectory_grid(sprites, (8, 12), seed=11)
    again = build_trajectory_grid(sprites, (8, 12), seed=11)
    assert torch.equal(first.tracks, again.tracks) and torch.equal(first.track_of, again.track_of)
    others = [build_trajectory_grid(sprites, (8, 12), seed=s) for s in range(12, 16)]
    assert any(not torch.equal(first.track_of, other.track_of) for other in others)


@pytest.mark.parametrize("cut_occluded", [True, False])
def test_cells_more_than_half_occluded_end_their_trajectory(cut_occluded):
    """Still frames, 4x6 grid of 8 px cells; in pair 0, cell (1, 2) is fully occluded, cell (2, 4) 3/4 and cell
    (0, 0) exactly half (not cut)."""
    occlusion = torch.zeros(2, 32, 48, dtype=torch.bool)
    occlusion[0, 8:16, 16:24] = True
    occlusion[0, 16:22, 32:40] = True
    occlusion[0, 0:4, 0:8] = True
    flow = FlowField(torch.zeros(2, 2, 32, 48), torch.zeros(2, 2, 32, 48), occlusion, "still")
    grid = build_trajectory_grid(flow, (4, 6), cut_occluded=cut_occluded)
    assert_partition(grid, 3)
    cut = [1 * 6 + 2, 2 * 6 + 4] if cut_occluded else []
    ended = (grid.tracks[:, 0] >= 0) & (grid.tracks[:, 1] < 0)
    assert sorted(grid.tracks[ended, 0].tolist()) == cut
    assert len(grid.tracks) == 24 + len(cut)                                 # the cut cells restart at frame 1


# ------------------------------------------------------------------------------------------------ motion rules
def uniform_flow(frames: int, height: int, width: int, dx: float, dy: float) -> FlowField:
    forward = torch.tensor([dx, dy]).view(1, 2, 1, 1).expand(frames - 1, 2, height, width).contiguous()
    return FlowField(forward, -forward, torch.zeros(frames - 1, height, width, dtype=torch.bool), "uniform")


def next_cells(grid) -> torch.Tensor:
    """(h·w,) the frame-1 cell each frame-0 cell continues to, -1 where its trajectory ends."""
    return grid.tracks[grid.track_of[0], 1]


# The cells a displacement of d cells moves a cell by, written out by hand: top_left rounds d half to even,
# cell_mean takes the cell nearest to centre + d (a half rounds up).
HALF_CELL_OFFSETS = {  # d: (top_left, cell_mean)
    0.5: (0, 1), 1.5: (2, 2), 2.5: (2, 3), -0.5: (0, 0), -1.5: (-2, -1), -2.5: (-2, -2), 0.49: (0, 0), 1.51: (2, 2)}


@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("cells", sorted(HALF_CELL_OFFSETS))
def test_half_cell_motions_round_half_to_even_at_the_top_left_and_half_up_from_the_centre(cells, axis):
    h, w = (3, 12) if axis == "x" else (12, 3)                               # 8 px cells along the motion
    flow = uniform_flow(2, 8 * h, 8 * w, 8 * cells if axis == "x" else 0.0, 8 * cells if axis == "y" else 0.0)
    y, x = decode(torch.arange(h * w), w)
    for motion, offset in zip(("top_left", "cell_mean"), HALF_CELL_OFFSETS[cells]):
        moved = x + offset if axis == "x" else y + offset
        inside = (moved >= 0) & (moved < (w if axis == "x" else h))
        target = (y * w + x + offset) if axis == "x" else ((y + offset) * w + x)
        nxt = next_cells(build_trajectory_grid(flow, (h, w), cut_occluded=False, motion=motion))
        assert torch.equal(nxt >= 0, inside), (motion, cells)
        assert torch.equal(nxt[inside], target[inside]), (motion, cells)


def test_the_two_rules_differ_on_a_motion_boundary_that_crosses_a_cell():
    """A 4x6 grid of 8 px cells; an object over the first 10 px columns moves one cell right, the rest is still.
    Column 1's cells (px 8-15) have their top-left pixel on the object but only a quarter of their area: top_left
    moves them one cell, cell_mean (mean motion 2 px = a quarter cell) keeps them."""
    h, w = 4, 6
    forward = torch.zeros(1, 2, 8 * h, 8 * w)
    forward[:, 0, :, :10] = 8.0
    flow = FlowField(forward, -forward, torch.zeros(1, 8 * h, 8 * w, dtype=torch.bool), "boundary")
    y, x = decode(torch.arange(h * w), w)
    landing = {"cell_mean": torch.where(x == 0, x + 1, x), "top_left": torch.where(x <= 1, x + 1, x)}
    assert not torch.equal(landing["cell_mean"], landing["top_left"])
    for motion in MOTION_RULES:
        for seed in range(3):
            nxt = next_cells(build_trajectory_grid(flow, (h, w), seed=seed, cut_occluded=False, motion=motion))
            target = y * w + landing[motion]
            continued = nxt >= 0
            assert torch.equal(nxt[continued], target[continued]), motion      # links follow the rule
            for cell in target.unique():                                       # one candidate wins each landing
                assert int(continued[target == cell].sum()) == 1, (motion, int(cell))


def test_top_left_reads_the_first_pixel_of_each_cell_when_cells_are_not_whole_pixels():
    """A 3x3 grid on 10x10 px: cells span [0, 3.3), [3.3, 6.7), [6.7, 10), first pixels 0, 3, 6. The flow moves
    those rows/columns one cell down/right (10/3 px) and every other pixel one cell up/left: reading any other
    pixel of a cell (the centre, ⌈i·10/3⌉, a rounded ⌊(i+½)·10/3⌋) moves it up/left instead."""
    first = torch.zeros(10, dtype=torch.bool)
    first[[0, 3, 6]] = True
    step = torch.where(first, 10 / 3, -10 / 3)
    forward = torch.stack([step.view(1, 10).expand(10, 10), step.view(10, 1).expand(10, 10)])[None]
    flow = FlowField(forward, -forward, torch.zeros(1, 10, 10, dtype=torch.bool), "first pixels")
    y, x = decode(torch.arange(9), 3)
    inside = (y < 2) & (x < 2)
    nxt = next_cells(build_trajectory_grid(flow, (3, 3), cut_occluded=False, motion="top_left"))
    assert torch.equal(nxt >= 0, inside)
    assert torch.equal(nxt[inside], ((y + 1) * 3 + x + 1)[inside])


def test_an_unknown_motion_rule_is_refused(translation):
    with pytest.raises(ValueError, match="motion"):
        build_trajectory_grid(exact_flow(translation), (12, 20), motion="centre")


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_square_grids_map_back_to_the_right_cells(dtype):
    """A 5x15 grid of 8 px cells; every cell moves one row down and row y moves (y mod 3) - 1 cells sideways."""
    h, w, frames = 5, 15, 3
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cell_dx, cell_dy = y % 3 - 1, torch.ones_like(y)
    per_cell = torch.stack([cell_dx, cell_dy]).float() * 8                    # (2, h, w) px
    forward = per_cell.repeat_interleave(8, 1).repeat_interleave(8, 2).expand(frames - 1, -1, -1, -1)
    flow = FlowField(forward.to(dtype), -forward.to(dtype), torch.zeros(frames - 1, 40, 120, dtype=torch.bool), "t")
    grid = build_trajectory_grid(flow, (h, w))
    assert_partition(grid, frames)
    nxt = grid.tracks[grid.track_of[0], 1]                                   # frame-1 cell of each frame-0 cell
    row, col = (y + cell_dy).flatten(), (x + cell_dx).flatten()
    inside = (col >= 0) & (col < w) & (row < h)
    assert torch.equal(nxt >= 0, inside)
    assert torch.equal(nxt[inside], (row * w + col)[inside])


def test_asking_for_a_grid_that_was_not_built_names_the_available_ones(translation):
    trajectories = build_trajectories(exact_flow(translation), (12, 20), levels=2)
    assert isinstance(trajectories, Trajectories) and list(trajectories.grids) == [(12, 20), (6, 10)]
    with pytest.raises(ValueError, match=r"\(12, 20\).*\(6, 10\)"):
        trajectories.at((3, 5))
