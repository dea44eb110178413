"""Frame layout of an attention call, query-frame chunking, computing equal CFG chunks once, and the SDPA
backend."""
import math

import pytest
import torch

from tve.attention.cross_frame import dense_attention
from tve.attention.frames import (batch_view, frames_view, once_per_distinct_chunk, query_frame_chunks,
                                 sdpa_attention)

DTYPES = [torch.float32, torch.bfloat16]


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_frames_view_is_a_view_whose_chunk_c_frame_f_is_batch_row_c_times_frames_plus_f(chunks):
    frames = 4
    x = torch.randn(chunks * frames, 6, 8, generator=generator())
    view = frames_view(x, chunks)
    assert view.shape == (chunks, frames, 6, 8)
    assert view.data_ptr() == x.data_ptr()
    for c in range(chunks):
        for f in range(frames):
            assert torch.equal(view[c, f], x[c * frames + f])
    assert torch.equal(batch_view(view), x)


def test_frames_view_of_an_indivisible_batch_is_a_clear_error():
    x = torch.zeros(6, 4, 8)
    with pytest.raises(ValueError, match="chunks=4"):
        frames_view(x, 4)
    with pytest.raises(ValueError, match="0 conditioning chunks"):
        frames_view(x, 0)
    with pytest.raises(ValueError, match="x:"):
        frames_view(torch.zeros(0, 4, 8), 1)


@pytest.mark.parametrize("frames, per_frame, budget", [(1, 10, 5), (7, 10, 30), (8, 3, 24), (5, 1, 1000), (9, 7, 1)])
def test_query_frame_chunks_cover_every_frame_once_in_order_within_the_budget(frames, per_frame, budget):
    spans = query_frame_chunks(frames, per_frame, budget)
    covered = [f for s in spans for f in range(frames)[s]]
    assert covered == list(range(frames))
    for s in spans:
        n = s.stop - s.start
        assert n >= 1 and (n == 1 or n * per_frame <= budget)
    assert len(spans) == math.ceil(frames / max(1, budget // per_frame))


def test_query_frame_chunks_reject_non_positive_sizes():
    for args in [(0, 1, 1), (3, 0, 1), (3, 1, 0)]:
        with pytest.raises(ValueError, match="query_frame_chunks"):
            query_frame_chunks(*args)


def naive_attention(q, k, v, heads):
    """softmax(q kᵀ / √d) v per head, in float64."""
    b, tq, c = q.shape
    d = c // heads
    q, k, v = (t.double().reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, tq, c)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_attention_equals_per_head_softmax_attention_with_fewer_keys_than_queries(dtype):
    g = generator(1)
    q = torch.randn(3, 10, 12, generator=g).to(dtype)
    k, v = (torch.randn(3, 7, 12, generator=g).to(dtype) for _ in range(2))
    out = sdpa_attention(q, k, v, 3)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.double(), naive_attention(q, k, v, 3), atol=tol)


def chunked_tokens(pattern, dtype, frames=3, tokens=5, channels=8, equal_qk_only=False):
    """q, k, v (chunks·F, T, C) whose chunk c holds the random tokens number ``pattern[c]`` (equal numbers: equal
    chunks); with ``equal_qk_only`` every chunk still gets its own v (PnP injection's shared source q/k)."""
    kinds = [[torch.randn(frames, tokens, channels, generator=generator(10 * i + j)).to(dtype) for j in range(3)]
             for i in range(max(pattern) + 1)]
    q, k, v = (torch.cat([kinds[p][j] for p in pattern]) for j in range(3))
    if equal_qk_only:
        v = torch.randn(v.shape, generator=generator(99)).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern, distinct", [([0, 0], [0]), ([0, 1], [0, 1]), ([0, 0, 0], [0]),
                                               ([0, 1, 0], [0, 1]), ([0, 1, 1], [0, 1]), ([0], [0])])
def test_once_per_distinct_chunk_computes_each_distinct_chunk_once_with_the_result_of_computing_all(
        dtype, pattern, distinct):
    q, k, v = chunked_tokens(pattern, dtype)
    kinds = [pattern.index(p) for p in pattern]                      # each chunk's first equal chunk
    calls = []

    def attend(q_, k_, v_, chunks):
        calls.append((q_.clone(), chunks))
        return dense_attention(q_, k_, v_, 2, chunks)

    out = once_per_distinct_chunk(attend, q, k, v, kinds)
    assert [c for _, c in calls] == [len(distinct)]
    assert torch.equal(calls[0][0], batch_view(frames_view(q, len(pattern))[distinct]))
    everything = dense_attention(q, k, v, 2, len(pattern))
    assert out.dtype == dtype and out.shape == v.shape
    assert torch.allclose(out.float(), everything.float(), **({} if dtype == torch.float32 else dict(atol=2e-2)))
    views = frames_view(out, len(pattern))
    for c, p in enumerate(pattern):
        assert torch.equal(views[c], views[pattern.index(p)])         # equal chunks get the very same output


def test_chunks_of_their_own_kind_are_all_computed_and_bad_kinds_are_refused():
    q, k, v = chunked_tokens([0, 0], torch.float32, equal_qk_only=True)
    calls = []

    def attend(q_, k_, v_, chunks):
        calls.append(chunks)
        return dense_attention(q_, k_, v_, 2, chunks)

    out = once_per_distinct_chunk(attend, q, k, v, [0, 1])
    assert calls == [2] and torch.equal(out, dense_attention(q, k, v, 2, 2))
    for bad in ([1, 0], [0, 2], [1, 1]):
        with pytest.raises(ValueError, match="kinds"):
            once_per_distinct_chunk(attend, q, k, v, bad)
