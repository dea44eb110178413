"""Frame windows, in one place: how many frames one pass of a TVE model holds (the ``FrameWindows`` setting of
Frame Windows (TVE)), which frames each window holds, and how the outputs of overlapping windows are blended.

A video longer than one window is denoised window by window at every step (AnimateDiff's sliding context, FreeNoise
§3.2): ``overlapping_windows`` are core ComfyUI's ``standard_static`` schedule (windows of ``size`` frames, a new one
every ``size - overlap`` frames, the last one moved back to end on the last frame) and ``pyramid_weights`` its
``pyramid`` fuse weights (largest in the window's middle), so a frame covered by several windows gets their
outputs' weighted mean. ``batches`` cut the frames without overlap, for passes whose result per frame does not
depend on the other frames of the pass (per-frame attention, TokenFlow's propagated edit pass): the same result in
bounded memory. A model whose methods attend across frames runs in overlapping windows, any other in batches
(``FrameWindows.schedule``).

A window also holds the frames every window must share (``shared``: Text2Video-Zero's anchor frame, the keyframes of
a step) with weight 0 where they are not its own, so they are attended to but blended from their own windows only.
Indices are call positions (``run.py``); pure torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

DEFAULT_FRAMES_PER_WINDOW = 16
DEFAULT_OVERLAP = 4


@dataclass(frozen=True)
class FrameWindows:
    """Frames per pass (0: all frames in one pass) and the overlap of windows of attention across frames; checked
    by ``validation.frame_windows``."""
    size: int = DEFAULT_FRAMES_PER_WINDOW
    overlap: int = DEFAULT_OVERLAP

    def describe(self) -> str:
        """e.g. '16 frames per window, overlap 4' (for notes)."""
        return f"{self.size or 'all'} frames per window, overlap {self.overlap}"

    def size_for(self, frames: int) -> int:
        """Frames one pass holds in a call over ``frames`` frames (0 means all of them)."""
        return self.size or frames

    def schedule(self, frames: int, across_frames: bool) -> list[list[int]]:
        """The windows of a call over ``frames`` frames: overlapping where the passes attend across frames, else
        batches."""
        size = self.size_for(frames)
        if frames <= size:                            # one pass of every frame (also when the overlap exceeds it)
            return [list(range(frames))]
        return overlapping_windows(frames, size, self.overlap) if across_frames else batches(frames, size)


@dataclass(frozen=True)
class Window:
    """The frames of one pass: ``frames`` (n,) positions in the call, ``weights`` (n,) their blend weights."""
    frames: torch.Tensor            # (n,) long, ascending
    weights: torch.Tensor           # (n,) float32, 0 for shared frames that are not the window's own


def overlapping_windows(frames: int, size: int, overlap: int) -> list[list[int]]:
    """Core's ``standard_static`` schedule: ``[0, size)``, ``[size - overlap, 2 size - overlap)``, ... with the last
    window shifted back so it ends on the last frame; one window of every frame when ``frames <= size``."""
    _check(frames, size, overlap)
    if frames <= size:
        return [list(range(frames))]
    stride, windows = size - overlap, []
    for start in range(0, frames, stride):
        if start + size >= frames:
            windows.append(list(range(frames - size, frames)))
            break
        windows.append(list(range(start, start + size)))
    return windows


def batches(frames: int, size: int) -> list[list[int]]:
    """Consecutive batches of ``size`` frames (the last one shorter), core's ``batched`` schedule."""
    _check(frames, size, 0)
    return [list(range(start, min(start + size, frames))) for start in range(0, frames, size)]


def pyramid_weights(length: int) -> list[float]:
    """Core's ``pyramid`` fuse weights: 1, 2, ..., up to the middle and back down (FreeNoise's weighted mean)."""
    if length < 1:
        raise ValueError(f"length: expected at least 1 frame, got {length}")
    half = (length + 1) // 2
    rise = list(range(1, half + 1))
    return [float(w) for w in rise + rise[::-1][length % 2:]]


def windows_with_shared(schedule: Sequence[Sequence[int]],
                        shared: Callable[[Sequence[int]], Sequence[int]] = lambda own: ()) -> list[Window]:
    """Each window of ``schedule`` with pyramid weights (weights 1 when no frame is in two windows: batches, or one
    window of every frame), plus the frames ``shared(own)`` names that it lacks, at weight 0."""
    counts: dict[int, int] = {}
    for own in schedule:
        for frame in own:
            counts[frame] = counts.get(frame, 0) + 1
    blended = any(n > 1 for n in counts.values())
    windows = []
    for own in schedule:
        weights = dict(zip(own, pyramid_weights(len(own)) if blended else [1.0] * len(own)))
        for frame in shared(own):
            weights.setdefault(int(frame), 0.0)
        frames = sorted(weights)
        windows.append(Window(torch.tensor(frames, dtype=torch.long),
                              torch.tensor([weights[f] for f in frames], dtype=torch.float32)))
    return windows


class Blend:
    """The weighted mean of the windows' outputs per frame: ``add`` each window's outputs, then ``result``.

    An output is a list over conds of ``(n, ...)`` tensors (a CALC_COND_BATCH result over the window's n frames);
    the sums live in float32 (frames, ...) per cond. A frame's weights must not all be 0.
    """

    def __init__(self, frames: int):
        self.frames = frames
        self.sums: list[torch.Tensor | None] | None = None
        self.total = torch.zeros(frames, dtype=torch.float32)

    def add(self, window: Window, outputs: Sequence[torch.Tensor | None]) -> None:
        if self.sums is None:
            self.sums = [None] * len(outputs)
        for c, out in enumerate(outputs):
            if out is None:
                continue
            if self.sums[c] is None:
                self.sums[c] = out.new_zeros((self.frames, *out.shape[1:]), dtype=torch.float32)
            w = window.weights.to(out.device).view(-1, *[1] * (out.ndim - 1))
            self.sums[c].index_add_(0, window.frames.to(out.device), out.float() * w)
        self.total.index_add_(0, window.frames, window.weights)

    def result(self, dtype: torch.dtype) -> list[torch.Tensor | None]:
        if self.sums is None or bool((self.total <= 0).any()):
            missing = torch.nonzero(self.total <= 0).flatten().tolist()
            raise RuntimeError(f"frame windows: frames {missing} were in no window with a weight above 0")
        out = []
        for s in self.sums:
            if s is None:
                out.append(None)
                continue
            total = self.total.to(s.device).view(-1, *[1] * (s.ndim - 1))
            out.append((s / total).to(dtype))
        return out


def _check(frames: int, size: int, overlap: int) -> None:
    if frames < 1 or size < 1:
        raise ValueError(f"frame windows: expected at least 1 frame and a window of at least 1, got frames={frames}, "
                         f"size={size}")
    if not 0 <= overlap < size:
        raise ValueError(f"frame windows: overlap {overlap} must be at least 0 and below the window size {size}")
