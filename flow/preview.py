"""Pictures of flows, occlusions and trajectories for the preview nodes.

Flow colours follow the Middlebury colour wheel (Baker et al., IJCV 2011): hue = direction,
saturation = speed, white = still; speeds beyond the normalising magnitude are darkened to 75 %.
Tracks are drawn with Pillow (which ComfyUI installs), so previews need no OpenCV.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from .trajectories import TrajectoryGrid

# Middlebury wheel: segments red-yellow, yellow-green, green-cyan, cyan-blue, blue-magenta, magenta-red.
_SEGMENTS = (15, 6, 4, 11, 13, 6)
_GOLDEN = (math.sqrt(5) - 1) / 2     # hue step between consecutive track colours
SUPERSAMPLE = 4                       # tracks are rasterised at 4x and box-filtered: anti-aliased edges


def _colour_wheel() -> torch.Tensor:
    """(55, 3) float32 RGB in [0, 1], the Middlebury colour wheel's entries."""
    ramps = []
    for segment, length in enumerate(_SEGMENTS):
        up = torch.floor(255 * torch.arange(length) / length) / 255          # 0 → 1
        down, one, zero = 1 - up, torch.ones(length), torch.zeros(length)
        rgb = [(one, up, zero), (down, one, zero), (zero, one, up),           # red → yellow → green → cyan
               (zero, down, one), (up, zero, one), (one, zero, down)][segment]   # → blue → magenta → red
        ramps.append(torch.stack(rgb, 1))
    return torch.cat(ramps).float()


def _hue(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(..., 3) float32: the wheel's fully saturated colour for the direction of (u, v)."""
    wheel = _colour_wheel().to(u.device)
    entries = wheel.shape[0]
    position = (torch.atan2(-v, -u) / math.pi + 1) / 2 * (entries - 1)     # [0, entries-1]
    k0 = position.floor().long().clamp(0, entries - 1)
    k1 = (k0 + 1) % entries
    fraction = (position - k0)[..., None]
    return (1 - fraction) * wheel[k0] + fraction * wheel[k1]


def flow_to_color(flow: torch.Tensor, max_magnitude: float | None = None) -> torch.Tensor:
    """flow (N, 2, H, W) px → (N, H, W, 3) float32 RGB in [0, 1] on the Middlebury wheel.

    ``max_magnitude`` (px) maps to full saturation; None = the largest speed over all N frames (one scale).
    """
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow: expected (N, 2, H, W), got shape {tuple(flow.shape)}")
    flow = flow.float()
    if max_magnitude is None:
        max_magnitude = float(flow.square().sum(1).sqrt().max()) if flow.numel() else 0.0
    if not max_magnitude > 0:
        max_magnitude = 1.0
    u, v = flow[:, 0] / max_magnitude, flow[:, 1] / max_magnitude           # (N, H, W)
    radius = torch.sqrt(u * u + v * v)[..., None]
    colour = _hue(u, v)
    return torch.where(radius <= 1, 1 - radius * (1 - colour), 0.75 * colour)


def occlusion_to_image(mask: torch.Tensor) -> torch.Tensor:
    """mask (N, H, W) bool → (N, H, W, 3) float32: white where occluded, black elsewhere."""
    if mask.ndim != 3:
        raise ValueError(f"mask: expected (N, H, W), got shape {tuple(mask.shape)}")
    return mask.float()[..., None].expand(*mask.shape, 3).contiguous()


def draw_tracks(frames: torch.Tensor, grid: TrajectoryGrid, count: int, seed: int) -> torch.Tensor:
    """frames (F, H, W, 3) with ``count`` trajectories of ``grid`` drawn as coloured polylines.

    The trajectories are a seeded sample of the longest ones (all as long as the ``count``-th longest). On
    frame f each sampled trajectory present there is drawn from its start to f, through its cells' centres
    scaled to pixels, with a dot at f. Returns the frames' dtype and device; undrawn pixels are unchanged.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected IMAGE frames (F, H, W, 3), got shape {tuple(frames.shape)}")
    count_frames, height, width, _ = frames.shape
    if grid.track_of.shape[0] != count_frames:
        raise ValueError(f"frames: {count_frames} frames but the trajectories span {grid.track_of.shape[0]}")
    if count < 1:
        raise ValueError(f"count: expected at least 1 trajectory, got {count}")
    h, w = grid.grid_hw
    tracks = grid.tracks.cpu()
    present = tracks >= 0                                                  # (n, F)
    lengths = present.sum(1)
    count = min(count, len(tracks))
    shortest = lengths.sort(descending=True).values[count - 1]
    pool = (lengths >= shortest).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    chosen = pool[torch.randperm(len(pool), generator=generator)[:count]]
    cells = tracks[chosen].clamp(min=0)                                    # (count, F)
    # Cell centres in the supersampled image, where pixel j spans [j·s, (j+1)·s).
    x = ((cells % w).double() + 0.5) * (width / w) * SUPERSAMPLE
    y = ((cells // w).double() + 0.5) * (height / h) * SUPERSAMPLE
    points = torch.stack([x, y], -1).tolist()                              # (count, F, 2)
    first = present[chosen].long().argmax(1).tolist()                      # start frame of each track
    hue = torch.arange(len(chosen), dtype=torch.float64) * _GOLDEN * 2 * math.pi
    colours = _hue(torch.cos(hue).float(), torch.sin(hue).float())         # (count, 3) in [0, 1]
    thickness = max(1, round(min(height, width) / 256)) * SUPERSAMPLE
    radius = thickness + SUPERSAMPLE
    canvas = frames.detach().float().cpu().clone()                         # (F, H, W, 3) float32
    for f in range(count_frames):
        # Each track paints its index + 1 into a label image (later tracks on top); coverage comes from the box
        # filter of the supersampled mask, colour from the label, so undrawn pixels keep their exact values.
        labels = Image.new("I", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
        draw = ImageDraw.Draw(labels)
        for i in present[chosen, f].nonzero().squeeze(1).tolist():
            history = [tuple(point) for point in points[i][first[i]:f + 1]]
            if len(history) > 1:
                draw.line(history, fill=i + 1, width=thickness, joint="curve")
            cx, cy = history[-1]
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=i + 1)
        label = torch.from_numpy(np.asarray(labels, dtype=np.int32).copy())  # (H·s, W·s)
        if not label.any():
            continue
        blocks = label.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).permute(0, 2, 1, 3).reshape(height, width, -1)
        coverage = (blocks > 0).float().mean(-1, keepdim=True)             # (H, W, 1)
        top = blocks.amax(-1)                                              # (H, W): the track drawn last wins
        colour = colours[(top - 1).clamp(min=0)]                           # (H, W, 3)
        canvas[f] = torch.where(coverage > 0, canvas[f] * (1 - coverage) + colour * coverage, canvas[f])
    return canvas.clamp(0, 1).to(frames.device, frames.dtype)
