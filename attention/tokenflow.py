"""TokenFlow's math: the keyframe draw, nearest-neighbour fields between source tokens, keyframe-output blending.

TokenFlow (Geyer et al., ICLR 2024), §3.2–3.3: one random keyframe per window of frames is drawn every step
(``pick_keyframes``) and the keyframes are edited jointly; every other frame's
self-attention output tokens (after ``to_out``) are the keyframes' output tokens gathered through the
nearest-neighbour field of the SOURCE video's tokens (cosine similarity, argmax) and blended between two keyframes
(Eq. 5). The official code (omerbt/TokenFlow ``tokenflow_utils.py``) matches the normed self-attention input of the
source branch at the same step: in its keyframe pass that branch is a per-frame source pass over the keyframes; in
its full pass the source branch is propagated like the edit (its self-attention output is the keyframes' source
outputs gathered and blended), so from the second block on the fields come from the *propagated* source. The
engine (``engine/tokenflow.py``) runs either; this module holds the math both share.

A frame batch's ``Propagation`` (which keyframes each frame blends, with which weights, which (frame, keyframe)
fields to compute) is checked and laid out on the device once per batch: its ``field`` and ``blend``, called per
attention block, then read no value on the host.

Two blending rules (``PROPAGATION_MODES``):

* ``paper`` — the two keyframes nearest in time, the one at or before the frame and the one after it,
  weighted linearly by frame id: ``w_prev = (k_next - f) / (k_next - k_prev)``. Before the first or after
  the last keyframe only one exists (weight 1). A keyframe gets exactly its own output tokens.
* ``official`` — the rule of omerbt/TokenFlow (``tokenflow_utils.py``, ``make_tokenflow_attention_block``):
  the keyframe of the frame's window and, unless it is the call's first window, the keyframe of the previous
  window; distances to the window CENTRES ``window * interval + interval // 2``; the current window's keyframe
  gets ``sigmoid(d_prev / (d_cur + d_prev))`` (always in [0.5, 0.731]), the previous one the rest. Hence, as in
  the official code, a keyframe outside the first window does NOT get exactly its own tokens.

Windows of ``official`` are windows of GLOBAL frame ids, ``window = frame_id // interval`` — the windows
``pick_keyframes`` draws one keyframe from — and the call's first window plays the official code's window 0
(it has no previous window). When the call's frames are ``0..F-1`` (the official code's whole video), or any
run of consecutive ids starting at a multiple of ``interval`` (e.g. frames 16..31 of a context window), this is
exactly the official rule on the positions within the call. For other context windows (starting mid-window,
strided) window positions within the call would not hold one keyframe each; global windows always do.

Exact copies: the official argmax picks the first of several equal tokens. Here a token that is bit-identical
to the keyframe token at the same position maps to that position (a maximum of the cosine similarity all the
same), so a frame matched to itself, or a static region, maps by identity even with duplicate tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

PROPAGATION_MODES = ("paper", "official")
_GOLDEN = 0x9E3779B97F4A7C15      # odd 64-bit constant: (seed, step) -> generator seed, a bijection per step

SIMILARITY_BUDGET = 1 << 26     # float32 elements of one chunk's similarities and copies (256 MiB)
PROPAGATION_BUDGET = 1 << 24    # float32 elements of one slice of propagate's gathered tokens (64 MiB)


def pick_keyframes(frame_ids: Sequence[int] | torch.Tensor, interval: int, seed: int, step: int) -> torch.Tensor:
    """One random keyframe per window of ``interval`` frames, re-drawn every step (TokenFlow's keyframe sampling;
    the official code draws ``randint(interval) + arange(0, F, interval)``).

    frame_ids: the GLOBAL ids of the call's frames, in call order (a context window may start mid-window or wrap).
    Windows are ``id // interval`` of the whole video; each window present gets one keyframe, uniform among its
    frames present in the call: every global frame gets a priority drawn from a CPU ``torch.Generator`` seeded by
    (seed, step), and a window's keyframe is its present frame of highest priority — so two calls holding the same
    frames of a window pick the same keyframe. Returns the keyframes' LOCAL indices (positions in frame_ids),
    ascending, (K,) long on the CPU. Interval 1 gives every frame.
    """
    ids = _check_call_frame_ids(frame_ids)
    if not (interval >= 1):
        raise ValueError(f"keyframe interval {interval!r} < 1")
    generator = torch.Generator().manual_seed((int(seed) * _GOLDEN + int(step)) % (1 << 64))
    priority = torch.rand(int(ids.max()) + 1, generator=generator)[ids]              # (F,) by global id
    window = ids // interval
    order = torch.argsort(priority, descending=True)
    order = order[torch.argsort(window[order], stable=True)]                         # by window, best first
    _, counts = torch.unique_consecutive(window[order], return_counts=True)
    return order[counts.cumsum(0) - counts].sort().values


def nearest_neighbour_field(source_frames: torch.Tensor, source_keyframes: torch.Tensor,
                            chunk_size: int | None = None) -> torch.Tensor:
    """For each frame f, keyframe j and token t of f, the index of the most cosine-similar token of keyframe j.

    source_frames (frames, tokens, channels), source_keyframes (keyframes, tokens, channels) -> (frames,
    keyframes, tokens) long. Similarities in float32 (normalised keyframe tokens, matmul), ``chunk_size`` frames
    at a time (None: as many as fit ``SIMILARITY_BUDGET``), never as the whole (F·T, K·T) matrix.
    """
    frames, tokens, keyframes = _check_sources(source_frames, source_keyframes)
    frame_index = torch.arange(frames).repeat_interleave(keyframes)                   # (F·K,)
    keyframe_index = torch.arange(keyframes).repeat(frames)                            # (F·K,)
    per_chunk = None if chunk_size is None else _check_chunk_size(chunk_size) * keyframes
    device = source_frames.device
    return _field(source_frames, source_keyframes, frame_index.to(device), keyframe_index.to(device),
                  per_chunk).view(
        frames, keyframes, tokens)


def pair_nearest_neighbour_field(source_frames: torch.Tensor, source_keyframes: torch.Tensor, pair: torch.Tensor,
                                 chunk_size: int | None = None) -> torch.Tensor:
    """The nearest-neighbour field of each frame to the two keyframes it blends, ``pair`` (frames, 2).

    Equals ``nearest_neighbour_field(...)`` gathered at ``pair`` along the keyframe axis, but only computes
    the needed (frame, keyframe) couples, once each: -> (frames, 2, tokens) long.
    """
    frames, tokens, keyframes = _check_sources(source_frames, source_keyframes)
    _check_pair(pair, frames, keyframes)
    frame_index, keyframe_index, couple = _couples(pair, keyframes)
    device = source_frames.device
    per_chunk = None if chunk_size is None else _check_chunk_size(chunk_size) * 2      # about chunk_size frames
    field = _field(source_frames, source_keyframes, frame_index.to(device), keyframe_index.to(device), per_chunk)
    return field[couple.to(device)]                                                     # (F, 2, T)


def propagation_weights(frame_ids: Sequence[int] | torch.Tensor, keyframe_ids: Sequence[int] | torch.Tensor,
                        mode: str, interval: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two keyframes each frame blends and their weights (TokenFlow Eq. 5; see the module doc for modes).

    frame_ids (frames,) and keyframe_ids (keyframes,) are GLOBAL frame ids; keyframe_ids strictly increasing
    and among frame_ids. Returns pair (frames, 2) long indices into keyframe_ids and weights (frames, 2)
    float32, rows summing to 1; a frame blending one keyframe has pair (j, j) and weights (1, 0).
    """
    if mode not in PROPAGATION_MODES:
        raise ValueError(f"mode: expected one of {PROPAGATION_MODES}, got {mode!r}")
    if not (interval >= 1):
        raise ValueError(f"keyframe interval {interval!r} < 1")
    f = _ids(frame_ids)                                                                # (F,)
    k = _ids(keyframe_ids)                                                             # (K,)
    if not (len(f) and len(k)):
        raise ValueError(f"{len(f)} frames and {len(k)} keyframes: at least one of each needed")
    if not (len(torch.unique(f)) == len(f)):
        raise ValueError(f"frame ids {f.tolist()} repeat a frame")
    if not (bool((k[1:] > k[:-1]).all())):
        raise ValueError(f"keyframe ids {k.tolist()} are not strictly increasing")
    if not (bool(torch.isin(k, f).all())):
        raise ValueError(f"keyframe ids {k.tolist()} are not among the frame ids {f.tolist()}")
    if mode == "paper":
        return _paper_weights(f, k)
    return _official_weights(f, k, interval)


