"""Cross-frame self-attention, one function per mode.

Every mode takes the block's projected q, k, v ``(chunks·F, T, C)`` (``chunks`` conditioning chunks, each holding
the call's F frames in order) and returns ``(chunks·F, T, C)``; a frame attends to frames of its own chunk only.
``attention(q, k, v, heads)`` is the backend (ComfyUI's ``optimized_attention`` or ``sdpa_attention``).

Two shapes of key set, both called ``query_frame_chunks`` frames at a time (never an ``(F·T)²`` score matrix):

* one per chunk (keyframes, dense, anchor): the queries of n frames laid end to end, ``(chunks, n·T, C)``,
  against the chunk's keys ``(chunks, L, C)`` — for dense a view of k, for keyframes a gather of K frames;
* one per frame (anchor with the frame's own keys, fine-coarse): a row per (chunk, frame), ``(chunks·n, T, C)``,
  against keys gathered for that frame, ``(chunks·n, L, C)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .frames import ATTENTION_BUDGET, batch_view, frames_view, query_frame_chunks, sdpa_attention

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
KeysValues = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]



@dataclass(frozen=True)
class KeyframeIndex:
    """Keyframes checked against a call of ``frames`` frames, as a (K,) long tensor on the attention's device: made
    once per pass by ``keyframe_index`` (outside the UNet), so that no block copies or checks them."""
    index: torch.Tensor
    frames: int


def keyframe_index(keyframes: torch.Tensor | Sequence[int], frames: int, device: torch.device) -> KeyframeIndex:
    """``keyframes`` (local indices, e.g. from ``pick_keyframes``) checked on the host and copied to ``device``."""
    return KeyframeIndex(_check_keyframes(keyframes, frames).to(device), frames)


def keyframe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, chunks: int,
                       keyframes: KeyframeIndex | torch.Tensor | Sequence[int], attention: Attention = sdpa_attention,
                       budget: int = ATTENTION_BUDGET) -> torch.Tensor:
    """TokenFlow's extended attention (Geyer et al., ICLR 2024, Fig. 4 step I): every frame's queries attend to
    the concatenated keys/values of the keyframes of its own chunk. ``keyframes``: local frame indices (checked
    and copied here), or a ``KeyframeIndex`` already on the device."""
    q4, k4, v4 = _frames(q, k, v, heads, chunks)
    if not isinstance(keyframes, KeyframeIndex):
        keyframes = keyframe_index(keyframes, q4.shape[1], k.device)
    elif keyframes.frames != q4.shape[1]:
        raise ValueError(f"keyframes were checked for {keyframes.frames} frames, but the call holds {q4.shape[1]}")
    index = keyframes.index
    k_set, v_set = (t.index_select(1, index).flatten(1, 2) for t in (k4, v4))     # (chunks, K·T, C)
    return batch_view(_attend_shared(q4, k_set, v_set, heads, attention, budget))


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, chunks: int,
                    attention: Attention = sdpa_attention, budget: int = ATTENTION_BUDGET) -> torch.Tensor:
    """FLATTEN's dense spatio-temporal attention (Cong et al., ICLR 2024): every frame attends to all frames of
    its chunk."""
    q4, k4, v4 = _frames(q, k, v, heads, chunks)
    return batch_view(_attend_shared(q4, k4.flatten(1, 2), v4.flatten(1, 2), heads, attention, budget))


def anchor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, chunks: int, anchor: int,
                     include_self: bool, attention: Attention = sdpa_attention,
                     budget: int = ATTENTION_BUDGET) -> torch.Tensor:
    """Text2Video-Zero's cross-frame attention (Khachatryan et al., ICCV 2023): every frame attends to the keys/
    values of the ``anchor`` frame (local index) of its chunk; with ``include_self``, to the anchor's followed by
    its own. The anchor frame itself is plain self-attention either way (its keys are never duplicated)."""
    q4, k4, v4 = _frames(q, k, v, heads, chunks)
    frames, tokens = q4.shape[1], q4.shape[2]
    if not (0 <= anchor < frames):
        raise ValueError(f"anchor {anchor!r} is not a local frame index in [0, {frames})")
    k_anchor, v_anchor = k4[:, anchor], v4[:, anchor]                                # (chunks, T, C)
    if not include_self or frames == 1:
        return batch_view(_attend_shared(q4, k_anchor, v_anchor, heads, attention, budget))

    def keys_values(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = index.numel()
        return tuple(torch.cat([a[:, None].expand(-1, n, -1, -1), t.index_select(1, index)], 2).flatten(0, 1)
                     for a, t in ((k_anchor, k4), (v_anchor, v4)))                 # (chunks·n, 2T, C)

    out = torch.empty_like(q4)
    others = torch.cat([torch.arange(anchor), torch.arange(anchor + 1, frames)]).to(q.device)
    _attend_per_frame(q4, others, keys_values, 2 * tokens, heads, attention, budget, out)
    out[:, anchor] = attention(q4[:, anchor], k_anchor, v_anchor, heads)
    return batch_view(out)


def fine_coarse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, chunks: int,
                          grid_hw: tuple[int, int], factor: int, attention: Attention = sdpa_attention,
                          budget: int = ATTENTION_BUDGET) -> torch.Tensor:
    """EI²'s fine-coarse frame attention, training-free (Zhang et al., NeurIPS 2023, FFAM, Fig. 2d): a frame
    attends to its own keys/values at full resolution and to every other frame's of its chunk average-pooled
    ``factor``×``factor`` on the (h, w) token grid (edge cells of a non-divisible grid average what they cover).
    ``factor`` 1 is dense attention."""
    q4, k4, v4 = _frames(q, k, v, heads, chunks)
    frames, tokens = q4.shape[1], q4.shape[2]
    h, w = _check_grid(grid_hw, tokens)
    if not (factor >= 1):
        raise ValueError(f"pooling factor {factor!r} < 1")
    coarse_k, coarse_v = (_average_pool(t, h, w, factor) for t in (k4, v4))       # (chunks, F, T', C)
    others_of = torch.arange(frames - 1, device=q.device)

    def keys_values(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        others = others_of[None, :] + (others_of[None, :] >= index[:, None])         # (n, F-1): all but own
        return tuple(torch.cat([fine.index_select(1, index), coarse[:, others].flatten(2, 3)], 2).flatten(0, 1)
                     for fine, coarse in ((k4, coarse_k), (v4, coarse_v)))          # (chunks·n, T+(F-1)·T', C)

    out = torch.empty_like(q4)
    _attend_per_frame(q4, torch.arange(frames, device=q.device), keys_values,
                      tokens + (frames - 1) * coarse_k.shape[2], heads, attention, budget, out)
    return batch_view(out)


# ---------------------------------------------------------------------------------------------- shared steps
def _attend_shared(q4: torch.Tensor, k_set: torch.Tensor, v_set: torch.Tensor, heads: int, attention: Attention,
                   budget: int) -> torch.Tensor:
    """Queries (chunks, F, T, C) against one key set per chunk (chunks, L, C) -> (chunks, F, T, C)."""
    chunks, frames, tokens, channels = q4.shape
    spans = query_frame_chunks(frames, chunks * heads * tokens * k_set.shape[1], budget)
    if len(spans) == 1:
        return attention(q4.flatten(1, 2), k_set, v_set, heads).reshape(q4.shape)
    out = torch.empty_like(q4)
    for span in spans:
        out[:, span] = attention(q4[:, span].flatten(1, 2), k_set, v_set, heads).reshape(chunks, -1, tokens,
                                                                                         channels)
    return out


def _attend_per_frame(q4: torch.Tensor, frames: torch.Tensor, keys_values: KeysValues, tokens_kv: int, heads: int,
                      attention: Attention, budget: int, out: torch.Tensor) -> None:
    """The query frames ``frames`` (n,) long, each against its own keys ``keys_values(frames)``, into ``out``."""
    chunks, _, tokens, channels = q4.shape
    per_frame = chunks * tokens_kv * (heads * tokens + 2 * channels)                 # scores + gathered k, v
    for span in query_frame_chunks(frames.numel(), per_frame, budget):
        index = frames[span]
        k_set, v_set = keys_values(index)
        rows = attention(q4.index_select(1, index).flatten(0, 1), k_set, v_set, heads)   # (chunks·n, T, C)
        out[:, index] = rows.reshape(chunks, -1, tokens, channels)


def _average_pool(x4: torch.Tensor, h: int, w: int, factor: int) -> torch.Tensor:
    """(chunks, F, h·w, C) -> (chunks, F, ceil(h/f)·ceil(w/f), C), each cell the mean of the tokens it covers."""
    chunks, frames, _, channels = x4.shape
    grid = x4.reshape(chunks * frames, h, w, channels).permute(0, 3, 1, 2)          # (chunks·F, C, h, w)
    pooled = F.avg_pool2d(grid, factor, ceil_mode=True)                              # (chunks·F, C, h', w')
    return pooled.permute(0, 2, 3, 1).reshape(chunks, frames, -1, channels)


# ---------------------------------------------------------------------------------------------- checks
def _frames(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
            chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v checked and viewed as (chunks, F, T, C)."""
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v: expected three (chunks*frames, tokens, channels) tensors of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, _, channels = q.shape
    if not (chunks >= 1 and batch % chunks == 0):
        raise ValueError(f"{chunks!r} chunks do not divide the batch of {batch} rows")
    if not (heads >= 1 and channels % heads == 0):
        raise ValueError(f"{heads!r} heads do not divide {channels} channels")
    return frames_view(q, chunks), frames_view(k, chunks), frames_view(v, chunks)


def _check_keyframes(keyframes: torch.Tensor | Sequence[int], frames: int) -> torch.Tensor:
    """Keyframes (K,) long on the CPU: distinct local indices in [0, frames) (pick_keyframes makes them)."""
    index = torch.as_tensor(keyframes)
    if not (not index.dtype.is_floating_point and index.dtype != torch.bool):
        raise ValueError(f"keyframes {keyframes!r} are not indices")
    index = index.to("cpu", torch.long).reshape(-1)
    if not (index.numel() and 0 <= int(index.min()) and int(index.max()) < frames):
        raise ValueError(f"keyframes {index.tolist()} are not local frame indices in [0, {frames})")
    if not (index.unique().numel() == index.numel()):
        raise ValueError(f"keyframes {index.tolist()} repeat a frame")
    return index


def _check_grid(grid_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    h, w = (int(s) for s in grid_hw)
    if not (h * w == tokens):
        raise ValueError(f"the {h}x{w} token grid has {h * w} cells but each frame has {tokens} tokens")
    return h, w
