"""FLATTEN grouped trajectory attention (FLATTEN §3.2–3.3) against a per-query masked reference."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tve.attention.flatten import trajectory_attention, trajectory_index

DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def grid_from_track_of(track_of: torch.Tensor, grid_hw: tuple[int, int]) -> SimpleNamespace:
    """A TrajectoryGrid-shaped input from the inverse map (F, h*w) of trajectory ids 0..n-1."""
    frames, tokens = track_of.shape
    tracks = torch.full((int(track_of.max()) + 1, frames), -1, dtype=torch.long)
    tracks[track_of, torch.arange(frames)[:, None]] = torch.arange(tokens)
    return SimpleNamespace(grid_hw=grid_hw, tracks=tracks, track_of=track_of)


def random_grid(frames: int, h: int, w: int, seed: int, pool_per_cell: float = 2.0) -> SimpleNamespace:
    """Each frame's cells drawn without repeats from a pool of ids: broken, gapped, short and singleton tracks."""
    g = torch.Generator().manual_seed(seed)
    tokens = h * w
    pool = max(tokens, int(pool_per_cell * tokens))
    ids = torch.stack([torch.randperm(pool, generator=g)[:tokens] for _ in range(frames)])     # (F, T)
    return grid_from_track_of(ids.unique(return_inverse=True)[1], (h, w))


def translation_grid(frames: int, h: int, w: int, step: tuple[int, int]) -> SimpleNamespace:
    """Content moving by ``step`` (dy, dx) cells per frame: a cell's trajectory is its world coordinate."""
    f = torch.arange(frames)[:, None, None]
    y, x = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    world = (y - step[0] * f) * 10_000 + (x - step[1] * f)                             # (F, h, w)
    return grid_from_track_of(world.reshape(frames, -1).unique(return_inverse=True)[1], (h, w))


def static_grid(frames: int, h: int, w: int) -> SimpleNamespace:
    return grid_from_track_of(torch.arange(h * w).repeat(frames, 1), (h, w))


def reference(q, k, v, track_of, heads, chunks):
    """Per query token: masked softmax over all F·T tokens of its chunk, allowing only its trajectory's tokens."""
    batch, tokens, channels = v.shape
    d = channels // heads
    q, k, v = (t.double().reshape(chunks, -1, heads, d).transpose(1, 2) for t in (q, k, v))   # (c, h, F·T, d)
    same = track_of.reshape(-1)[:, None] == track_of.reshape(-1)[None, :]                    # (F·T, F·T)
    scores = (q @ k.transpose(-1, -2) / d ** 0.5).masked_fill(~same, float("-inf"))
    out = scores.softmax(-1) @ v                                                              # (c, h, F·T, d)
    return out.transpose(1, 2).reshape(batch, tokens, channels)


def tokens(grid, chunks, channels, dtype, seed=0, frames=None):
    g = torch.Generator().manual_seed(seed)
    frames = grid.track_of.shape[0] if frames is None else frames
    shape = (chunks * frames, grid.track_of.shape[1], channels)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]


