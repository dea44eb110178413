"""Optical Flow, Flow Trajectories, Preview Flow and Preview Trajectories (TVE): node classes over
``engine/optical_flow.py``."""
from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from ..engine import host, identity, sockets
from ..engine.optical_flow import (DEFAULT_MAX_RESOLUTION, FLOW_METHODS, GRID_CHOICES, NO_WEIGHTS, flow_pictures,
                                   estimate_optical_flow, flow_trajectories, track_pictures)
from ..flow.estimate import FlowField
from ..flow.trajectories import MOTION_RULES, Trajectories
from .schema import CoreOpticalFlow, Flow, Trajectories as TrajectoriesSocket, fixed_seed, schema


class OpticalFlow(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.OPTICAL_FLOW, (
            "Forward and backward optical flow between consecutive frames, with an occlusion mask from "
            "forward-backward consistency, on exactly the pixels VAEEncode encodes (frames of any size). RAFT needs a "
            "torchvision checkpoint in models/optical_flow; 'dis' (OpenCV) needs none and runs on the CPU."), [
            io.Image.Input("images", tooltip="The source video frames, in order."),
            io.Vae.Input("vae", tooltip="The VAE that encodes these frames: VAEEncode centre-crops them to a multiple "
                                        "of its factor (8 px for SD), and the flow covers exactly those pixels."),
            io.Combo.Input("method", options=FLOW_METHODS, default="raft_large", tooltip=(
                "raft_large: most accurate (needs its checkpoint). raft_small: faster. dis: OpenCV, no weights, CPU.")),
            io.Combo.Input("raft_weights", options=[NO_WEIGHTS] + host.optical_flow_files(),
                           tooltip="torchvision RAFT checkpoint in models/optical_flow (ignored by 'dis')."),
            io.Int.Input("batch_size", default=8, min=1, max=256, tooltip=(
                "Frame pairs per RAFT call (halved automatically if the GPU runs out of memory).")),
            io.Int.Input("max_resolution", default=DEFAULT_MAX_RESOLUTION, min=0, max=16384, step=8, tooltip=(
                "Longest side, in pixels, the flow is estimated at: larger frames are downscaled for it and the flow "
                "is scaled back up. FLATTEN's trajectories live on the latent grid (1/8 of the frame), which 512 "
                "resolves; RAFT's memory grows with the 4th power of this. 0 = full resolution.")),
            CoreOpticalFlow.Input("optical_flow", optional=True, tooltip=(
                "Optional (ComfyUI 0.33+): a RAFT from core's Load Optical Flow Model, run instead of raft_weights, so "
                "a graph that loads RAFT for core nodes keeps one copy. raft_large or raft_small runs it.")),
        ], [Flow.Output(display_name="flow")])

    @classmethod
    def execute(cls, images: torch.Tensor, vae, method: str, raft_weights: str, batch_size: int,
                max_resolution: int = DEFAULT_MAX_RESOLUTION, optical_flow: Any = None) -> io.NodeOutput:
        return io.NodeOutput(estimate_optical_flow(images, vae, method, raft_weights, batch_size, max_resolution,
                                                   optical_flow))


class FlowTrajectories(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.FLOW_TRAJECTORIES, (
            "FLATTEN's patch trajectories: cells linked along the flow at every token grid the UNet sees for this "
            "latent (latent size, /2, /4, /8). Every cell of every frame lies on exactly one trajectory."), [
            Flow.Input("flow", tooltip="From Optical Flow (TVE) of the frames that were VAE-encoded."),
            io.Latent.Input("latent", tooltip="The VAE-encoded frames the edit will start from."),
            fixed_seed("Tie-break: decides which trajectory continues when several land on one cell. Fixed: it does "
                       "not re-roll on every queue."),
            io.Boolean.Input("cut_at_occlusions", default=True, tooltip=(
                "On (TVE's default): a trajectory ends where its cell is more than half occluded in the next frame "
                "(the flow's forward-backward check), so a cell never links to what covers it. Off: the official "
                "FLATTEN code, which has no such cut.")),
            io.Combo.Input("motion", options=list(MOTION_RULES), default="cell_mean", tooltip=(
                "How far a cell moves. cell_mean (default): the flow averaged over the cell's pixels, so every pixel "
                "counts and noise averages out. top_left: the official FLATTEN code's rule, the flow at the cell's "
                "top-left pixel rounded half to even (one pixel decides; on a motion boundary its corner's side "
                "wins).")),
        ], [TrajectoriesSocket.Output(display_name="trajectories")])

    @classmethod
    def execute(cls, flow: FlowField, latent: dict, seed: int, cut_at_occlusions: bool,
                motion: str = "cell_mean") -> io.NodeOutput:
        sockets.expect(flow, FlowField, "flow", sockets.FLOW)
        return io.NodeOutput(flow_trajectories(flow, latent, seed, cut_at_occlusions, motion))


class PreviewFlow(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.PREVIEW_FLOW, (
            "Shows the forward flow as a colour wheel (hue = direction, saturation = speed) and the occlusion mask "
            "(white = no match in the next frame) on the node, and returns both pictures."),
            [Flow.Input("flow", tooltip="From Optical Flow (TVE).")],
            [io.Image.Output(display_name="flow"), io.Image.Output(display_name="occlusion")], output_node=True)

    @classmethod
    def execute(cls, flow: FlowField) -> io.NodeOutput:
        sockets.expect(flow, FlowField, "flow", sockets.FLOW)
        colours, occlusion = flow_pictures(flow)
        shown = host.preview_images(colours, "tve_flow") + host.preview_images(occlusion, "tve_occlusion")
        return io.NodeOutput(colours, occlusion, ui={"images": shown})


class PreviewTrajectories(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.PREVIEW_TRAJECTORIES, (
            "Draws a sample of the longest trajectories of one token grid over the frames, shows them on the node "
            "and returns them."), [
            TrajectoriesSocket.Input("trajectories", tooltip="From Flow Trajectories (TVE)."),
            io.Image.Input("images", tooltip="The frames to draw on: the source frames (cropped as VAEEncode crops "
                                             "them) or frames decoded from their latent."),
            io.Combo.Input("grid", options=GRID_CHOICES, default="latent",
                           tooltip="Which token grid's trajectories to draw."),
            io.Int.Input("tracks", default=64, min=1, max=4096, tooltip="How many of the longest to draw."),
            fixed_seed("Which of the longest tracks are drawn."),
        ], [io.Image.Output(display_name="tracks")], output_node=True)

    @classmethod
    def execute(cls, trajectories: Trajectories, images: torch.Tensor, grid: str, tracks: int,
                seed: int) -> io.NodeOutput:
        sockets.expect(trajectories, Trajectories, "trajectories", sockets.TRAJECTORIES)
        drawn = track_pictures(trajectories, images, grid, tracks, seed)
        return io.NodeOutput(drawn, ui={"images": host.preview_images(drawn, "tve_tracks")})


NODES = {identity.OPTICAL_FLOW: OpticalFlow, identity.FLOW_TRAJECTORIES: FlowTrajectories,
         identity.PREVIEW_FLOW: PreviewFlow, identity.PREVIEW_TRAJECTORIES: PreviewTrajectories}
