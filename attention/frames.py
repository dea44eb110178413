"""The frame layout of a self-attention call, query-frame chunking, and the default attention backend.

ComfyUI hands a self-attention patch ``(chunks·F, T, C)`` tensors: ``chunks`` conditioning chunks (uncond,
cond, ...), each holding the call's F frames in order. ``frames_view`` exposes the frame axis without copying;
``query_frame_chunks`` splits the query frames of a cross-frame attention into calls of bounded size;
``once_per_distinct_chunk`` runs a chunk-wise attention once for chunks the caller knows hold the same q, k, v.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ATTENTION_BUDGET = 1 << 26      # elements per attention call: scores plus gathered keys/values (256 MiB fp32)


def frames_view(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """``(chunks·F, ...)`` -> ``(chunks, F, ...)``, a view of ``x`` (no copy)."""
    if not (chunks >= 1):
        raise ValueError(f"{chunks!r} conditioning chunks")
    if x.ndim < 1 or x.shape[0] == 0 or x.shape[0] % chunks:
        raise ValueError(f"x: expected a batch of chunks*frames rows with chunks={chunks}, got shape "
                         f"{tuple(x.shape)} ({x.shape[0] if x.ndim else 0} rows)")
    return x.unflatten(0, (chunks, x.shape[0] // chunks))


def batch_view(x: torch.Tensor) -> torch.Tensor:
    """``(chunks, F, ...)`` -> ``(chunks·F, ...)``, the inverse of ``frames_view``."""
    if x.ndim < 2:
        raise ValueError(f"x: expected (chunks, frames, ...), got shape {tuple(x.shape)}")
    return x.flatten(0, 1)


def once_per_distinct_chunk(attend: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            kinds: Sequence[int]) -> torch.Tensor:
    """``attend(q, k, v, chunks)`` computed once per kind of chunk: ``kinds`` (chunks,) names, for each chunk, the
    first chunk whose q, k and v it equals (its own index when none does), as the caller knows it from the call's
    inputs; a chunk of another's kind gets a copy of that chunk's output.

    For attention that treats chunks independently (every TVE mode: a frame attends within its own chunk) this is
    the same result. Cond and uncond chunks are equal where the text has not yet entered the UNet (the first
    transformer block's self-attention sees the same latents and timestep in both); a cross-frame attention costs
    F times per-frame attention there, so it is computed once. Reads no tensor value: chunks are picked by slicing.
    q, k, v (chunks·F, T, C) -> (chunks·F, T, C).
    """
    chunks = len(kinds)
    if any(not 0 <= kind <= c or kinds[kind] != kind for c, kind in enumerate(kinds)):
        raise ValueError(f"kinds: expected each chunk's first equal chunk (one that is its own kind), got {kinds}")
    distinct = [c for c, kind in enumerate(kinds) if kind == c]                      # first chunk of each kind
    if len(distinct) == chunks:
        return attend(q, k, v, chunks)
    views = [frames_view(t, chunks) for t in (q, k, v)]                              # 3 × (chunks, F, T, C)
    picked = (batch_view(torch.stack([t[c] for c in distinct])) for t in views)     # (kinds·F, T, C)
    out = frames_view(attend(*picked, len(distinct)), len(distinct))              # (kinds, F, T, C)
    return batch_view(torch.stack([out[distinct.index(kind)] for kind in kinds]))


def query_frame_chunks(frames: int, per_frame: int, budget: int = ATTENTION_BUDGET) -> list[slice]:
    """Consecutive ranges of query frames, each small enough for one attention call.

    ``per_frame``: elements one query frame adds to a call, its score matrix ``rows·T·L`` (rows = chunks·heads,
    L keys) plus any keys/values gathered for it. Each range holds ``budget // per_frame`` frames (at least
    one), so a call's size grows with L only, never with the square of the frames.
    """
    if frames < 1 or per_frame < 1 or budget < 1:
        raise ValueError(f"query_frame_chunks: expected positive frames, per_frame and budget, got "
                         f"frames={frames}, per_frame={per_frame}, budget={budget}")
    size = max(1, budget // per_frame)
    return [slice(start, min(start + size, frames)) for start in range(0, frames, size)]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention by ``scaled_dot_product_attention``: q (B, Tq, heads·d), k, v (B, Tk, heads·d) ->
    (B, Tq, heads·d); the signature of ComfyUI's ``optimized_attention``."""
    batch, tokens, channels = q.shape
    q, k, v = (t.reshape(batch, -1, heads, channels // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)                   # (B, heads, Tq, d)
    return out.transpose(1, 2).reshape(batch, tokens, channels)
