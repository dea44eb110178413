"""Frame-pooled GroupNorm: a 2-D UNet's GroupNorm as FLATTEN's inflated 3-D UNet computes it.

FLATTEN (Cong et al., ICLR 2024) runs SD's UNet inflated to video (as Tune-A-Video, Wu et al. 2023): every ResBlock
and the output norm receive (chunks, C, F, h, w) video tensors, and ``torch.nn.GroupNorm`` on such a tensor takes
its statistics over each group's channels AND all F frames of the chunk (the official code: ``models/resnet.py``
``ResnetBlock3D``, ``models/unet.py`` ``conv_norm_out``). ComfyUI hands a block ``(chunks·F, C, h, w)``, chunk
major (the F frames of one conditioning chunk consecutive); ``frame_pooled_group_norm`` is GroupNorm (Wu & He
2018, Eq. 1–2) over the set S = {frames of the chunk} × {channels of the group} × {pixels}:

    y = (x − μ_S) / √(σ²_S + eps) · γ_c + β_c,   σ²_S biased,

so one frame is plain per-frame GroupNorm and chunks (cond, uncond) never mix. Statistics in float32 (float64
stays float64), the result in the input's dtype; no device-to-host synchronisation.
"""
from __future__ import annotations

import torch


def frame_pooled_group_norm(x: torch.Tensor, frames: int, groups: int, weight: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm of ``x`` (chunks·F, C, *spatial) with statistics pooled over the ``frames`` (F) rows of each chunk.

    Equals ``torch.nn.functional.group_norm`` of the (chunks, C, F, *spatial) tensor, returned to ``x``'s layout.
    ``weight``/``bias`` (C,) are the norm's affine parameters (None: none); ``eps`` as the module's.
    """
    if x.ndim < 2:
        raise ValueError(f"x: expected (chunks*frames, channels, ...), got shape {tuple(x.shape)}")
    rows, channels = x.shape[:2]
    if frames < 1 or rows == 0 or rows % frames:
        raise ValueError(f"frames: expected a positive count dividing the {rows} rows of x, got {frames}")
    if groups < 1 or channels % groups:
        raise ValueError(f"groups: expected a positive count dividing the {channels} channels of x, got {groups}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and tuple(param.shape) != (channels,):
            raise ValueError(f"{name}: expected shape ({channels},), got {tuple(param.shape)}")
    compute = torch.promote_types(x.dtype, torch.float32)
    grouped = x.to(compute).reshape(rows // frames, frames, groups, -1)        # (chunks, F, G, C/G·spatial)
    var, mean = torch.var_mean(grouped, dim=(1, 3), unbiased=False, keepdim=True)   # (chunks, 1, G, 1)
    y = ((grouped - mean) * torch.rsqrt(var + eps)).reshape(x.shape)          # (chunks·F, C, *spatial)
    affine = (channels,) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.to(compute).reshape(affine)
    if bias is not None:
        y = y + bias.to(compute).reshape(affine)
    return y.to(x.dtype)
