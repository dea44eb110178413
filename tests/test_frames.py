"""Frame layout of an attention call, query-frame chunking, and the SDPA backend."""
import math

import pytest
import torch

from tve.attention.frames import batch_view, frames_view, query_frame_chunks, sdpa_attention

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
    with pytest.raises(AssertionError, match="chunks"):
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
