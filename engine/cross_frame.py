"""Cross-frame self-attention as a method of the engine, one mode per method on the blocks it selects.

Modes (the math: ``attention/cross_frame.py``): TokenFlow's extended attention over keyframes (§3.1), FLATTEN's dense
spatio-temporal attention (§3.1), Text2Video-Zero's anchor-frame attention (§3.3), EI²'s fine-coarse frame attention
(FFAM, §3.2, training-free). The source pass keeps per-frame attention, as TokenFlow's reference does for its
source batch. Applied again, the later mode holds the blocks it selects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..attention.cross_frame import (anchor_attention, dense_attention, fine_coarse_attention, keyframe_attention,
                                     keyframe_index)
from ..attention.tokenflow import pick_keyframes
from . import host, identity, validation
from .methods import Method, Refused
from .run import Pass, call_layout
from .stack import apply

if TYPE_CHECKING:
    from .run import SamplingRun
    from .stack import MethodStack

MODES = ["keyframes", "dense", "anchor", "fine_coarse"]
TOKEN_GRIDS = ["all", "latent", "latent/2", "latent/4", "latent/8"]


@dataclass(frozen=True, eq=False)
class CrossFrame(Method):
    """One cross-frame mode on some blocks."""
    mode: str
    attention_blocks: frozenset = field()
    keyframe_interval: int = 8
    anchor_frame: int = 0
    anchor_include_self: bool = False
    coarse_factor: int = 2
    seed: int = 0
    start_percent: float = 0.0
    end_percent: float = 1.0
    node = identity.CROSS_FRAME
    attends_across_frames = True

    @property
    def attends_to_a_fixed_frame(self) -> bool:
        return self.mode == "anchor"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict, run: "SamplingRun",
               inner: Any) -> torch.Tensor:
        heads = extra_options["n_heads"]

        def attention(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, heads_: int) -> torch.Tensor:
            return host.optimized_attention(q_, k_, v_, heads_, extra_options)

        if run.pass_ is Pass.SOURCE or not self.start_percent <= run.schedule_percent <= self.end_percent:
            return attention(q, k, v, heads)
        layout = call_layout(q.shape[0], extra_options)
        if self.mode == "keyframes":
            prepared = run.method_state.get(id(self))                 # drawn and on the device once per pass
            if prepared is not None and prepared[0] == (layout.frame_ids, layout.step):
                keyframes = prepared[1]
            else:
                keyframes = pick_keyframes(layout.frame_ids, self.keyframe_interval, self.seed, layout.step)
            return keyframe_attention(q, k, v, heads, layout.chunks, keyframes, attention=attention)
        if self.mode == "dense":
            return dense_attention(q, k, v, heads, layout.chunks, attention=attention)
        if self.mode == "anchor":
            local = validation.frame_in_call(self.anchor_frame, layout.frame_ids, "anchor_frame")
            return anchor_attention(q, k, v, heads, layout.chunks, local, self.anchor_include_self,
                                    attention=attention)
        return fine_coarse_attention(q, k, v, heads, layout.chunks, layout.grid_hw, self.coarse_factor,
                                     attention=attention)

    def prepare_pass(self, run: "SamplingRun", device: torch.device) -> None:
        """keyframes: the pass's keyframe draw, checked and on ``device`` before its UNet calls."""
        if self.mode != "keyframes" or run.pass_ is Pass.SOURCE or run.pass_frame_ids is None:
            return
        frame_ids = run.pass_frame_ids
        keyframes = pick_keyframes(frame_ids, self.keyframe_interval, self.seed, run.sample_step)
        run.method_state[id(self)] = ((frame_ids, run.sample_step), keyframe_index(keyframes, len(frame_ids), device))

    def shared_frames(self, own: Sequence[int], frame_ids: Sequence[int], step: int) -> list[int]:
        """anchor: the anchor frame (Text2Video-Zero prepends it to every chunk); keyframes: the step's keyframes of
        the keyframe windows ``own`` touches, drawn on all of the call's frames, so overlapping windows attend to
        the same keyframes."""
        if self.mode == "anchor":
            return [frame_ids.index(self.anchor_frame)] if self.anchor_frame in frame_ids else []
        if self.mode == "keyframes":
            touched = {frame_ids[i] // self.keyframe_interval for i in own}
            keyframes = pick_keyframes(frame_ids, self.keyframe_interval, self.seed, step).tolist()
            return [k for k in keyframes if frame_ids[k] // self.keyframe_interval in touched]
        return []

    def check_added_after(self, stack: "MethodStack") -> None:
        """Another kind of attention across frames (FLATTEN's dense attention) already attends across all frames:
        neither order composes."""
        other = next((m for m in stack.methods if m.attends_across_frames and type(m) is not type(self)), None)
        if other is not None:
            raise Refused(f"{self.node} after {other.node}: both replace self-attention, and FLATTEN's dense "
                          f"attention already attends across all frames; use one of them (neither order composes).")

    def replaces(self, earlier: Method) -> bool:
        """A later mode holds the blocks it selects; an earlier one it covers entirely is gone."""
        return type(earlier) is type(self) and earlier.attention_blocks <= self.attention_blocks


def selected_blocks(model: Any, token_grids: str) -> list[host.AttentionBlock]:
    """The model's self-attention blocks at the chosen token grid (all of them for 'all')."""
    validation.choice(token_grids, "token_grids", TOKEN_GRIDS)
    blocks = host.attention_blocks(model)
    if token_grids == "all":
        return blocks
    level = TOKEN_GRIDS.index(token_grids) - 1
    chosen = [b for b in blocks if b.level == level]
    if not chosen:
        have = sorted({TOKEN_GRIDS[b.level + 1] for b in blocks})
        raise ValueError(f"token_grids: this model has no self-attention at '{token_grids}'; it has {have}")
    return chosen


def apply_cross_frame(model: Any, mode: str, keyframe_interval: int, anchor_frame: int, anchor_include_self: bool,
                      coarse_factor: int, seed: int, token_grids: str, start_percent: float, end_percent: float
                      ) -> Any:
    validation.model(model)
    validation.choice(mode, "mode", MODES)
    validation.integer(keyframe_interval, "keyframe_interval", 1)
    validation.integer(anchor_frame, "anchor_frame", 0)
    validation.boolean(anchor_include_self, "anchor_include_self")
    validation.integer(coarse_factor, "coarse_factor", 1)
    validation.integer(seed, "seed", 0)
    validation.percent_range(start_percent, end_percent)
    blocks = frozenset(b.key for b in selected_blocks(model, token_grids))
    return apply(model, CrossFrame(mode, blocks, keyframe_interval, anchor_frame, anchor_include_self, coarse_factor,
                                   seed, start_percent, end_percent))
