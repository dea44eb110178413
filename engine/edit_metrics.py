"""Consistency Metrics (TVE): warp error and flicker of frames under the source flow (``flow/consistency.py``, Lai et
al. 2018), on the pixels the flow was computed on."""
from __future__ import annotations

import torch

from ..flow.consistency import Consistency, measure_consistency
from ..flow.estimate import FlowField
from ..flow.latent_crop import match_frames
from . import validation


def measure_frames(images: torch.Tensor, flow: FlowField, name: str) -> Consistency:
    """Warp error and flicker of ``images`` under ``flow``: source-size frames are cropped as VAEEncode crops them,
    frames decoded from the latent are taken as they are (``flow/latent_crop.py``)."""
    validation.frames(images, name, 2)
    if flow.crop is not None:
        return measure_consistency(match_frames(images, flow.crop, flow.frames, name, "flow"), flow.forward,
                                   flow.occlusion)
    if images.ndim != 4 or tuple(images.shape[:3]) != (flow.frames, flow.height, flow.width):
        raise ValueError(f"{name}: {tuple(images.shape[:3])} (frames, height, width) differs from the flow's "
                         f"{(flow.frames, flow.height, flow.width)}; measure frames of the size the flow was "
                         "computed on")
    return measure_consistency(images, flow.forward, flow.occlusion)


def measure_frames(images: torch.Tensor, flow: FlowField, name: str) -> Consistency:
    """Warp error and flicker of ``images`` under ``flow``: source-size frames are cropped as VAEEncode crops them,
    frames decoded from the latent are taken as they are (``flow/latent_crop.py``)."""
    validation.frames(images, name, 2)
    if flow.crop is not None:
        return measure_consistency(match_frames(images, flow.crop, flow.frames, name, "flow"), flow.forward,
                                   flow.occlusion)
    if images.ndim != 4 or tuple(images.shape[:3]) != (flow.frames, flow.height, flow.width):
        raise ValueError(f"{name}: {tuple(images.shape[:3])} (frames, height, width) differs from the flow's "
                         f"{(flow.frames, flow.height, flow.width)}; measure frames of the size the flow was "
                         "computed on")
    return measure_consistency(images, flow.forward, flow.occlusion)
