"""Temporal-consistency metrics of an edited video under the source video's optical flow.

Warping error (Lai et al., ECCV 2018, §4.2; the E_warp of FLATTEN §4.1 and TokenFlow §5): frame t+1 is backward-
warped into frame t's grid with the source flow t → t+1; the squared error, summed over RGB in [0, 1], is averaged
over the non-occluded pixels of the pair, then over consecutive pairs. Flicker index: the mean absolute change of a
frame's mean intensity between consecutive frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .warp import backward_warp


@dataclass(frozen=True)
class Consistency:
    warp_error: float            # E_warp, as a plain mean (multiply by 10³ for the papers' unit)
    flicker: float               # mean |Δ mean intensity| between consecutive frames
    per_pair: torch.Tensor       # (F-1,) warp error of each consecutive pair


def warp_error_per_pair(frames: torch.Tensor, flow_forward: torch.Tensor, occlusion: torch.Tensor) -> torch.Tensor:
    """frames (F, H, W, 3) in [0, 1]; flow_forward (F-1, 2, H, W) px, t → t+1; occlusion (F-1, H, W) bool.

    Pixels whose warped position leaves the frame count as occluded. A pair with no visible pixel scores 0.
    Computed in float32 whatever the frames' dtype.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"images: expected IMAGE frames (F, H, W, 3), got shape {tuple(frames.shape)}")
    f, h, w, _ = frames.shape
    if flow_forward.shape != (f - 1, 2, h, w) or occlusion.shape != (f - 1, h, w):
        raise ValueError(f"flow: expected {f - 1} frame pairs of {w}x{h} to match the images, got flow "
                         f"{tuple(flow_forward.shape)} and occlusion {tuple(occlusion.shape)}")
    x = frames.float().permute(0, 3, 1, 2)                               # (F, 3, H, W)
    warped, valid = backward_warp(x[1:], flow_forward.to(x))              # frame t+1 seen from frame t
    visible = (valid & ~occlusion.to(valid.device)).float()              # (F-1, H, W)
    sq = ((warped - x[:-1]) ** 2).sum(1)                                 # summed over RGB, (F-1, H, W)
    return (sq * visible).sum((1, 2)) / visible.sum((1, 2)).clamp(min=1.0)


def flicker_index(frames: torch.Tensor) -> float:
    means = frames.float().mean(dim=(1, 2, 3))                           # (F,)
    return float((means[1:] - means[:-1]).abs().mean()) if len(means) > 1 else 0.0


def measure_consistency(frames: torch.Tensor, flow_forward: torch.Tensor, occlusion: torch.Tensor) -> Consistency:
    per_pair = warp_error_per_pair(frames, flow_forward, occlusion)
    return Consistency(warp_error=float(per_pair.mean()), flicker=flicker_index(frames), per_pair=per_pair)
