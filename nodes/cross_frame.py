"""TVE_ApplyCrossFrameAttention: self-attention that sees other frames, as per-block attn1 replaces.

Modes: TokenFlow's extended attention over keyframes (§3.1), FLATTEN's dense spatio-temporal attention (§3.1),
Text2Video-Zero's anchor-frame attention (§3.3), EI²'s fine-coarse frame attention (FFAM, §3.2, training-free).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from ..attention.cross_frame import (anchor_attention, dense_attention, fine_coarse_attention,
                                     keyframe_attention, pick_keyframes)
from . import host, passes, validation

CATEGORY = "video editing/TVE"
MODES = ["keyframes", "dense", "anchor", "fine_coarse"]
TOKEN_GRIDS = ["all", "latent", "latent/2", "latent/4", "latent/8"]


def selected_blocks(model: Any, token_grids: str) -> list[host.AttentionBlock]:
    """The model's self-attention blocks at the chosen token grid (all of them for 'all')."""
    if token_grids not in TOKEN_GRIDS:
        raise ValueError(f"token_grids: expected one of {TOKEN_GRIDS}, got '{token_grids}'")
    blocks = host.attention_blocks(model)
    if token_grids == "all":
        return blocks
    level = TOKEN_GRIDS.index(token_grids) - 1
    chosen = [b for b in blocks if b.level == level]
    if not chosen:
        have = sorted({TOKEN_GRIDS[b.level + 1] for b in blocks})
        raise ValueError(f"token_grids: this model has no self-attention at '{token_grids}'; it has {have}")
    return chosen


def cross_frame_replace(mode: str, keyframe_interval: int, anchor_frame: int, anchor_include_self: bool,
                        coarse_factor: int, seed: int, start_percent: float, end_percent: float) -> Callable:
    """The attn1 replace ``fn(q, k, v, extra_options)`` for one mode; vanilla outside [start, end]."""

    def replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: Mapping[str, Any]) -> torch.Tensor:
        heads = extra_options["n_heads"]

        def attention(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, heads_: int) -> torch.Tensor:
            return host.optimized_attention(q_, k_, v_, heads_, extra_options)

        # The live source branch keeps per-frame attention, as TokenFlow's reference does for its source batch.
        percent = host.schedule_percent(extra_options)
        if passes.current_pass(extra_options) is passes.Pass.SOURCE or not start_percent <= percent <= end_percent:
            return attention(q, k, v, heads)
        layout = host.call_layout(q.shape[0], extra_options)
        if mode == "keyframes":
            keyframes = pick_keyframes(layout.frame_ids, keyframe_interval, seed, layout.step)
            return keyframe_attention(q, k, v, heads, layout.chunks, keyframes, attention=attention)
        if mode == "dense":
            return dense_attention(q, k, v, heads, layout.chunks, attention=attention)
        if mode == "anchor":
            local = validation.frame_in_call(anchor_frame, layout.frame_ids, "anchor_frame")
            return anchor_attention(q, k, v, heads, layout.chunks, local, anchor_include_self, attention=attention)
        return fine_coarse_attention(q, k, v, heads, layout.chunks, layout.grid_hw, coarse_factor,
                                     attention=attention)

    return replace


