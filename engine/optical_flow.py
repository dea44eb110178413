"""Optical flow and FLATTEN trajectories for the flow nodes (FLATTEN §3.2; RAFT, Teed & Deng 2020): RAFT loaded
through core's model management, frames cropped as VAEEncode crops them (``flow/latent_crop.py``), so flow,
trajectories, metrics and previews line up with the latent at any frame size. The math: ``flow/``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from ..flow.estimate import FlowField, build_raft, estimate_flow, flow_resolution, is_raft, raft_working_bytes
from ..flow.latent_crop import LatentCrop, match_frames
from ..flow.preview import draw_tracks, flow_to_color, occlusion_to_image
from ..flow.trajectories import MOTION_RULES, Trajectories, build_trajectories
from . import host, validation

FLOW_METHODS = ["raft_large", "raft_small", "dis"]
NO_WEIGHTS = "none (method dis)"
GRID_CHOICES = ["latent", "latent/2", "latent/4", "latent/8"]
DEFAULT_MAX_RESOLUTION = 512
_RAFT_CACHE: dict[tuple, torch.nn.Module] = {}        # the last RAFT built, by (variant, path, mtime, size, dtype)


def check_frames(images: torch.Tensor, method: str, ratio: int, name: str = "images") -> torch.Tensor:
    """Frames optical flow can be computed on: 2 or more, at least one latent cell a side and, for DIS, its patch
    after VAEEncode's crop to a multiple of the VAE's factor ``ratio``."""
    if method == "dis":
        size = -(-validation.DIS_MIN_SIZE // ratio) * ratio
        return validation.frames(images, name, 2, size, f"OpenCV DIS's {validation.DIS_MIN_SIZE} px patch after "
                                 f"VAEEncode's crop to a multiple of {ratio}; RAFT takes smaller frames")
    return validation.frames(images, name, 2, ratio)


def check_flow_matches_latent(flow: FlowField, samples: torch.Tensor) -> None:
    """Frame count and size of the FLOW must be those of the LATENT it will steer (``samples`` already passed
    ``validation.latent``: image latents (F, C, h, w))."""
    frames, (h, w) = samples.shape[0], tuple(samples.shape[-2:])
    if frames != flow.frames:
        raise ValueError(f"latent: has {frames} frames but the flow was computed on {flow.frames}; "
                         "use the same frames for both")
    if flow.crop is not None:
        if (h, w) != flow.crop.latent_hw:
            lh, lw = flow.crop.latent_hw
            raise ValueError(f"latent: {w}x{h} (w x h), but the flow's frames ({flow.crop.describe()}) encode to "
                             f"a {lw}x{lh} latent with its VAE; compute the flow on the frames that were VAE-encoded")
        return
    # A flow made without a crop (in Python): h, w are H/8, W/8 rounded; allow one cell on the shorter side.
    if abs(flow.height * w - flow.width * h) > max(flow.height, flow.width) * (1 + 0.01 * min(h, w)):
        raise ValueError(f"latent: aspect ratio {w}x{h} does not match the flow's {flow.width}x{flow.height}; "
                         "compute the flow on the frames that were VAE-encoded")


def load_raft(method: str, raft_weights: str, dtype: torch.dtype) -> torch.nn.Module:
    """The RAFT module of ``models/optical_flow/<raft_weights>`` in ``dtype``, built once per file (the last one
    stays built; core's model management moves it between devices)."""
    if raft_weights == NO_WEIGHTS:
        raise ValueError(
            f"raft_weights: {method} needs a torchvision RAFT checkpoint; put "
            f"{'raft_large_C_T_SKHT_V2-ff5fadd5.pth' if method == 'raft_large' else 'raft_small_C_T_V2-01064c6d.pth'}"
            f" into one of {host.optical_flow_folders()}, connect core's Load Optical Flow Model to optical_flow, "
            "or choose method 'dis'")
    path = host.optical_flow_path(raft_weights)
    status = os.stat(path)
    key = (method, path, status.st_mtime_ns, status.st_size, dtype)
    if key not in _RAFT_CACHE:
        _RAFT_CACHE.clear()
        _RAFT_CACHE[key] = build_raft(method, host.load_weights(path)).to(dtype)
    return _RAFT_CACHE[key]


def connected_raft(optical_flow: Any, method: str) -> torch.nn.Module:
    """The RAFT module of a core OPTICAL_FLOW (core's Load Optical Flow Model, ComfyUI 0.33+): refused unless it is a
    torchvision RAFT and a RAFT method is chosen."""
    module = host.helper_module(optical_flow)
    if module is None or not is_raft(module):
        got = type(module if module is not None else optical_flow).__name__
        raise ValueError(f"optical_flow: expected a torchvision RAFT loaded by core's Load Optical Flow Model, got a "
                         f"{got}; disconnect it to use raft_weights, or load a RAFT checkpoint")
    if method == "dis":
        raise ValueError("method: 'dis' computes the flow with OpenCV, but a RAFT is connected to optical_flow; "
                         "choose raft_large or raft_small to run the connected RAFT, or disconnect it")
    return module


def estimate_optical_flow(images: torch.Tensor, vae: Any, method: str, raft_weights: str, batch_size: int,
                 max_resolution: int = DEFAULT_MAX_RESOLUTION, optical_flow: Any = None) -> FlowField:
    """Optical Flow (TVE): forward and backward flow and occlusion of ``images`` on the pixels ``vae`` encodes."""
    validation.choice(method, "method", FLOW_METHODS)
    ratio = host.vae_downscale_ratio(vae)
    check_frames(images, method, ratio)
    validation.integer(batch_size, "batch_size", 1)
    validation.integer(max_resolution, "max_resolution", 0)
    crop = LatentCrop(tuple(images.shape[1:3]), ratio)
    frames = crop.crop_frames(images)                                # the pixels VAEEncode encodes
    raft = None
    if optical_flow is not None:
        patcher = optical_flow
        raft = connected_raft(optical_flow, method)
    elif method != "dis":
        raft = load_raft(method, raft_weights, host.helper_dtype(host.torch_device()))
        patcher = host.helper_model(raft)
    if raft is not None:
        bytes_per_value = next(raft.parameters()).element_size()
        working = raft_working_bytes(flow_resolution(crop.crop_hw, max_resolution), 2 * batch_size,
                                     bytes_per_value)
        working += 4 * batch_size * frames[0].numel() * 4        # both frames of each flow, float32, pre-resize
        raft = host.load_helper(patcher, working)
    on_batch = host.progress(images.shape[0] - 1)
    flow = estimate_flow(frames, method, raft=raft, batch_size=batch_size, on_batch=on_batch,
                         max_size=max_resolution, on_out_of_memory=host.empty_cache)
    validation.flow(flow, "flow")
    device = host.intermediate_device()
    return FlowField(forward=flow.forward.to(device), backward=flow.backward.to(device),
                     occlusion=flow.occlusion.to(device), method=flow.method, crop=crop)


def flow_trajectories(flow: FlowField, latent: dict, seed: int, cut_at_occlusions: bool,
                      motion: str = "cell_mean") -> Trajectories:
    """Flow Trajectories (TVE): FLATTEN's trajectories at every token grid of the latent, fingerprinted with it;
    ``motion`` how a cell's motion is read from the flow (``flow/trajectories.py``: ``cell_mean`` or the official
    code's ``top_left``)."""
    validation.flow(flow, "flow")
    samples = validation.latent(latent, "latent")
    validation.integer(seed, "seed", 0)
    validation.boolean(cut_at_occlusions, "cut_at_occlusions")
    validation.choice(motion, "motion", list(MOTION_RULES))
    check_flow_matches_latent(flow, samples)
    trajectories = build_trajectories(flow, tuple(samples.shape[-2:]), seed=seed, cut_occluded=cut_at_occlusions,
                                      motion=motion)
    return dataclasses.replace(trajectories, source=validation.fingerprint(samples))


def flow_pictures(flow: FlowField) -> tuple[torch.Tensor, torch.Tensor]:
    """Preview Flow (TVE): the forward flow as a colour wheel and the occlusion mask, (F-1, H, W, 3) each."""
    validation.flow(flow, "flow")
    return flow_to_color(flow.forward), occlusion_to_image(flow.occlusion)


def track_pictures(trajectories: Trajectories, images: torch.Tensor, grid: str, tracks: int, seed: int
                   ) -> torch.Tensor:
    """Preview Trajectories (TVE): a sample of the longest trajectories of one token grid drawn over the frames."""
    validation.frames(images, "images")
    validation.choice(grid, "grid", GRID_CHOICES)
    validation.integer(tracks, "tracks", 1)
    validation.integer(seed, "seed", 0)
    if trajectories.crop is not None:
        images = match_frames(images, trajectories.crop, trajectories.frames, "images", "trajectories")
    else:
        validation.frame_count(images.shape[0], trajectories.frames, "images", "the trajectories")
    grids = sorted(trajectories.grids, key=lambda hw: -hw[0] * hw[1])
    level = GRID_CHOICES.index(grid)
    if level >= len(grids):
        raise ValueError(f"grid: '{grid}' is not available; these trajectories have {len(grids)} grids")
    return draw_tracks(images, trajectories.at(grids[level]), tracks, seed)
