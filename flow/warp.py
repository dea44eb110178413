"""Backward warping: sample an image at the points a flow field sends each pixel to."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def backward_warp(image: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """image (N, C, H, W) sampled bilinearly at x + flow(x); flow (N, 2, H, W) in pixels (dx, dy).

    Returns ``(warped, valid)``: warped (N, C, H, W) in ``image``'s dtype; valid (N, H, W) bool, True where the
    sample point lies inside the frame, [0, W-1] x [0, H-1] (pixel centres at integers). Points outside take the
    nearest border value. Coordinates and interpolation run in at least float32 whatever the image's dtype.
    """
    if image.ndim != 4:
        raise ValueError(f"image: expected (N, C, H, W), got shape {tuple(image.shape)}")
    n, _, h, w = image.shape
    if flow.shape != (n, 2, h, w):
        raise ValueError(f"flow: expected (N, 2, H, W) = {(n, 2, h, w)} to match the image, got {tuple(flow.shape)}")
    compute = torch.promote_types(image.dtype, torch.float32) if image.is_floating_point() else torch.float32
    flow = flow.to(image.device, compute)
    ys = torch.arange(h, device=image.device, dtype=compute)[:, None]
    xs = torch.arange(w, device=image.device, dtype=compute)[None, :]
    x = xs + flow[:, 0]                                                   # (N, H, W) sample points, px
    y = ys + flow[:, 1]
    valid = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    grid = torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], dim=-1)   # (N, H, W, 2)
    warped = F.grid_sample(image.to(compute), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return warped.to(image.dtype), valid
