"""Optical flow, FLATTEN trajectories and their previews (FLATTEN §3.2; RAFT, Teed & Deng 2020)."""
from __future__ import annotations

import dataclasses

import torch

from ..flow.estimate import FlowField, build_raft, estimate_flow
from ..flow.preview import draw_tracks, flow_to_color, occlusion_to_image
from ..flow.trajectories import Trajectories, build_trajectories
from . import host, sockets, validation

CATEGORY = "video editing/TVE"
FLOW_METHODS = ["raft_large", "raft_small", "dis"]
NO_WEIGHTS = "none (method dis)"
GRID_CHOICES = ["latent", "latent/2", "latent/4", "latent/8"]


def check_frames(images: torch.Tensor, method: str, name: str = "images") -> torch.Tensor:
    """Frames optical flow can be computed on: 2 or more, at least one latent cell (DIS: its patch) a side."""
    if method == "dis":
        return validation.frames(images, name, 2, validation.DIS_MIN_SIZE, "OpenCV DIS's patch size; RAFT takes "
                                                                            "smaller frames")
    return validation.frames(images, name, 2)


def check_flow_matches_latent(flow: FlowField, samples: torch.Tensor) -> None:
    """Frame count and aspect ratio of the FLOW must be those of the LATENT it will steer."""
    frames, (h, w) = samples.shape[0], samples.shape[-2:]
    if frames != flow.frames:
        raise ValueError(f"latent: has {frames} frames but the flow was computed on {flow.frames}; "
                         "use the same frames for both")
    # h, w come from H/8, W/8 rounded: allow one latent cell of rounding on the shorter side.
    if abs(flow.height * w - flow.width * h) > max(flow.height, flow.width) * (1 + 0.01 * min(h, w)):
        raise ValueError(f"latent: aspect ratio {w}x{h} does not match the flow's {flow.width}x{flow.height}; "
                         "compute the flow on the frames that were VAE-encoded")


class OpticalFlow:
    DESCRIPTION = ("Forward and backward optical flow between consecutive frames, with an occlusion mask from "
                   "forward-backward consistency. RAFT needs a torchvision checkpoint in models/optical_flow; "
                   "'dis' (OpenCV) needs none and runs on the CPU.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The source video frames, in order."}),
            "method": (FLOW_METHODS, {"default": "raft_large", "tooltip": (
                "raft_large: most accurate (needs its checkpoint). raft_small: faster. dis: OpenCV, no weights, CPU.")}),
            "raft_weights": ([NO_WEIGHTS] + host.optical_flow_files(), {
                "tooltip": "torchvision RAFT checkpoint in models/optical_flow (ignored by 'dis')."}),
            "batch_size": ("INT", {"default": 8, "min": 1, "max": 256,
                                   "tooltip": "Frame pairs per RAFT call; lower it if you run out of memory."}),
        }}

    RETURN_TYPES = (sockets.FLOW,)
    RETURN_NAMES = ("flow",)
    FUNCTION = "estimate"
    CATEGORY = CATEGORY

    def estimate(self, images: torch.Tensor, method: str, raft_weights: str, batch_size: int):
        validation.choice(method, "method", FLOW_METHODS)
        check_frames(images, method)
        validation.integer(batch_size, "batch_size", 1)
        raft = None
        if method != "dis":
            if raft_weights == NO_WEIGHTS:
                raise ValueError(
                    f"raft_weights: {method} needs a torchvision RAFT checkpoint; put "
                    f"{'raft_large_C_T_SKHT_V2-ff5fadd5.pth' if method == 'raft_large' else 'raft_small_C_T_V2-01064c6d.pth'}"
                    f" into one of {host.optical_flow_folders()} or choose method 'dis'")
            raft = build_raft(method, host.load_optical_flow_weights(raft_weights)).to(host.torch_device())
        pairs = images.shape[0] - 1
        on_batch = host.progress(2 * pairs)
        try:
            flow = estimate_flow(images, method, raft=raft, batch_size=batch_size, on_batch=on_batch)
        finally:
            if raft is not None:
                raft.to(host.offload_device())
        validation.flow(flow, "flow")
        device = host.intermediate_device()
        return (FlowField(forward=flow.forward.to(device), backward=flow.backward.to(device),
                          occlusion=flow.occlusion.to(device), method=flow.method),)