def propagate(keyframe_out: torch.Tensor, field: torch.Tensor, pair: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
    """Each frame's tokens gathered from its two keyframes through the field and blended (TokenFlow Eq. 5).

    keyframe_out (chunks, keyframes, tokens, channels) — the keyframes' self-attention outputs of every cond
    chunk; field (frames, 2, tokens) from ``pair_nearest_neighbour_field``; pair (frames, 2) and weights
    (frames, 2) from ``propagation_weights``, rows summing to 1. The same field serves every chunk.
    -> (chunks, frames, tokens, channels) in keyframe_out's dtype; blended as ``lerp`` in float32, so weight 0
    or two equal tokens give the token exactly, a slice of frames at a time (``PROPAGATION_BUDGET``): no float32
    copy of all (chunks, F·T, C) is made besides the output itself.
    """
    if keyframe_out.ndim != 4:
        raise ValueError(f"keyframe_out: expected (chunks, keyframes, tokens, channels), "
                         f"got {tuple(keyframe_out.shape)}")
    tokens = keyframe_out.shape[2]
    if field.ndim != 3 or field.shape[1:] != (2, tokens):
        raise ValueError(f"field: expected (frames, 2, {tokens}), got {tuple(field.shape)}")
    _check_pair(pair, field.shape[0], keyframe_out.shape[1])
    return Propagation.of(pair, weights, keyframe_out.shape[1], keyframe_out.device).blend(keyframe_out, field)


@dataclass(frozen=True)
class Propagation:
    """One frame batch's propagation from the keyframes it holds (TokenFlow Eq. 5), checked and laid out on the
    device once (``of``), so that the per-block ``field`` and ``blend`` read no value on the host."""
    pair: torch.Tensor            # (F, 2) long: the two keyframes (indices into the batch's keyframes) of each frame
    w_second: torch.Tensor        # (F,) float32: the weight of pair[:, 1] (pair[:, 0] gets the rest)
    frame_index: torch.Tensor     # (P,) long: the distinct (frame, keyframe) couples a field holds ...
    keyframe_index: torch.Tensor  # (P,) long
    couple: torch.Tensor          # (F, 2) long: ... and the couple of each entry of pair
    keyframes: int

    @classmethod
    def of(cls, pair: torch.Tensor, weights: torch.Tensor, keyframes: int, device: torch.device) -> "Propagation":
        """pair (frames, 2) and weights (frames, 2) from ``propagation_weights`` (pair re-indexed into the
        ``keyframes`` keyframes the batch holds), checked here (host values), placed on ``device``."""
        frames = pair.shape[0] if pair.ndim == 2 else -1
        _check_pair(pair, frames, keyframes)
        if tuple(weights.shape) != (frames, 2):
            raise ValueError(f"weights: expected ({frames}, 2), got {tuple(weights.shape)}")
        weights = weights.detach().to("cpu", torch.float32)
        if not torch.allclose(weights.sum(1), torch.ones(()), atol=1e-4):
            raise ValueError(f"weights: expected rows summing to 1, got sums {weights.sum(1).tolist()}")
        frame_index, keyframe_index, couple = _couples(pair, keyframes)
        return cls(pair.to("cpu", torch.long).to(device), weights[:, 1].to(device), frame_index.to(device),
                   keyframe_index.to(device), couple.to(device), keyframes)

    @property
    def frames(self) -> int:
        return self.pair.shape[0]

    def field(self, source_frames: torch.Tensor, source_keyframes: torch.Tensor,
              chunk_size: int | None = None) -> torch.Tensor:
        """``pair_nearest_neighbour_field`` of the batch: source_frames (frames, T, C), source_keyframes
        (keyframes, T, C), on the propagation's device -> (frames, 2, T) long."""
        frames, _, keyframes = _check_sources(source_frames, source_keyframes)
        if (frames, keyframes) != (self.frames, self.keyframes):
            raise ValueError(f"source_frames, source_keyframes: expected {self.frames} frames and {self.keyframes} "
                             f"keyframes, got {frames} and {keyframes}")
        per_chunk = None if chunk_size is None else _check_chunk_size(chunk_size) * 2
        return _field(source_frames, source_keyframes, self.frame_index, self.keyframe_index, per_chunk)[self.couple]

    def blend(self, keyframe_out: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        """``propagate`` of the batch: keyframe_out (chunks, keyframes, T, C), field (frames, 2, T) ->
        (chunks, frames, T, C) in keyframe_out's dtype."""
        if keyframe_out.ndim != 4 or keyframe_out.shape[1] != self.keyframes:
            raise ValueError(f"keyframe_out: expected (chunks, {self.keyframes}, tokens, channels), "
                             f"got {tuple(keyframe_out.shape)}")
        chunks, keyframes, tokens, channels = keyframe_out.shape
        if field.ndim != 3 or field.shape != (self.frames, 2, tokens):
            raise ValueError(f"field: expected ({self.frames}, 2, {tokens}), got {tuple(field.shape)}")
        frames = self.frames
        flat = keyframe_out.reshape(chunks, keyframes * tokens, channels)              # (chunks, K·T, C)
        index = self.pair[:, :, None] * tokens + field.to(torch.long)                   # (F, 2, T)
        out = keyframe_out.new_empty(chunks, frames, tokens, channels)
        per_chunk = max(1, PROPAGATION_BUDGET // max(1, 3 * chunks * tokens * channels))   # frames per float32 slice
        for start in range(0, frames, per_chunk):
            rows = slice(start, start + per_chunk)
            first = flat[:, index[rows, 0].reshape(-1)].float()                        # (chunks, f·T, C)
            second = flat[:, index[rows, 1].reshape(-1)].float()                       # (chunks, f·T, C)
            w = self.w_second[rows].repeat_interleave(tokens)[:, None]                 # (f·T, 1)
            out[:, rows] = torch.lerp(first, second, w).view(chunks, -1, tokens, channels).to(out.dtype)
        return out


# ---------------------------------------------------------------------------------------------- internals
def _couples(pair: torch.Tensor, keyframes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct (frame, keyframe) couples of ``pair`` (frames, 2), on the host: frame index (P,), keyframe
    index (P,), and the couple of each entry of pair (frames, 2)."""
    pair = pair.to("cpu", torch.long)
    couples, couple = torch.unique(torch.arange(pair.shape[0])[:, None] * keyframes + pair, return_inverse=True)
    return couples // keyframes, couples % keyframes, couple


def _field(source_frames: torch.Tensor, source_keyframes: torch.Tensor, frame_index: torch.Tensor,
           keyframe_index: torch.Tensor, per_chunk: int | None) -> torch.Tensor:
    """Argmax cosine similarity of the tokens of frame_index[p] over those of keyframe_index[p]: (P, tokens).
    frame_index and keyframe_index (P,) long on the sources' device."""
    tokens, channels = source_frames.shape[1:]
    device = source_frames.device
    if per_chunk is None:
        per_chunk = max(1, SIMILARITY_BUDGET // (tokens * (tokens + 3 * channels)))
    keyframes_unit = F.normalize(source_keyframes.float(), dim=-1)                    # (K, T, C)
    same_position = torch.arange(tokens, device=device)                                # (T,)
    fields = []
    for start in range(0, len(frame_index), per_chunk):
        fi = frame_index[start:start + per_chunk]                                       # (P,)
        ki = keyframe_index[start:start + per_chunk]                                    # (P,)
        frame = source_frames[fi]                                                        # (P, T, C)
        # cosine similarity up to the positive factor |frame token|, which leaves the argmax over keyframe tokens
        similarity = torch.bmm(frame.float(), keyframes_unit[ki].transpose(1, 2))         # (P, T, T)
        nearest = similarity.argmax(dim=-1)                                              # (P, T)
        copy = (frame == source_keyframes[ki]).all(dim=-1)                               # (P, T)
        fields.append(torch.where(copy, same_position, nearest))
    return torch.cat(fields)


def _paper_weights(f: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest keyframe at or before and after each frame, linear weights by frame id."""
    after = torch.searchsorted(k, f, right=True)                                       # (F,) first keyframe > f
    before = after - 1                                                                   # (F,) last keyframe <= f
    has_before, has_after = before >= 0, after < len(k)
    before, after = before.clamp(min=0), after.clamp(max=len(k) - 1)
    k_prev, k_next = k[before], k[after]
    between = has_before & has_after & (k_prev != f)
    w_prev = torch.where(between, (k_next - f).double() / (k_next - k_prev).double(), 1.0)
    first = torch.where(has_before, before, after)
    second = torch.where(between, after, first)
    return torch.stack([first, second], 1), torch.stack([w_prev, 1 - w_prev], 1).float()


def _official_weights(f: torch.Tensor, k: torch.Tensor, interval: int) -> tuple[torch.Tensor, torch.Tensor]:
    """omerbt/TokenFlow: own window's keyframe and the previous window's, sigmoid of centre distances."""
    window, keyframe_window = f // interval, k // interval                              # (F,), (K,)
    if (keyframe_window[1:] == keyframe_window[:-1]).any():
        raise ValueError(f"keyframe_ids: expected at most one keyframe per window of {interval} frame ids "
                         f"(official mode), got {k.tolist()}")
    current = torch.searchsorted(keyframe_window, window).clamp(max=len(k) - 1)        # (F,)
    if (keyframe_window[current] != window).any():
        missing = sorted(set(window.tolist()) - set(keyframe_window.tolist()))
        raise ValueError(f"keyframe_ids: expected one keyframe in every window of {interval} frame ids "
                         f"(official mode), windows {missing} have none (keyframes {k.tolist()})")
    previous = (current - 1).clamp(min=0)
    has_previous = (current > 0) & (keyframe_window[previous] == window - 1)
    centre = window * interval + interval // 2                                           # (F,)
    d_cur = (f - centre).abs().double()
    d_prev = (f - (centre - interval)).abs().double()                                   # d_cur + d_prev >= interval
    w_cur = torch.where(has_previous, torch.sigmoid(d_prev / (d_cur + d_prev)), 1.0)
    second = torch.where(has_previous, previous, current)
    return torch.stack([current, second], 1), torch.stack([w_cur, 1 - w_cur], 1).float()


def _ids(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Global frame ids (N,) long on the CPU, non-negative (host.call_frame_ids / pick_keyframes make them)."""
    ids = torch.as_tensor(ids).cpu().reshape(-1)
    if ids.numel() == 0:
        return ids.to(torch.long)
    if not (not ids.dtype.is_floating_point and not bool((ids < 0).any())):
        raise ValueError(f"frame ids {ids.tolist()} are not ids")
    return ids.to(torch.long)


def _check_sources(source_frames: torch.Tensor, source_keyframes: torch.Tensor) -> tuple[int, int, int]:
    if source_frames.ndim != 3:
        raise ValueError(f"source_frames: expected (frames, tokens, channels), got {tuple(source_frames.shape)}")
    if source_keyframes.ndim != 3 or source_keyframes.shape[1:] != source_frames.shape[1:]:
        raise ValueError(f"source_keyframes: expected (keyframes, {source_frames.shape[1]}, "
                         f"{source_frames.shape[2]}) like source_frames, got {tuple(source_keyframes.shape)}")
    if len(source_keyframes) == 0:
        raise ValueError("source_keyframes: expected at least one keyframe, got none")
    return source_frames.shape[0], source_frames.shape[1], source_keyframes.shape[0]


def _check_pair(pair: torch.Tensor, frames: int, keyframes: int) -> None:
    if pair.ndim != 2 or tuple(pair.shape) != (frames, 2):
        raise ValueError(f"pair: expected ({frames}, 2) keyframe indices, got {tuple(pair.shape)}")
    if pair.dtype.is_floating_point or pair.dtype == torch.bool:
        raise ValueError(f"pair: expected integer keyframe indices, got {pair.dtype}")
    if pair.numel() and (pair.min() < 0 or pair.max() >= keyframes):
        raise ValueError(f"pair: expected indices in [0, {keyframes}), got {pair.min().item()}..{pair.max().item()}")


def _check_chunk_size(chunk_size: int) -> int:
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected at least 1 frame, got {chunk_size}")
    return chunk_size


def _check_call_frame_ids(frame_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Global frame ids (F,) long on the CPU: distinct and non-negative (host.call_frame_ids makes them)."""
    ids = torch.as_tensor(frame_ids if isinstance(frame_ids, torch.Tensor) else list(frame_ids))
    if not (not ids.dtype.is_floating_point and ids.dtype != torch.bool):
        raise ValueError(f"frame ids {frame_ids!r} are not ids")
    ids = ids.to("cpu", torch.long).reshape(-1)
    if not (ids.numel() and int(ids.min()) >= 0):
        raise ValueError(f"frame ids {ids.tolist()} are empty or negative")
    if not (ids.unique().numel() == ids.numel()):
        raise ValueError(f"frame ids {ids.tolist()} repeat a frame")
    return ids
