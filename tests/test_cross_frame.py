"""Cross-frame attention modes against naive per-frame references, and the keyframe draw."""
import math

import pytest
import torch

from tve.attention.cross_frame import anchor_attention, dense_attention, fine_coarse_attention, keyframe_attention
from tve.attention.tokenflow import pick_keyframes
from tve.attention.frames import sdpa_attention

DTYPES = [torch.float32, torch.bfloat16]
HEADS, CHANNELS, GRID = 2, 8, (5, 3)          # T = 15 tokens on a non-square grid that 2 and 3 do not divide
TOKENS = GRID[0] * GRID[1]
MODES = ["dense", "keyframes", "anchor", "anchor_with_self", "fine_coarse", "fine_coarse_3"]


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def qkv(chunks, frames, seed=0, dtype=torch.float32):
    g = generator(seed)
    return [torch.randn(chunks * frames, TOKENS, CHANNELS, generator=g).to(dtype) for _ in range(3)]


def tolerance(dtype):
    return 1e-5 if dtype == torch.float32 else 3e-2


def keyframes_of(frames):
    return torch.arange(frames - 1, -1, -2)                   # e.g. [4, 2, 0]: unsorted on purpose


def anchor_of(frames):
    return frames // 2


def run(mode, q, k, v, chunks, **kw):
    frames = q.shape[0] // chunks
    if mode == "dense":
        return dense_attention(q, k, v, HEADS, chunks, **kw)
    if mode == "keyframes":
        return keyframe_attention(q, k, v, HEADS, chunks, keyframes_of(frames), **kw)
    if mode in ("anchor", "anchor_with_self"):
        return anchor_attention(q, k, v, HEADS, chunks, anchor_of(frames), mode == "anchor_with_self", **kw)
    return fine_coarse_attention(q, k, v, HEADS, chunks, GRID, 3 if mode == "fine_coarse_3" else 2, **kw)


def coarse_tokens(frame, factor):
    """(T, C) -> the mean of each factor×factor block of the grid, blocks clipped at the edges, row-major."""
    h, w = GRID
    cells = frame.reshape(h, w, -1)
    return torch.stack([cells[i:i + factor, j:j + factor].reshape(-1, cells.shape[-1]).mean(0)
                        for i in range(0, h, factor) for j in range(0, w, factor)])


def keys_of(mode, frames):
    """The key (or value) tokens frame f attends to, from one chunk's (F, T, C) tensor: (L, C)."""
    if mode == "dense":
        return lambda x, f: x.reshape(-1, CHANNELS)
    if mode == "keyframes":
        return lambda x, f: x[keyframes_of(frames)].reshape(-1, CHANNELS)
    a = anchor_of(frames)
    if mode == "anchor":
        return lambda x, f: x[a]
    if mode == "anchor_with_self":
        return lambda x, f: x[a] if f == a else torch.cat([x[a], x[f]])
    factor = 3 if mode == "fine_coarse_3" else 2
    return lambda x, f: torch.cat([x[f]] + [coarse_tokens(x[g], factor) for g in range(frames) if g != f])


def naive_attention(q, k, v, heads):
    """softmax(q kᵀ / √d) v per head, in float64: (B, Tq, C), (B, Tk, C) -> (B, Tq, C)."""
    b, tq, c = q.shape
    d = c // heads
    q, k, v = (t.double().reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, tq, c)


def reference(q, k, v, chunks, keys):
    """Frame by frame: chunk c, frame f attends to keys(chunk c's frames, f) of k and v; float64."""
    q4, k4, v4 = (t.double().reshape(chunks, -1, TOKENS, CHANNELS) for t in (q, k, v))
    out = torch.empty_like(q4)
    for c in range(chunks):
        for f in range(q4.shape[1]):
            out[c, f] = naive_attention(q4[c, f][None], keys(k4[c], f)[None], keys(v4[c], f)[None], HEADS)[0]
    return out.reshape(q.shape)


# ---------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_over_one_frame_is_vanilla_self_attention(mode, chunks, dtype):
    q, k, v = qkv(chunks, 1, dtype=dtype)
    out = run(mode, q, k, v, chunks)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.allclose(out.float(), sdpa_attention(q, k, v, HEADS).float(), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["dense", "keyframes", "anchor", "anchor_with_self"])