class FlowTrajectories:
    DESCRIPTION = ("FLATTEN's patch trajectories: cells linked along the flow at every token grid the UNet sees "
                   "for this latent (latent size, /2, /4, /8). Every cell of every frame lies on exactly one "
                   "trajectory.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "flow": (sockets.FLOW, {"tooltip": "From Optical Flow (TVE) of the frames that were VAE-encoded."}),
            "latent": ("LATENT", {"tooltip": "The VAE-encoded frames the edit will start from."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": False,
                             "tooltip": "Tie-break: decides which trajectory continues when several land on one "
                                        "cell. Fixed: it does not re-roll on every queue."}),
            "cut_at_occlusions": ("BOOLEAN", {"default": True,
                                              "tooltip": "End a trajectory where its cell is mostly occluded."}),
        }}

    RETURN_TYPES = (sockets.TRAJECTORIES,)
    RETURN_NAMES = ("trajectories",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, flow: FlowField, latent: dict, seed: int, cut_at_occlusions: bool):
        sockets.expect(flow, FlowField, "flow", sockets.FLOW)
        validation.flow(flow, "flow")
        samples = validation.latent(latent, "latent")
        validation.integer(seed, "seed", 0)
        check_flow_matches_latent(flow, samples)
        trajectories = build_trajectories(flow, tuple(samples.shape[-2:]), seed=seed, cut_occluded=cut_at_occlusions)
        return (dataclasses.replace(trajectories, source=validation.fingerprint(samples)),)


class PreviewFlow:
    DESCRIPTION = ("Shows the forward flow as a colour wheel (hue = direction, saturation = speed) and the occlusion "
                   "mask (white = no match in the next frame) on the node, and returns both pictures.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"flow": (sockets.FLOW, {"tooltip": "From Optical Flow (TVE)."})}}

    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("flow", "occlusion")
    OUTPUT_NODE = True
    FUNCTION = "preview"
    CATEGORY = CATEGORY

    def preview(self, flow: FlowField):
        sockets.expect(flow, FlowField, "flow", sockets.FLOW)
        validation.flow(flow, "flow")
        colours, occlusion = flow_to_color(flow.forward), occlusion_to_image(flow.occlusion)
        shown = host.preview_images(colours, "tve_flow") + host.preview_images(occlusion, "tve_occlusion")
        return {"ui": {"images": shown}, "result": (colours, occlusion)}


class PreviewTrajectories:
    DESCRIPTION = ("Draws a sample of the longest trajectories of one token grid over the frames, shows them on the "
                   "node and returns them.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "trajectories": (sockets.TRAJECTORIES, {"tooltip": "From Flow Trajectories (TVE)."}),
            "images": ("IMAGE", {"tooltip": "The frames to draw on (those the flow was computed on)."}),
            "grid": (GRID_CHOICES, {"default": "latent", "tooltip": "Which token grid's trajectories to draw."}),
            "tracks": ("INT", {"default": 64, "min": 1, "max": 4096, "tooltip": "How many of the longest to draw."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": False,
                             "tooltip": "Which of the longest tracks are drawn."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("tracks",)
    OUTPUT_NODE = True
    FUNCTION = "preview"
    CATEGORY = CATEGORY

    def preview(self, trajectories: Trajectories, images: torch.Tensor, grid: str, tracks: int, seed: int):
        sockets.expect(trajectories, Trajectories, "trajectories", sockets.TRAJECTORIES)
        validation.frames(images, "images")
        validation.choice(grid, "grid", GRID_CHOICES)
        validation.integer(tracks, "tracks", 1)
        validation.integer(seed, "seed", 0)
        validation.frame_count(images.shape[0], trajectories.frames, "images", "the trajectories")
        grids = sorted(trajectories.grids, key=lambda hw: -hw[0] * hw[1])
        level = GRID_CHOICES.index(grid)
        if level >= len(grids):
            raise ValueError(f"grid: '{grid}' is not available; these trajectories have {len(grids)} grids")
        drawn = draw_tracks(images, trajectories.at(grids[level]), tracks, seed)
        return {"ui": {"images": host.preview_images(drawn, "tve_tracks")}, "result": (drawn,)}


NODES = {
    "TVE_OpticalFlow": (OpticalFlow, "Optical Flow (TVE)"),
    "TVE_FlowTrajectories": (FlowTrajectories, "Flow Trajectories (TVE)"),
    "TVE_PreviewFlow": (PreviewFlow, "Preview Flow (TVE)"),
    "TVE_PreviewTrajectories": (PreviewTrajectories, "Preview Trajectories (TVE)"),
}
