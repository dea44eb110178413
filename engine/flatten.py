"""FLATTEN's optical-flow guided attention (Cong et al., ICLR 2024, §3.2–3.3) as a method of the engine.

Every self-attention block gets dense spatio-temporal attention (all frames of the chunk); at the chosen token
grids, the dense output then attends along the flow trajectories of the source video (no new parameters; the math:
``attention/flatten.py``). Give the FLATTEN MODEL to DDIM Inversion (TVE) too: the paper inverts with the same
attention.

With ``frame_pooled_norm`` (the default) the UNet's ResBlock GroupNorms and its output norm take their statistics
over all frames of each CFG chunk, as FLATTEN's inflated 3-D UNet computes them (the official code runs them on
(b, c, f, h, w) tensors; its inversion and source features go through the same UNet): in every pass of the model,
inversion included, over the frames that pass holds (a frame window's, a core context window's). The math:
``attention/group_norm.py``.

With ``source_features: stored`` the inversion keeps the features FLATTEN's PnP preset injects and the edit replays
them instead of a live source pass (the official code's way; ``stored_source.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..attention.cross_frame import dense_attention
from ..attention.flatten import trajectory_attention, trajectory_index
from ..attention.frames import once_per_distinct_chunk
from ..flow.trajectories import Trajectories
from . import host, identity, validation
from .injection import injection_targets
from .methods import Method, Refused, SourceReads
from .run import call_layout
from .stack import apply
from .stored_source import StoredSource

if TYPE_CHECKING:
    from .run import SamplingRun
    from .stack import MethodStack

GRID_CHOICES = ["highest resolution", "all"]
QK_SOURCES = ["dense_output", "projections"]
SOURCE_FEATURES = ["live", "stored"]


@dataclass(frozen=True, eq=False)
class Flatten(Method):
    """FLATTEN's attention on every block; trajectory gather indices cached per (grid, frames)."""
    trajectories: Trajectories
    grids: frozenset                              # token grids (h, w) with trajectory attention
    qk_source: str
    attention_blocks: frozenset = field()
    pooled_norm: bool = True                      # ResBlock and output GroupNorms pool the frames of each chunk
    first_block: tuple | None = None              # the UNet's first self-attention block: before any text
    source_features: str = "live"                 # stored: the inversion keeps PnP's features (stored_source.py)
    stored_steps: float = 0.8                     # fraction of the steps, from the first, whose features it keeps
    indices: dict = field(default_factory=dict, compare=False, repr=False)
    node = identity.FLATTEN
    attends_across_frames = True
    computes_alike_chunks_once = True

    def __deepcopy__(self, memo: dict) -> "Flatten":
        return self

    def sources(self) -> list:
        return [self.trajectories]

    def stored_source(self, model: Any, steps: int) -> StoredSource | None:
        """``stored``: the inversion keeps the features of FLATTEN's PnP blocks for the first ``stored_steps`` of
        the steps, as the official code does (it keeps all of them and injects 40 of 50)."""
        if self.source_features != "stored":
            return None
        attn_blocks, conv_ids = injection_targets(model, "flatten")
        reads = SourceReads(frozenset(b.key for b in attn_blocks), frozenset(conv_ids))
        return StoredSource(reads, int(steps * self.stored_steps))

    def frame_pooled_norms(self, model: Any) -> list:
        return list(host.resblock_group_norms(model).values()) if self.pooled_norm else []

    def index(self, grid_hw: tuple[int, int], frame_ids: tuple[int, ...]):
        key = (grid_hw, frame_ids)
        if key not in self.indices:
            grid = self.trajectories.at(grid_hw)
            self.indices[key] = trajectory_index(grid.tracks, grid.track_of, frame_ids)
        return self.indices[key]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict, run: "SamplingRun",
               inner: Any) -> torch.Tensor:
        heads = extra_options["n_heads"]
        layout = call_layout(q.shape[0], extra_options)
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

        # cond and uncond chunks that are still equal (the first block, before any text) are computed once; which
        # ones are, the engine read once per UNet call from its inputs (``run.alike_chunks``)
        kinds = run.alike_chunks
        if kinds is None or len(kinds) != layout.chunks or host.block_key(extra_options) != self.first_block:
            kinds = tuple(range(layout.chunks))
        return once_per_distinct_chunk(flatten, q, k, v, kinds)

    def check_latent(self, latent_image: torch.Tensor) -> None:
        validation.latent_fits_trajectories(latent_image, self.trajectories)

    def check_added_after(self, stack: "MethodStack") -> None:
        """Cross-frame attention already replaces self-attention: neither order composes."""
        other = next((m for m in stack.methods if m.attends_across_frames and type(m) is not type(self)), None)
        if other is not None:
            raise Refused(f"{self.node} after {other.node}: both replace self-attention, and FLATTEN's dense "
                          f"attention already attends across all frames; use one of them (neither order composes).")


def apply_flatten(model: Any, trajectories: Trajectories, token_grids: str, qk_source: str,
                  frame_pooled_norm: bool = True, source_features: str = "live", stored_steps: float = 0.8) -> Any:
    validation.model(model)
    validation.choice(token_grids, "token_grids", GRID_CHOICES)
    validation.choice(qk_source, "qk_source", QK_SOURCES)
    validation.boolean(frame_pooled_norm, "frame_pooled_norm")
    validation.choice(source_features, "source_features", SOURCE_FEATURES)
    validation.number(stored_steps, "stored_steps", 0.0, 1.0)
    if source_features == "stored":
        injection_targets(model, "flatten")       # a UNet without FLATTEN's PnP blocks is refused here
    blocks = host.attention_blocks(model)
    grids = sorted(trajectories.grids, key=lambda hw: -hw[0] * hw[1])
    top_level = min(b.level for b in blocks)
    chosen = frozenset(grids) if token_grids == "all" else frozenset({grids[top_level]})
    if frame_pooled_norm:
        host.resblock_group_norms(model)          # a UNet without them is refused here, not at the first step
    return apply(model, Flatten(trajectories, chosen, qk_source, frozenset(b.key for b in blocks),
                                bool(frame_pooled_norm), blocks[0].key, source_features, float(stored_steps)))
