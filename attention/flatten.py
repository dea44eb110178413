"""FLATTEN trajectory attention: each token attends to the tokens on its own optical-flow trajectory.

FLATTEN (Cong et al., ICLR 2024), §3.2–3.3: after the dense spatio-temporal attention, every patch token
attends to the tokens its trajectory passes through in the frames of the call; all tokens of a trajectory share
one key set. The official code and the ComfyUI ports gather a private key/value list per query, O(F²·T·C)
memory. Here the attention is GROUPED: gather the tokens of each trajectory into one row, attend along the row,
put the rows back: O(F·T·C) memory.

Rows are grouped by their exact length (at most F lengths), so no row is padded and no attention needs a mask:
any attention backend runs it at full speed (ComfyUI's flash / sage / xformers kernels take no mask or fall back
to a slower path with one). A length's rows are cut into groups of at most 1/``GROUPS_PER_CALL`` of the call's
tokens, each one gather, one attention and one write-back, so the temporaries stay a fraction of the output. A
length-1 row is its own value (softmax over one key).

The index is built once per (trajectories, frames of the call) by ``trajectory_index``; the attention takes it
with q, k, v of the block: FLATTEN's default (``old_qk=0``) passes the dense-attention output as all three,
``old_qk=1`` passes the block's own q/k projections with the dense output as v.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Attention = Callable[..., torch.Tensor]     # ComfyUI's attention(q, k, v, heads), (B, L, heads·d); no mask

GROUPS_PER_CALL = 8                         # a group holds at most 1/8 of the call's F·T tokens


@dataclass(frozen=True, eq=False)
class TrajectoryGroup:
    """Rows of trajectories of one length, ``length`` tokens each."""
    length: int
    gather: torch.Tensor                # (rows·length,) long: flat position frame·T + cell of each token

    def to(self, device: torch.device) -> "TrajectoryGroup":
        return TrajectoryGroup(self.length, self.gather.to(device))


@dataclass(frozen=True, eq=False)
class TrajectoryIndex:
    """Where the tokens of each trajectory lie in a call's ``(F·T)`` tokens, in groups of one length.

    Every one of the ``frames·tokens`` positions is in exactly one row of one group.
    """
    frames: int                         # F: frames of the call
    tokens: int                         # T = h·w of the token grid
    groups: tuple[TrajectoryGroup, ...]
    _on_device: dict = field(default_factory=dict, repr=False)

    def to(self, device: torch.device | str) -> "TrajectoryIndex":
        """This index on ``device`` (copies are kept, so each device is copied to once)."""
        device = torch.device(device)
        if all(g.gather.device == device for g in self.groups):
            return self
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = TrajectoryIndex(self.frames, self.tokens,
                                                   tuple(g.to(device) for g in self.groups))
        return self._on_device[key]


def trajectory_index(tracks: torch.Tensor, track_of: torch.Tensor,
                     frame_ids: Sequence[int] | torch.Tensor | None = None) -> TrajectoryIndex:
    """The gather/scatter index of trajectory attention over the frames ``frame_ids`` (FLATTEN §3.2).

    tracks (n_traj, frames) long: flat cell y·w + x of each trajectory per frame, -1 where absent; track_of
    (frames, h·w) long: the trajectory of each cell (every cell on exactly one trajectory). frame_ids: the global
    frames of the call in its order (e.g. a context window); None = all frames. The trajectories are cut to
    those frames; trajectories absent from all of them are dropped.
    """
    all_frames, tokens = _check_grid(tracks, track_of)
    ids = _check_frame_ids(frame_ids, all_frames)
    tracks = tracks.detach().to("cpu", torch.long)[:, ids]                         # (n, F)
    track_of = track_of.detach().to("cpu", torch.long)[ids]                        # (F, T)
    _check_inverse(tracks, track_of)
    frames = len(ids)
    present = tracks >= 0
    kept = present.any(1)
    tracks, present = tracks[kept], present[kept]
    lengths = present.sum(1)                                                        # (n,)
    position = torch.arange(frames)[None, :] * tokens + tracks                      # (n, F) flat frame·T + cell
    compact = torch.zeros_like(position)                                           # (n, F)
    row, frame = present.nonzero(as_tuple=True)
    compact[row, present.cumsum(1)[row, frame] - 1] = position[row, frame]         # real tokens to the left
    group_tokens = -(-frames * tokens // GROUPS_PER_CALL)
    groups = []
    for length in lengths.unique().tolist():
        of_length = (lengths == length).nonzero().squeeze(1)
        for rows in of_length.split(max(1, group_tokens // length)):
            groups.append(TrajectoryGroup(length, compact[rows, :length].reshape(-1)))   # (rows·length,)
    return TrajectoryIndex(frames, tokens, tuple(groups))


def trajectory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: TrajectoryIndex, heads: int,
                         chunks: int, attention: Attention | None = None) -> torch.Tensor:
    """Multi-head attention of every token over the tokens of its trajectory (FLATTEN §3.3).

    q, k, v (chunks·F, T, C): the block's tokens, ``chunks`` CFG chunks each holding the F frames of the call in
    ``index``'s order; FLATTEN's default passes the dense-attention output as q, k and v. Returns (chunks·F, T, C)
    like v. ``attention``: the host's attention ``attention(q, k, v, heads)`` on (B, L, heads·d) (ComfyUI's
    ``optimized_attention``; rows are never padded, so it is never given a mask); None =
    ``scaled_dot_product_attention``.
    """
    frames, tokens, channels = _check_call(q, k, v, index, heads, chunks)
    index = index.to(v.device)
    flat = [t.reshape(chunks, frames * tokens, channels) for t in (q, k, v)]       # (chunks, F·T, C)
    out = torch.empty_like(flat[2])
    for group in index.groups:
        gathered = _gather(flat, (q, k, v), group.gather)                         # 3 × (chunks, rows·L, C)
        rows_out = gathered[2]
        if group.length > 1:
            rows_out = _attend(*gathered, group.length, heads, chunks, attention)
        out.index_copy_(1, group.gather, rows_out)
    return out.view(chunks * frames, tokens, channels)


def _gather(flat: list[torch.Tensor], originals: tuple[torch.Tensor, ...],
            position: torch.Tensor) -> list[torch.Tensor]:
    """The slots of q, k, v; a tensor passed more than once is gathered once."""
    gathered: list[torch.Tensor] = []
    for i, t in enumerate(flat):
        same = next((j for j in range(i) if originals[j] is originals[i]), None)
        gathered.append(gathered[same] if same is not None else t.index_select(1, position))
    return gathered


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, heads: int, chunks: int,
            attention: Attention | None) -> torch.Tensor:
    """Attention along the rows (``length`` tokens each) of one group: (chunks, rows·L, C) -> same."""
    channels = v.shape[-1]
    batch = v.shape[1] // length * chunks
    q, k, v = (t.view(batch, length, channels) for t in (q, k, v))                # (chunks·rows, L, C)
    if attention is not None:
        out = attention(q, k, v, heads)
    else:
        q, k, v = (t.view(batch, length, heads, channels // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)              # (B, L, heads, d)
    return out.reshape(chunks, -1, channels)


def _check_grid(tracks: torch.Tensor, track_of: torch.Tensor) -> tuple[int, int]:
    """(frames, tokens) of a trajectory grid: tracks (n_traj, frames) and track_of (frames, h·w), integer."""
    if tracks.dtype.is_floating_point or track_of.dtype.is_floating_point:
        raise ValueError("integer indices expected")
    if not (tracks.ndim == track_of.ndim == 2 and tracks.shape[1] == track_of.shape[0] and track_of.shape[1]):
        raise ValueError(f"tracks {tuple(tracks.shape)} and track_of {tuple(track_of.shape)} are not (n_traj, F) "
                         "and (F, h·w)")
    return track_of.shape[0], track_of.shape[1]


def _check_frame_ids(frame_ids: Sequence[int] | torch.Tensor | None, all_frames: int) -> torch.Tensor:
    """Frame ids (F,) long on the CPU: distinct indices into the trajectories' ``all_frames`` frames."""
    if frame_ids is None:
        return torch.arange(all_frames)
    ids = torch.as_tensor(frame_ids).to("cpu", torch.long).reshape(-1)
    if not (ids.numel() and 0 <= int(ids.min()) and int(ids.max()) < all_frames):
        raise ValueError(f"frame ids {ids.tolist()} are not indices into the trajectories' {all_frames} frames")
    if not (ids.unique().numel() == ids.numel()):
        raise ValueError(f"frame ids {ids.tolist()} repeat a frame")
    return ids


