"""Frame-pooled GroupNorm: a 2-D UNet's GroupNorm as FLATTEN's inflated 3-D UNet computes it.

FLATTEN (Cong et al., ICLR 2024) runs SD's UNet inflated to video (as Tune-A-Video, Wu et al. 2023): every ResBlock
and the output norm receive (chunks, C, F, h, w) video tensors, and ``torch.nn.GroupNorm`` on such a tensor takes
its statistics over each group's channels AND all F frames of the chunk (the official code: ``models/resnet.py``
``ResnetBlock3D``, ``models/unet.py`` ``conv_norm_out``). ComfyUI hands a block ``(chunks·F, C, h, w)``, chunk
major (the F frames of one conditioning chunk consecutive); ``frame_pooled_group_norm`` is GroupNorm (Wu & He
2018, Eq. 1–2) over the set S = {frames of the chunk} × {channels of the group} × {pixels}:

    y = (x − μ_S) / √(σ²_S + eps) · γ_c + β_c,   σ²_S biased,

so one frame is plain per-frame GroupNorm and chunks (cond, uncond) never mix. ``video_layout`` / ``frame_layout``
move between the two layouts without copying; ``frame_pooled_group_norm`` computes the statistics in float32
(float64 stays float64) and returns the input's dtype; no device-to-host synchronisation.
"""
from __future__ import annotations

import torch


def video_layout(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``(chunks·F, C, *spatial)`` -> ``(chunks, C, F, *spatial)``, the inflated UNet's layout (a view, no copy):
    any GroupNorm of it pools its statistics over the F frames of each chunk."""
    if x.ndim < 2:
        raise ValueError(f"x: expected (chunks*frames, channels, ...), got shape {tuple(x.shape)}")
    rows = x.shape[0]
    if frames < 1 or rows == 0 or rows % frames:
        raise ValueError(f"frames: expected a positive count dividing the {rows} rows of x, got {frames}")
    return x.unflatten(0, (rows // frames, frames)).transpose(1, 2)


def frame_layout(video: torch.Tensor) -> torch.Tensor:
    """``(chunks, C, F, *spatial)`` -> ``(chunks·F, C, *spatial)``, the inverse of ``video_layout``."""
    if video.ndim < 3:
        raise ValueError(f"video: expected (chunks, channels, frames, ...), got shape {tuple(video.shape)}")
    return video.transpose(1, 2).flatten(0, 1)


def frame_pooled_group_norm(x: torch.Tensor, frames: int, groups: int, weight: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm of ``x`` (chunks·F, C, *spatial) with statistics pooled over the ``frames`` (F) rows of each chunk.

    Equals ``torch.nn.functional.group_norm`` of the (chunks, C, F, *spatial) tensor, returned to ``x``'s layout.
    ``weight``/``bias`` (C,) are the norm's affine parameters (None: none); ``eps`` as the module's. (The engine
    calls the UNet's own GroupNorm module on ``video_layout(x)`` instead, so the module casts its own weights.)
    """
    video = video_layout(x, frames)                                             # (chunks, C, F, *spatial)
    channels = x.shape[1]
    if groups < 1 or channels % groups:
        raise ValueError(f"groups: expected a positive count dividing the {channels} channels of x, got {groups}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and tuple(param.shape) != (channels,):
            raise ValueError(f"{name}: expected shape ({channels},), got {tuple(param.shape)}")
    compute = torch.promote_types(x.dtype, torch.float32)
    y = torch.nn.functional.group_norm(video.to(compute), groups, None if weight is None else weight.to(compute),
                                       None if bias is None else bias.to(compute), eps)
    return frame_layout(y).to(x.dtype)