def test_every_mode_over_identical_frames_is_vanilla_self_attention(mode, dtype):
    chunks, frames = 2, 5
    one = qkv(chunks, 1, seed=4, dtype=dtype)                        # one frame per chunk, repeated
    q, k, v = (t.repeat_interleave(frames, 0) for t in one)
    vanilla = sdpa_attention(*one, HEADS).repeat_interleave(frames, 0)
    assert torch.allclose(run(mode, q, k, v, chunks).float(), vanilla.float(), atol=tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fine_coarse_over_identical_frames_with_factor_one_is_vanilla(dtype):
    one = qkv(2, 1, seed=4, dtype=dtype)
    q, k, v = (t.repeat_interleave(4, 0) for t in one)
    out = fine_coarse_attention(q, k, v, HEADS, 2, GRID, 1)
    assert torch.allclose(out.float(), sdpa_attention(*one, HEADS).repeat_interleave(4, 0).float(),
                          atol=tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_equals_its_frame_by_frame_reference(mode, chunks, dtype):
    frames = 5
    q, k, v = qkv(chunks, frames, seed=1, dtype=dtype)
    out = run(mode, q, k, v, chunks)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.allclose(out.double(), reference(q, k, v, chunks, keys_of(mode, frames)), atol=tolerance(dtype))


@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("anchor", [0, 3])
def test_anchor_attention_equals_the_anchor_frame_reference(anchor, include_self):
    q, k, v = qkv(2, 4, seed=2)
    out = anchor_attention(q, k, v, HEADS, 2, anchor, include_self)
    if include_self:
        keys = lambda x, f: x[anchor] if f == anchor else torch.cat([x[anchor], x[f]])  # noqa: E731
    else:
        keys = lambda x, f: x[anchor]  # noqa: E731
    assert torch.allclose(out.double(), reference(q, k, v, 2, keys), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_anchor_frame_with_its_own_keys_is_exactly_vanilla(dtype):
    chunks, frames, anchor = 2, 4, 1
    q, k, v = qkv(chunks, frames, seed=3, dtype=dtype)
    out = anchor_attention(q, k, v, HEADS, chunks, anchor, True).reshape(chunks, frames, TOKENS, CHANNELS)
    rows = [c * frames + anchor for c in range(chunks)]
    vanilla = sdpa_attention(q[rows], k[rows], v[rows], HEADS)
    assert torch.equal(out[:, anchor], vanilla)


@pytest.mark.parametrize("dtype", DTYPES)
def test_keyframes_at_interval_one_equal_dense(dtype):
    q, k, v = qkv(2, 6, seed=5, dtype=dtype)
    keyframes = pick_keyframes(range(6), 1, seed=7, step=3)
    out = keyframe_attention(q, k, v, HEADS, 2, keyframes)
    assert torch.allclose(out.float(), dense_attention(q, k, v, HEADS, 2).float(), atol=tolerance(dtype) / 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fine_coarse_with_factor_one_equals_dense(dtype):
    q, k, v = qkv(3, 4, seed=6, dtype=dtype)
    out = fine_coarse_attention(q, k, v, HEADS, 3, GRID, 1)
    assert torch.allclose(out.float(), dense_attention(q, k, v, HEADS, 3).float(), atol=tolerance(dtype))


@pytest.mark.parametrize("chunks", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_chunks_are_independent(mode, chunks):
    frames = 4
    q, k, v = qkv(chunks, frames, seed=7)
    changed = [t.clone() for t in (q, k, v)]
    for t in changed:
        t[frames:] = torch.randn(t[frames:].shape, generator=generator(8))     # every chunk but chunk 0
    before, after = run(mode, q, k, v, chunks), run(mode, *changed, chunks)
    assert torch.equal(before[:frames], after[:frames])
    assert not torch.allclose(before[frames:], after[frames:])


# ---------------------------------------------------------------------------------------------- query chunking
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_query_chunking_gives_the_result_of_a_single_call(mode, dtype):
    chunks, frames = 2, 5
    q, k, v = qkv(chunks, frames, seed=9, dtype=dtype)
    calls = []

    def spy(q_, k_, v_, heads):
        assert q_.ndim == 3 and k_.shape == v_.shape and k_.shape[0] == q_.shape[0] and heads == HEADS
        assert q_.dtype == k_.dtype == v_.dtype == dtype
        calls.append(q_.shape[1] // TOKENS)                         # query frames laid end to end in this call
        return sdpa_attention(q_, k_, v_, heads)

    whole = run(mode, q, k, v, chunks, attention=spy)
    assert len(calls) == (2 if mode == "anchor_with_self" else 1)   # anchor_with_self: the anchor apart
    calls.clear()
    split = run(mode, q, k, v, chunks, attention=spy, budget=1)
    assert max(calls) == 1 and len(calls) == frames                 # one query frame per call
    assert split.dtype == dtype
    assert torch.allclose(split.float(), whole.float(), atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad inputs
def test_mismatched_q_k_v_and_broken_call_invariants_are_clear_errors():
    """Artist values are validated by the engine (engine/validation.py); here only the tensors' own invariants."""
    q, k, v = qkv(2, 3)
    with pytest.raises(ValueError, match="q, k, v"):
        dense_attention(q, k[:, :5], v, HEADS, 2)
    with pytest.raises(ValueError, match="chunks do not divide"):
        dense_attention(q, k, v, HEADS, 4)
    with pytest.raises(ValueError, match="heads do not divide"):
        dense_attention(q, k, v, 3, 2)
    for bad in ([], [0, 3], [-1], [1, 1], torch.tensor([0.0])):
        with pytest.raises(ValueError, match="keyframes"):
            keyframe_attention(q, k, v, HEADS, 2, bad)
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="anchor"):
            anchor_attention(q, k, v, HEADS, 2, bad, False)
    with pytest.raises(ValueError, match="token grid"):
        fine_coarse_attention(q, k, v, HEADS, 2, (3, 3), 2)
    with pytest.raises(ValueError, match="pooling factor"):
        fine_coarse_attention(q, k, v, HEADS, 2, GRID, 0)


# ---------------------------------------------------------------------------------------------- keyframe draw
def test_pick_keyframes_takes_one_frame_per_window_of_global_ids():
    ids = list(range(8, 16))
    for step in range(5):
        local = pick_keyframes(ids, 4, seed=1, step=step)
        assert local.dtype == torch.long and torch.equal(local, local.sort().values)
        picked = [ids[i] for i in local.tolist()]
        assert len(picked) == 2 and 8 <= picked[0] <= 11 and 12 <= picked[1] <= 15


@pytest.mark.parametrize("ids, windows", [([28, 29, 30, 31, 0, 1, 2, 3], {7, 0}),     # a looped context window
                                          ([6, 7, 8, 9], {1, 2}),                       # starting mid-window
                                          ([0, 5, 10, 15, 20], {0, 1, 2, 3, 5})])       # strided
def test_pick_keyframes_on_context_windows_draws_one_keyframe_per_global_window_present(ids, windows):
    for step in range(5):
        picked = [ids[i] for i in pick_keyframes(ids, 4, seed=2, step=step).tolist()]
        assert sorted(g // 4 for g in picked) == sorted(windows)


def test_pick_keyframes_is_reproducible_per_seed_and_step_and_redrawn_across_steps_and_seeds():
    ids = range(32)
    draw = lambda seed, step: tuple(pick_keyframes(ids, 4, seed, step).tolist())  # noqa: E731
    assert draw(3, 5) == draw(3, 5)
    assert len({draw(3, step) for step in range(6)}) > 1
    assert len({draw(seed, 5) for seed in range(6)}) > 1
    assert draw(2**64 - 1, -1) == draw(2**64 - 1, -1)                # the node's widest seed; step unknown


def test_pick_keyframes_is_uniform_among_the_windows_frames_present():
    counts = torch.zeros(3, dtype=torch.long)
    for step in range(600):
        counts[pick_keyframes([5, 6, 7], 4, seed=0, step=step)] += 1       # window 1 holds 4..7; 4 is absent
    assert int(counts.sum()) == 600 and bool((counts > 150).all()) and bool((counts < 250).all())


def test_overlapping_calls_pick_the_same_keyframe_for_a_window_they_share():
    first, second = list(range(0, 8)), list(range(4, 12))
    for step in range(10):
        a = {first[i] for i in pick_keyframes(first, 4, seed=5, step=step).tolist()}
        b = {second[i] for i in pick_keyframes(second, 4, seed=5, step=step).tolist()}
        assert {g for g in a if g // 4 == 1} == {g for g in b if g // 4 == 1}


def test_pick_keyframes_at_interval_one_takes_every_frame():
    assert torch.equal(pick_keyframes([3, 9, 4], 1, seed=0, step=0), torch.arange(3))


def test_pick_keyframes_asserts_its_call_invariants():
    for bad in (0, -2):
        with pytest.raises(ValueError, match="interval"):
            pick_keyframes(range(8), bad, seed=0, step=0)
    for bad in ([], [1, 1], [-1, 0], [0.0, 1.0]):
        with pytest.raises(ValueError, match="frame ids"):
            pick_keyframes(bad, 2, seed=0, step=0)
