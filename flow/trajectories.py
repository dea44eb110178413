"""FLATTEN's patch trajectories: grid cells chained along the optical flow (FLATTEN §3.2).

Per consecutive pair, each cell links to the cell its motion lands it in, if that lies inside the grid and
(optionally) the cell is at most half occluded. The cell's motion (``MOTION_RULES``):

* ``cell_mean`` — the area mean of the image-resolution forward flow over the cell, in cells, from the cell's
  centre: landing ⌊cell + ½ + mean⌋ (the nearest cell, a half rounding up);
* ``top_left`` — the official FLATTEN code's rule (``models/util.py`` ``sample_trajectories``): the flow at ONE
  pixel, the cell's top-left image pixel (⌊i·H/h⌋, ⌊j·W/w⌋, what ``nearest`` down-sampling reads), in cells,
  rounded half to even: landing cell + round(flow). One pixel decides, so on a motion boundary that crosses a
  cell its top-left corner's side wins.

The occlusion cut (area mean of the occlusion mask) is TVE's; the official code has none. When several cells land
on one, a seeded random priority picks the one that continues (the official code draws unseeded); the others
end. Cells of the next frame that nothing reached start new trajectories, so every cell of every frame lies on
exactly one trajectory. Vectorised over cells: the only loop is over frames (the official code and its ports loop
over every cell in Python and seed with ``x // H, x % H``, which is wrong for non-square grids).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .estimate import FlowField
from .latent_crop import LatentCrop

MOTION_RULES = ("cell_mean", "top_left")        # how a cell's motion is read from the flow (module doc)


@dataclass(frozen=True)
class TrajectoryGrid:
    """The trajectories of one token grid."""
    grid_hw: tuple[int, int]
    tracks: torch.Tensor         # (n_traj, F) long: flat cell y·w + x of the trajectory at frame f, -1 if absent
    track_of: torch.Tensor       # (F, h·w) long: trajectory id of each cell (inverse of ``tracks``)


@dataclass(frozen=True)
class Trajectories:
    """The TRAJECTORIES socket: trajectories at every token grid the UNet sees for one latent size."""
    frames: int
    latent_hw: tuple[int, int]
    grids: dict[tuple[int, int], TrajectoryGrid]
    source: torch.Tensor | None = None       # (F, k) fingerprint of the latent they were built for, if known
    crop: LatentCrop | None = None   # the flow's VAEEncode crop: frames of its frame_hw line up through it

    def at(self, grid_hw: tuple[int, int]) -> TrajectoryGrid:
        key = tuple(int(s) for s in grid_hw)
        if key not in self.grids:
            raise ValueError(f"trajectories: no {key[0]}x{key[1]} (h x w) token grid; built for "
                             f"{sorted(self.grids, reverse=True)} from a {self.latent_hw} latent")
        return self.grids[key]


def unet_token_grids(latent_hw: tuple[int, int], levels: int = 4) -> list[tuple[int, int]]:
    """Token grids (h, w) of the UNet's levels: each stride-2 conv (kernel 3, pad 1) gives ceil(size / 2)."""
    h, w = (int(s) for s in latent_hw)
    if h < 1 or w < 1 or levels < 1:
        raise ValueError(f"latent_hw: expected a positive size and levels >= 1, got {latent_hw} and {levels}")
    grids = [(h, w)]
    for _ in range(levels - 1):
        h, w = -(-h // 2), -(-w // 2)
        grids.append((h, w))
    return grids


def build_trajectories(flow: FlowField, latent_hw: tuple[int, int], seed: int = 0, cut_occluded: bool = True,
                       levels: int = 4, motion: str = "cell_mean") -> Trajectories:
    """Trajectories at every grid of :func:`unet_token_grids` of ``latent_hw`` (the same seed for each)."""
    grids = {hw: build_trajectory_grid(flow, hw, seed, cut_occluded, motion)
             for hw in dict.fromkeys(unet_token_grids(latent_hw, levels))}
    return Trajectories(frames=flow.frames, latent_hw=tuple(int(s) for s in latent_hw), grids=grids, crop=flow.crop)


def build_trajectory_grid(flow: FlowField, grid_hw: tuple[int, int], seed: int = 0,
                          cut_occluded: bool = True, motion: str = "cell_mean") -> TrajectoryGrid:
    """Chain the cells of an (h, w) grid along ``flow`` over all frames (FLATTEN §3.2); see the module doc for
    ``motion`` (``MOTION_RULES``).

    Links and collisions are resolved for all frames at once; the chaining then follows each cell's
    predecessor frame by frame. Trajectory ids are numbered by (first frame, first cell).
    """
    h, w = (int(s) for s in grid_hw)
    if h < 1 or w < 1:
        raise ValueError(f"grid_hw: expected a positive (h, w), got {grid_hw}")
    if motion not in MOTION_RULES:
        raise ValueError(f"motion: expected one of {list(MOTION_RULES)}, got {motion!r}")
    frames, cells = flow.frames, h * w
    slot = _landing_slots(flow, h, w, cut_occluded, motion)                          # (F-1, h·w)
    predecessor, reached = _collision_winners(slot, cells, seed)             # (F-1, h·w) each
    device = slot.device
    starts = torch.cat([torch.ones(1, cells, dtype=torch.bool, device=device), ~reached])    # (F, h·w)
    start_id = starts.view(-1).cumsum(0, dtype=torch.int32).view(frames, cells) - 1   # new ids by (frame, cell)
    every_cell = torch.arange(cells, device=device)
    track_of = torch.empty(frames, cells, dtype=torch.long, device=device)
    track_of[0] = every_cell
    for t in range(frames - 1):                                              # follow each cell's predecessor
        torch.where(reached[t], track_of[t].index_select(0, predecessor[t]), start_id[t + 1], out=track_of[t + 1])
    tracks = torch.full((int(start_id[-1, -1]) + 1, frames), -1, dtype=torch.long, device=device)
    at = torch.add(torch.arange(frames, device=device)[:, None], track_of, alpha=frames)      # (F, h·w) flat
    tracks.view(-1).scatter_(0, at.view(-1), every_cell.repeat(frames))
    return TrajectoryGrid(grid_hw=(h, w), tracks=tracks, track_of=track_of)


def _landing_slots(flow: FlowField, h: int, w: int, cut_occluded: bool, motion: str) -> torch.Tensor:
    """(F-1, h·w) long: t·h·w + the cell of frame t+1 that each cell of frame t lands in, or (F-1)·h·w (a spare
    slot) where it does not link: landing outside the grid, or (``cut_occluded``) more than half occluded."""
    pairs, cells = flow.frames - 1, h * w
    device = flow.forward.device
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    cell = torch.stack([xs, ys]).float()                                     # (2, h, w) in cells
    scale = torch.tensor([w / flow.width, h / flow.height], device=device).view(2, 1, 1)
    size = torch.tensor([w, h], device=device).view(2, 1, 1)
    if motion == "cell_mean":
        mean = _area_mean(flow.forward.float(), h, w)                       # (F-1, 2, h, w) px
        landing = torch.addcmul(cell + 0.5, mean, scale).floor_()           # (F-1, 2, h, w) nearest cell (x, y)
    else:
        corner = _top_left(flow.forward, h, w).float()                      # (F-1, 2, h, w) px
        landing = cell + torch.round(corner * scale)                        # half to even, like the official code
    inside = (landing >= 0) & (landing < size)
    linked = inside[:, 0] & inside[:, 1]                                    # (F-1, h, w)
    if cut_occluded:
        linked &= _area_mean(flow.occlusion.to(device, torch.float32)[:, None], h, w)[:, 0] <= 0.5
    landing = landing.to(torch.int32)
    slot = torch.add(landing[:, 0], landing[:, 1], alpha=w)                 # flat cell y·w + x, int32
    slot += torch.arange(0, pairs * cells, cells, device=device, dtype=torch.int32).view(pairs, 1, 1)
    return torch.where(linked, slot, pairs * cells).view(pairs, cells).long()


def _collision_winners(slot: torch.Tensor, cells: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each cell of frame t+1: the cell of frame t whose trajectory continues there ((F-1, h·w) long, 0
    where none) and whether one does ((F-1, h·w) bool).

    Among the cells landing on one cell, the highest priority wins. Priorities are 31 seeded random bits over
    the source cell's index in the low bits: distinct, and the winner's cell is read back from its priority.
    """
    pairs = slot.shape[0]
    device = slot.device
    bits = max(1, (cells - 1).bit_length())
    generator = torch.Generator().manual_seed(seed)
    draw = torch.empty(pairs, cells, dtype=torch.int32).random_(generator=generator).to(device)   # [0, 2^31)
    priority = torch.add(torch.arange(cells, device=device), draw, alpha=1 << bits)           # int64
    best = torch.full((pairs * cells + 1,), -(1 << bits), dtype=torch.long, device=device)   # low bits 0
    best.scatter_reduce_(0, slot.view(-1), priority.view(-1), reduce="amax")
    best = best[:-1].view(pairs, cells)
    return best & ((1 << bits) - 1), best >= 0


def _top_left(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, C, H, W) → (N, C, h, w): each cell's top-left pixel, row ⌊i·H/h⌋ and column ⌊j·W/w⌋ (integer
    arithmetic: the first pixel of the cell's span [i·H/h, (i+1)·H/h))."""
    height, width = x.shape[-2:]
    rows = torch.arange(h, device=x.device) * height // h                  # (h,)
    cols = torch.arange(w, device=x.device) * width // w                   # (w,)
    return x.index_select(-2, rows).index_select(-1, cols)


def _area_mean(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, C, H, W) → (N, C, h, w): the mean over each cell's pixels (adaptive pooling when H, W do not divide)."""
    return x if tuple(x.shape[-2:]) == (h, w) else F.adaptive_avg_pool2d(x, (h, w))