def _check_inverse(tracks: torch.Tensor, track_of: torch.Tensor) -> None:
    """Every cell of every frame on exactly one trajectory, and track_of the inverse of tracks."""
    n, tokens = tracks.shape[0], track_of.shape[1]
    if int(tracks.min()) < -1 or int(tracks.max()) >= tokens:
        raise ValueError(f"tracks: expected cells in [0, {tokens}) or -1 (absent), got values in "
                         f"[{int(tracks.min())}, {int(tracks.max())}]")
    if int(track_of.min()) < 0 or int(track_of.max()) >= n:
        raise ValueError(f"track_of: expected trajectory ids in [0, {n}), got values in "
                         f"[{int(track_of.min())}, {int(track_of.max())}]")
    frame = torch.arange(track_of.shape[0])[:, None]
    if (bool((tracks[track_of, frame] != torch.arange(tokens)).any())
            or int((tracks >= 0).sum()) != track_of.numel()):
        raise ValueError("tracks/track_of: expected every cell of every frame on exactly one trajectory, with "
                         "track_of the inverse map of tracks")


def _check_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: TrajectoryIndex, heads: int,
                chunks: int) -> tuple[int, int, int]:
    if not isinstance(index, TrajectoryIndex):
        raise ValueError(f"index: expected a TrajectoryIndex from trajectory_index(), got {type(index).__name__}")
    if v.ndim != 3 or q.shape != v.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v: expected three (chunks*frames, tokens, channels) tensors of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, tokens, channels = v.shape
    if chunks < 1 or batch % chunks:
        raise ValueError(f"chunks: the batch of {batch} is not a multiple of chunks={chunks}")
    if heads < 1 or channels % heads:
        raise ValueError(f"heads: {channels} channels do not split into {heads} heads")
    if tokens != index.tokens:
        raise ValueError(f"q, k, v: {tokens} tokens per frame but the trajectories' grid has h*w={index.tokens}")
    if batch // chunks != index.frames:
        raise ValueError(f"q, k, v: {batch // chunks} frames per chunk ({batch} rows / {chunks} chunks) but the "
                         f"trajectory index holds {index.frames} frames; build it with this call's frame_ids")
    return index.frames, tokens, channels
