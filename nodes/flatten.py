"""TVE_ApplyFLATTEN: optical-flow guided attention (FLATTEN, Cong et al., ICLR 2024, §3.2–3.3).

Every self-attention block gets dense spatio-temporal attention (all frames of the chunk); at the chosen token
grids, the dense output then attends along the flow trajectories of the source video (no new parameters). Give the
FLATTEN MODEL to TVE_DDIMInversion too: the paper inverts with the same attention.
"""
from __future__ import annotations

from typing import Any

import torch

from ..attention.cross_frame import dense_attention
from ..attention.flatten import trajectory_attention, trajectory_index
from ..attention.frames import once_per_distinct_chunk
from ..flow.trajectories import Trajectories
from . import host, passes, sockets, validation

CATEGORY = "video editing/TVE"
GRID_CHOICES = ["highest resolution", "all"]
QK_SOURCES = ["dense_output", "projections"]


class Flatten(passes.AttentionFeature):
    """FLATTEN's attention, a feature of the model's TVE state; caches trajectory gather indices per (grid, frames)."""
    node = passes.FLATTEN_NODE

    def __init__(self, trajectories: Trajectories, grids: set[tuple[int, int]], qk_source: str,
                 blocks: frozenset = frozenset()):
        self.trajectories, self.grids, self.qk_source, self.blocks = trajectories, grids, qk_source, blocks
        self.indices: dict[tuple, Any] = {}

    def __deepcopy__(self, memo: dict) -> "Flatten":
        return self

    def index(self, grid_hw: tuple[int, int], frame_ids: tuple[int, ...]):
        key = (grid_hw, frame_ids)
        if key not in self.indices:
            grid = self.trajectories.at(grid_hw)
            self.indices[key] = trajectory_index(grid.tracks, grid.track_of, frame_ids)
        return self.indices[key]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        layout = host.call_layout(q.shape[0], extra_options)
        trajectories = layout.grid_hw in self.grids
        if trajectories:
            validation.frames_within(layout.frame_ids, self.trajectories.frames, "trajectories", "the trajectories")
            index = self.index(layout.grid_hw, layout.frame_ids)

        def attention(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, heads_: int) -> torch.Tensor:
            return host.optimized_attention(q_, k_, v_, heads_, extra_options)

        def flatten(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, chunks: int) -> torch.Tensor:
            dense = dense_attention(q_, k_, v_, heads, chunks, attention=attention)   # FLATTEN §3.1 (DSTA)
            if not trajectories:
                return dense
            if self.qk_source == "dense_output":
                return trajectory_attention(dense, dense, dense, index, heads, chunks)
            return trajectory_attention(q_, k_, dense, index, heads, chunks)

        # cond and uncond chunks that are still equal (the first block, before any text) are computed once
        return once_per_distinct_chunk(flatten, q, k, v, layout.chunks)

    def check_latent(self, latent_image: torch.Tensor) -> None:
        """Before sampling: refuse a latent the trajectories were not built for."""
        validation.latent_fits_trajectories(latent_image, self.trajectories)


def apply_flatten(model: Any, trajectories: Trajectories, token_grids: str, qk_source: str) -> Any:
    validation.model(model)
    validation.choice(token_grids, "token_grids", GRID_CHOICES)
    validation.choice(qk_source, "qk_source", QK_SOURCES)
    blocks = host.attention_blocks(model)
    grids = sorted(trajectories.grids, key=lambda hw: -hw[0] * hw[1])
    top_level = min(b.level for b in blocks)
    chosen = set(grids) if token_grids == "all" else {grids[top_level]}
    flatten = Flatten(trajectories, chosen, qk_source, frozenset(b.key for b in blocks))
    passes.check_no_foreign_attention(model, [b.key for b in blocks], passes.FLATTEN_NODE)
    return passes.apply(model, lambda state: state.with_attention(flatten, [b.key for b in blocks]))


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