def attend(q, k, v, grid, heads, chunks, frame_ids=None, **kwargs):
    index = trajectory_index(grid.tracks, grid.track_of, frame_ids)
    return trajectory_attention(q, k, v, index, heads, chunks, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("seed,pool", [(0, 1.5), (1, 2.0), (2, 4.0)])
def test_grouped_attention_equals_per_query_masked_reference(dtype, chunks, seed, pool):
    grid = random_grid(frames=6, h=3, w=4, seed=seed, pool_per_cell=pool)
    q, k, v = tokens(grid, chunks, 16, dtype, seed)
    lengths = (grid.tracks >= 0).sum(1)
    assert lengths.min() < lengths.max()                                  # mixed lengths: several groups
    for args in ((q, k, v), (v, v, v)):                                   # old_qk=1 and old_qk=0
        out = attend(*args, grid, heads=2, chunks=chunks)
        assert out.dtype == dtype and out.shape == v.shape
        torch.testing.assert_close(out.double(), reference(*args, grid.track_of, 2, chunks), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_video_is_attention_over_time_per_cell(dtype):
    frames, h, w, chunks, heads, channels = 5, 4, 3, 2, 4, 16
    q, k, v = tokens(static_grid(frames, h, w), chunks, channels, dtype)
    out = attend(q, k, v, static_grid(frames, h, w), heads, chunks)

    def per_cell(t):                                                      # (c·F, T, C) -> (c·T, heads, F, d)
        t = t.view(chunks, frames, h * w, heads, -1).permute(0, 2, 3, 1, 4)
        return t.reshape(chunks * h * w, heads, frames, -1)
    expected = F.scaled_dot_product_attention(per_cell(q), per_cell(k), per_cell(v))
    expected = expected.view(chunks, h * w, heads, frames, -1).permute(0, 3, 1, 2, 4).reshape(v.shape)
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_length_one_trajectory_returns_its_value_exactly(dtype):
    grid = random_grid(frames=4, h=3, w=3, seed=3, pool_per_cell=6.0)
    q, k, v = tokens(grid, 2, 8, dtype)
    out = attend(q, k, v, grid, heads=2, chunks=2)
    singleton = ((grid.tracks >= 0).sum(1) == 1)[grid.track_of].repeat(2, 1)   # (chunks·F, T)
    assert singleton.any() and not singleton.all()
    assert torch.equal(out[singleton], v[singleton])
    one_frame = attend(q[:2], k[:2], v[:2], grid, heads=2, chunks=2, frame_ids=[2])
    assert torch.equal(one_frame, v[:2])                                  # one frame: every trajectory length 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", [(0, 1), (1, 2), (-1, 0)])
def test_non_square_translation_maps_back_to_its_cells(dtype, step):
    frames, h, w = 4, 3, 5
    grid = translation_grid(frames, h, w, step)
    q, k, _ = tokens(grid, 2, 8, dtype)
    f = torch.arange(frames)[:, None, None]
    y, x = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    world = ((y - step[0] * f) * 16 + (x - step[1] * f)).reshape(frames, h * w, 1).float()
    v = world.expand(frames, h * w, 8).repeat(2, 1, 1).to(dtype)         # the value of a cell = its world position
    out = attend(q, k, v, grid, heads=2, chunks=2)
    # every key of a token carries the token's own world position, so the output lands on the cell it came from
    torch.testing.assert_close(out, v, atol=1e-4, rtol=0)
    v_random = tokens(grid, 2, 8, dtype, seed=5)[2]
    torch.testing.assert_close(attend(q, k, v_random, grid, 2, 2).double(),
                               reference(q, k, v_random, grid.track_of, 2, 2), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frame_ids", [[2, 3, 4, 5], [6, 1, 3]])
def test_frame_window_equals_trajectories_cut_to_those_frames(dtype, frame_ids):
    grid = random_grid(frames=8, h=3, w=4, seed=4)
    cut_ids = grid.track_of[frame_ids].unique(return_inverse=True)[1]              # renumbered, absent ones gone
    cut = grid_from_track_of(cut_ids, grid.grid_hw)
    assert len(cut.tracks) < len(grid.tracks)                             # some trajectories are dropped
    q, k, v = tokens(grid, 2, 8, dtype, frames=len(frame_ids))
    out = attend(q, k, v, grid, heads=2, chunks=2, frame_ids=frame_ids)
    torch.testing.assert_close(out, attend(q, k, v, cut, heads=2, chunks=2), atol=0, rtol=0)
    torch.testing.assert_close(out.double(), reference(q, k, v, grid.track_of[frame_ids], 2, 2),
                               **TOLERANCE[dtype])


def test_chunks_are_independent():
    grid = random_grid(frames=4, h=2, w=5, seed=6)
    q, k, v = tokens(grid, 3, 8, torch.float32)
    out = attend(q, k, v, grid, heads=2, chunks=3)
    for c in range(3):
        rows = slice(4 * c, 4 * (c + 1))
        torch.testing.assert_close(out[rows], attend(q[rows], k[rows], v[rows], grid, heads=2, chunks=1))
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:4] = torch.randn_like(t[:4])
    assert torch.equal(attend(q2, k2, v2, grid, heads=2, chunks=3)[4:], out[4:])


def test_rows_are_not_padded_and_cover_each_token_once():
    grid = random_grid(frames=9, h=4, w=4, seed=7, pool_per_cell=3.0)
    index = trajectory_index(grid.tracks, grid.track_of)
    lengths = (grid.tracks >= 0).sum(1)
    assert lengths.unique().numel() > 2                                   # several lengths: several groups
    covered = torch.cat([g.gather for g in index.groups]).sort().values
    assert torch.equal(covered, torch.arange(9 * 16))                     # no padding slot, no token twice
    assert all(g.gather.dtype == torch.long and g.gather.numel() % g.length == 0 for g in index.groups)
    for g in index.groups:                                 # a row: one trajectory's tokens, frames ascending
        rows = g.gather.view(-1, g.length)
        assert bool((rows // 16).diff(dim=1).gt(0).all())
        track = grid.track_of.reshape(-1)[rows]
        assert bool((track == track[:, :1]).all())
        assert bool((lengths[track[:, 0]] == g.length).all())


def comfy_style_attention(q, k, v, heads, **kwargs):
    """ComfyUI's attention signature: (B, L, heads·d) tensors; trajectory attention never passes a mask."""
    assert not kwargs, f"trajectory attention passed {sorted(kwargs)} to the host's attention"
    b, length, channels = q.shape
    q, k, v = (t.view(b, -1, heads, channels // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, length, channels)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_callable_gives_the_default_result_without_nan(dtype):
    grid = random_grid(frames=6, h=3, w=3, seed=8)
    q, k, v = tokens(grid, 2, 8, dtype)
    q = q * 1e3                                                           # saturated softmax
    calls = []

    def attention(*args, **kwargs):
        calls.append(args[0].shape[1])
        return comfy_style_attention(*args, **kwargs)

    out = attend(q, k, v, grid, heads=2, chunks=2, attention=attention)
    assert sorted(set(calls)) == sorted({int(n) for n in (grid.tracks >= 0).sum(1).tolist() if n > 1})
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attend(q, k, v, grid, heads=2, chunks=2), **TOLERANCE[dtype])
    torch.testing.assert_close(out.double(), reference(q, k, v, grid.track_of, 2, 2), **TOLERANCE[dtype])


@pytest.mark.real_host
@pytest.mark.parametrize("backend", ["sub_quad", "pytorch", "split", "basic"])
def test_the_hosts_attention_backends_give_the_default_result(backend):
    from tve.engine import host
    function = host.attention_backend(backend)
    grid = random_grid(frames=6, h=3, w=4, seed=11)
    q, k, v = tokens(grid, 2, 16, torch.float32)
    out = attend(q, k, v, grid, heads=2, chunks=2, attention=function)
    torch.testing.assert_close(out, attend(q, k, v, grid, heads=2, chunks=2), **TOLERANCE[torch.float32])


def bad_inverse():
    grid = random_grid(frames=3, h=2, w=2, seed=9)
    track_of = grid.track_of.clone()
    track_of[0, [0, 1]] = track_of[0, [1, 0]]
    return grid.tracks, track_of


@pytest.mark.parametrize("tracks_track_of,frame_ids,error,match", [
    (lambda g: (g.tracks, g.track_of), [0, 5], ValueError, r"not indices into the trajectories' 4 frames"),
    (lambda g: (g.tracks, g.track_of), [0, 1, 2, 3, 0], ValueError, "repeat a frame"),
    (lambda g: (g.tracks, g.track_of), [1, 1], ValueError, "repeat a frame"),
    (lambda g: (g.tracks.float(), g.track_of), None, ValueError, "integer indices expected"),
    (lambda g: (g.tracks, g.track_of[:3]), None, ValueError, "are not \\(n_traj, F\\)"),
    (lambda g: bad_inverse(), None, ValueError, "exactly one trajectory"),
])
def test_bad_trajectories_or_frames_are_refused(tracks_track_of, frame_ids, error, match):
    grid = random_grid(frames=4, h=2, w=3, seed=10)
    with pytest.raises(error, match=match):
        trajectory_index(*tracks_track_of(grid), frame_ids)


@pytest.mark.parametrize("shape,heads,chunks,match", [
    ((8, 7, 8), 2, 2, r"7 tokens per frame but the trajectories' grid has h\*w=6"),
    ((6, 6, 8), 2, 2, r"3 frames per chunk .* index holds 4 frames"),
    ((12, 6, 8), 2, 2, r"6 frames per chunk .* index holds 4 frames"),
    ((9, 6, 8), 2, 2, "batch of 9 is not a multiple of chunks=2"),
    ((8, 6, 8), 3, 2, "8 channels do not split into 3 heads"),
])
def test_bad_tokens_raise_clear_errors(shape, heads, chunks, match):
    grid = random_grid(frames=4, h=2, w=3, seed=10)
    index = trajectory_index(grid.tracks, grid.track_of)
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        trajectory_attention(x, x, x, index, heads, chunks)
    with pytest.raises(ValueError, match="q, k, v: expected three"):
        trajectory_attention(x, x[:, :-1], x, index, heads, chunks)
