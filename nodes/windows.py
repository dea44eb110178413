"""TVE_FrameWindows: how many frames one pass of the model holds, for videos of any length in bounded memory.

Every TVE pass (inversion, source, keyframes, edit) holds at most ``frames_per_window`` frames. Passes whose
frames attend to each other (FLATTEN, cross-frame attention) run in windows overlapping by ``overlap`` frames
whose outputs are blended (core's standard_static schedule with pyramid weights, ``attention/windows.py``); every
window also holds the frames all windows share (the anchor frame, the step's keyframes). Per-frame passes
(plain PnP, TokenFlow's propagated edit) run in batches, which changes nothing but the memory. TokenFlow draws
its keyframes on the whole video once per step and edits them in groups (``tokenflow.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import validation

CATEGORY = "video editing/TVE"


@dataclass(frozen=True)
class FrameWindows:
    """Frames per pass (0: all frames in one pass) and the overlap of windows of attention across frames."""
    size: int = 16
    overlap: int = 4

    def __post_init__(self) -> None:
        validation.integer(self.size, "frames_per_window", 0)
        validation.integer(self.overlap, "overlap", 0)
        if self.size and self.overlap >= self.size:
            raise ValueError(f"overlap: expected fewer frames than frames_per_window ({self.size}), got "
                             f"{self.overlap}")

    def fits(self, frames: int) -> bool:
        """One pass holds all ``frames``."""
        return self.size == 0 or frames <= self.size


def apply_frame_windows(model: Any, frames_per_window: int, overlap: int) -> Any:
    from . import passes                        # passes holds a FrameWindows in every state

    validation.model(model)
    windows = FrameWindows(frames_per_window, overlap)
    return passes.apply(model, lambda state: state.with_windows(windows))


class ApplyFrameWindows:
    DESCRIPTION = ("Sets how many frames the TVE passes of this model hold at a time, so a video of any length edits "
                   "in bounded memory. Attention across frames (FLATTEN, cross-frame) runs in overlapping windows "
                   "that are blended; per-frame work runs in batches (same result); TokenFlow edits its keyframes "
                   "in groups. Put it anywhere on the model chain, before DDIM Inversion (TVE) to window the "
                   "inversion too. Without it the passes hold 16 frames.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model whose TVE passes are windowed (a clone is returned)."}),
            "frames_per_window": ("INT", {"default": 16, "min": 0, "max": 4096, "tooltip": (
                "Frames one pass holds. 16 fits 8-12 GB at 512 px with SD1.5 (about 1024 px with SDXL: 8); lower it "
                "if you run out of memory, raise it for more frames attending to each other. 0: all frames at "
                "once (memory grows with the video).")}),
            "overlap": ("INT", {"default": 4, "min": 0, "max": 4095, "tooltip": (
                "Frames two neighbouring windows share, blended so no seam shows (attention across frames only; "
                "below frames_per_window).")}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, frames_per_window: int, overlap: int):
        return (apply_frame_windows(model, frames_per_window, overlap),)


NODES = {"TVE_FrameWindows": (ApplyFrameWindows, "Frame Windows (TVE)")}