class CrossFrame(passes.AttentionFeature):
    """One cross-frame mode on some blocks, as a feature of the model's TVE state."""
    node = passes.CROSS_FRAME_NODE

    def __init__(self, mode: str, blocks: frozenset, replace: Callable, keyframe_interval: int = 8,
                 anchor_frame: int = 0, seed: int = 0):
        self.mode, self.blocks, self.replace = mode, blocks, replace
        self.keyframe_interval, self.anchor_frame, self.seed = keyframe_interval, anchor_frame, seed

    def shared_frames(self, own: Sequence[int], frame_ids: Sequence[int], step: int) -> list[int]:
        """The frames a frame window holding the call's frames ``own`` needs besides them (positions in the call):
        anchor, the anchor frame (Text2Video-Zero prepends it to every chunk); keyframes, the step's keyframes
        of the keyframe windows ``own`` touches, drawn on all of the call's frames, so overlapping windows
        attend to the same keyframes."""
        if self.mode == "anchor":
            return [frame_ids.index(self.anchor_frame)] if self.anchor_frame in frame_ids else []
        if self.mode == "keyframes":
            touched = {frame_ids[i] // self.keyframe_interval for i in own}
            keyframes = pick_keyframes(frame_ids, self.keyframe_interval, self.seed, step).tolist()
            return [k for k in keyframes if frame_ids[k] // self.keyframe_interval in touched]
        return []

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        return self.replace(q, k, v, extra_options)


def apply_cross_frame(model: Any, mode: str, keyframe_interval: int, anchor_frame: int, anchor_include_self: bool,
                      coarse_factor: int, seed: int, token_grids: str, start_percent: float, end_percent: float
                      ) -> Any:
    validation.model(model)
    validation.choice(mode, "mode", MODES)
    validation.integer(keyframe_interval, "keyframe_interval", 1)
    validation.integer(anchor_frame, "anchor_frame", 0)
    if not isinstance(anchor_include_self, bool):
        raise ValueError(f"anchor_include_self: expected a boolean, got {anchor_include_self!r}")
    validation.integer(coarse_factor, "coarse_factor", 1)
    validation.integer(seed, "seed", 0)
    validation.number(start_percent, "start_percent", 0.0, 1.0)
    validation.number(end_percent, "end_percent", 0.0, 1.0)
    if start_percent > end_percent:
        raise ValueError(f"start_percent: {start_percent} is after end_percent {end_percent}")
    blocks = [b.key for b in selected_blocks(model, token_grids)]
    passes.check_no_foreign_attention(model, blocks, passes.CROSS_FRAME_NODE)
    feature = CrossFrame(mode, frozenset(blocks), cross_frame_replace(
        mode, keyframe_interval, anchor_frame, anchor_include_self, coarse_factor, seed, start_percent, end_percent),
        keyframe_interval, anchor_frame, seed)
    return passes.apply(model, lambda state: state.with_attention(feature, blocks))


class ApplyCrossFrameAttention:
    DESCRIPTION = ("Makes every self-attention block attend across frames: 'keyframes' (TokenFlow's extended "
                   "attention, one random keyframe per interval, re-drawn each step), 'dense' (FLATTEN: all "
                   "frames), 'anchor' (Text2Video-Zero: the anchor frame), 'fine_coarse' (EI²: own frame at full "
                   "resolution, the others pooled). A single frame is left unchanged (it is vanilla attention).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch (a clone is returned; yours is unchanged)."}),
            "mode": (MODES, {"default": "keyframes", "tooltip": (
                "keyframes: TokenFlow's extended attention over random keyframes. dense: FLATTEN's, all frames "
                "(memory grows with frames). anchor: Text2Video-Zero's, one anchor frame. fine_coarse: EI²'s, own frame "
                "at full resolution plus the other frames pooled.")}),
            "keyframe_interval": ("INT", {"default": 8, "min": 1, "max": 1024,
                                          "tooltip": "keyframes: one keyframe per this many frames."}),
            "anchor_frame": ("INT", {"default": 0, "min": 0, "max": 100000,
                                     "tooltip": "anchor: the frame every frame attends to (0 = first)."}),
            "anchor_include_self": ("BOOLEAN", {"default": False,
                                                "tooltip": "anchor: also attend to the frame's own tokens."}),
            "coarse_factor": ("INT", {"default": 2, "min": 1, "max": 16,
                                      "tooltip": "fine_coarse: pooling of the other frames' tokens."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": False,
                             "tooltip": "keyframes: seeds the keyframe draw (re-drawn every step). Fixed: it does not "
                                        "re-roll on every queue."}),
            "token_grids": (TOKEN_GRIDS, {"default": "all",
                                          "tooltip": "Which UNet resolutions get cross-frame attention."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Fraction of the sampling steps after which it starts (0 = first)."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Fraction of the sampling steps after which it stops (1 = last)."}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, mode: str, keyframe_interval: int, anchor_frame: int, anchor_include_self: bool,
              coarse_factor: int, seed: int, token_grids: str, start_percent: float, end_percent: float):
        return (apply_cross_frame(model, mode, keyframe_interval, anchor_frame, anchor_include_self, coarse_factor,
                                  seed, token_grids, start_percent, end_percent),)


NODES = {"TVE_ApplyCrossFrameAttention": (ApplyCrossFrameAttention, "Apply Cross-Frame Attention (TVE)")}
