"""TVE_ApplyFLATTEN: optical-flow guided attention (FLATTEN, Cong et al., ICLR 2024, §3.2–3.3).

Every self-attention block gets dense spatio-temporal attention (all frames of the chunk); at the chosen token
grids, the dense output then attends along the flow trajectories of the source video (no new parameters). Give the
FLATTEN MODEL to TVE_DDIMInversion too: the paper inverts with the same attention.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..attention.cross_frame import dense_attention
from ..attention.flatten import trajectory_attention, trajectory_index
from ..flow.trajectories import Trajectories
from . import host, sockets

CATEGORY = "video editing/TVE"
GRID_CHOICES = ["highest resolution", "all"]
QK_SOURCES = ["dense_output", "projections"]


class Flatten:
    """The attn1 replace of one FLATTEN MODEL; caches trajectory gather indices per (grid, frames)."""

    def __init__(self, trajectories: Trajectories, grids: set[tuple[int, int]], qk_source: str):
        self.trajectories, self.grids, self.qk_source = trajectories, grids, qk_source
        self.indices: dict[tuple, Any] = {}

    def __deepcopy__(self, memo: dict) -> "Flatten":
        return self

    def index(self, grid_hw: tuple[int, int], frame_ids: tuple[int, ...]):
        key = (grid_hw, frame_ids)
        if key not in self.indices:
            grid = self.trajectories.at(grid_hw)
            self.indices[key] = trajectory_index(grid.tracks, grid.track_of, frame_ids)
        return self.indices[key]

    def attn1(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        layout = host.call_layout(q.shape[0], extra_options)

        def attention(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, heads_: int) -> torch.Tensor:
            return host.optimized_attention(q_, k_, v_, heads_, extra_options)

        dense = dense_attention(q, k, v, heads, layout.chunks, attention=attention)    # FLATTEN §3.1 (DSTA)
        if layout.grid_hw not in self.grids:
            return dense
        self._check_frames(layout.frame_ids)
        index = self.index(layout.grid_hw, layout.frame_ids)
        if self.qk_source == "dense_output":
            return trajectory_attention(dense, dense, dense, index, heads, layout.chunks)
        return trajectory_attention(q, k, dense, index, heads, layout.chunks)

    def _check_frames(self, frame_ids: tuple[int, ...]) -> None:
        if max(frame_ids) >= self.trajectories.frames:
            raise ValueError(f"trajectories: built for {self.trajectories.frames} frames but frame "
                             f"{max(frame_ids)} is being sampled; build them from the same video")

    def outer_sample(self, executor: Callable, noise: torch.Tensor, latent_image: torch.Tensor, *args, **kwargs):
        """Refuse a latent the trajectories were not built for, before any step runs."""
        frames, hw = latent_image.shape[0], tuple(latent_image.shape[-2:])
        if hw != tuple(self.trajectories.latent_hw):
            raise ValueError(f"trajectories: built for a {self.trajectories.latent_hw[1]}x"
                             f"{self.trajectories.latent_hw[0]} latent but a {hw[1]}x{hw[0]} latent is sampled; "
                             "build them with TVE_FlowTrajectories from this latent")
        if frames != self.trajectories.frames:
            raise ValueError(f"trajectories: built for {self.trajectories.frames} frames but the latent has "
                             f"{frames}; use the same frames for the flow and the latent")
        return executor(noise, latent_image, *args, **kwargs)


def apply_flatten(model: Any, trajectories: Trajectories, token_grids: str, qk_source: str) -> Any:
    if token_grids not in GRID_CHOICES:
        raise ValueError(f"token_grids: expected one of {GRID_CHOICES}, got '{token_grids}'")
    if qk_source not in QK_SOURCES:
        raise ValueError(f"qk_source: expected one of {QK_SOURCES}, got '{qk_source}'")
    blocks = host.attention_blocks(model)
    existing = host.attn1_replaces(model)
    if any(getattr(fn, "tve_tokenflow", False) for fn in existing.values()):
        raise ValueError("model: apply FLATTEN before TokenFlow (TokenFlow replaces the attention outputs, so it "
                         "must be the last attention patch)")
    grids = sorted(trajectories.grids, key=lambda hw: -hw[0] * hw[1])
    top_level = min(b.level for b in blocks)
    chosen = set(grids) if token_grids == "all" else {grids[top_level]}
    m = model.clone()
    flatten = Flatten(trajectories, chosen, qk_source)
    host.set_attn1_replace(m, flatten.attn1, blocks)
    host.add_wrapper(m, host.OUTER_SAMPLE, flatten.outer_sample)
    return m


class ApplyFLATTEN:
    DESCRIPTION = ("FLATTEN: dense spatio-temporal self-attention in every block plus attention along the source "
                   "video's optical-flow trajectories at the chosen token grids. Use the same MODEL for "
                   "TVE_DDIMInversion and for sampling; stack TokenFlow after it if you like.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": (
                "The model to patch (a clone). Give the result to DDIM Inversion too: FLATTEN inverts with the same "
                "attention.")}),
            "trajectories": (sockets.TRAJECTORIES, {"tooltip": "From Flow Trajectories (TVE), built on the latent you invert and sample."}),
            "token_grids": (GRID_CHOICES, {"default": "highest resolution", "tooltip": (
                "Where trajectory attention runs: the highest-resolution self-attention (the paper) or every one.")}),
            "qk_source": (QK_SOURCES, {"default": "dense_output", "tooltip": (
                "dense_output: the dense-attention output is the trajectory attention's q, k and v (the paper). "
                "projections: the block's own q/k with the dense output as v.")}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, trajectories: Trajectories, token_grids: str, qk_source: str):
        sockets.expect(trajectories, Trajectories, "trajectories", sockets.TRAJECTORIES)
        return (apply_flatten(model, trajectories, token_grids, qk_source),)


NODES = {"TVE_ApplyFLATTEN": (ApplyFLATTEN, "Apply FLATTEN (TVE)")}
