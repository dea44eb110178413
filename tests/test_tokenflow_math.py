"""TokenFlow propagation math (TokenFlow §3.2–3.3, Eq. 5): NN fields, blending weights, gathering."""
import math

import pytest
import torch

from tve.attention.tokenflow import (nearest_neighbour_field, pair_nearest_neighbour_field, propagate,
                                     propagation_weights)

DTYPES = [torch.float32, torch.bfloat16]


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def rolled_texture(texture, shifts):
    """Frames that are copies of one (h, w, C) texture rolled ``shift`` cells right: (frames, h·w, C)."""
    h, w, c = texture.shape
    return torch.stack([texture.roll(int(s), dims=1).reshape(h * w, c) for s in shifts])


def field_of_shift(h, w, shift):
    """Token (y, x) of a texture rolled by ``shift`` matches token (y, x - shift) of the texture rolled by 0."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (y * w + (x - shift) % w).reshape(-1)


def edit(frame_ids, keyframe_ids, source, keyframe_out, mode="paper", interval=4, chunk_size=None):
    local = torch.tensor([list(frame_ids).index(k) for k in keyframe_ids])
    pair, weights = propagation_weights(frame_ids, keyframe_ids, mode, interval)
    field = pair_nearest_neighbour_field(source, source[local], pair, chunk_size)
    return propagate(keyframe_out, field, pair, weights)


# ------------------------------------------------------------------------------------------ NN field
@pytest.mark.parametrize("dtype", DTYPES)
def test_field_of_a_frame_to_itself_is_identity_even_with_duplicate_tokens(dtype):
    tokens = torch.randn(3, 40, 8, generator=generator()).to(dtype)
    tokens[:, 7] = tokens[:, 3]                                   # exact duplicates inside each frame
    tokens[:, 20:25] = 0.0                                        # and a flat (zero) region
    field = nearest_neighbour_field(tokens, tokens)               # (3, 3, 40)
    for f in range(3):
        assert torch.equal(field[f, f], torch.arange(40))


@pytest.mark.parametrize("dtype", DTYPES)
def test_field_recovers_the_shift_of_a_rolled_texture(dtype):
    h, w = 5, 7
    texture = torch.randn(h, w, 16, generator=generator(1)).to(dtype)
    shifts = [0, 1, 2, 3, 4, 5]
    keyframe_shifts = [1, 4]
    field = nearest_neighbour_field(rolled_texture(texture, shifts), rolled_texture(texture, keyframe_shifts))
    assert field.dtype == torch.long and field.shape == (6, 2, h * w)
    for f, s in enumerate(shifts):
        for j, sk in enumerate(keyframe_shifts):
            assert torch.equal(field[f, j], field_of_shift(h, w, s - sk))


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_field_equals_unchunked_and_pair_field_is_the_full_field_at_pair(dtype):
    source = torch.randn(7, 30, 12, generator=generator(2)).to(dtype)
    keyframes = source[[1, 5]]
    full = nearest_neighbour_field(source, keyframes, chunk_size=7)
    for chunk_size in (1, 3, None):
        assert torch.equal(nearest_neighbour_field(source, keyframes, chunk_size), full)
    pair, _ = propagation_weights(range(7), [1, 5], "paper", 4)
    expected = full.gather(1, pair[:, :, None].expand(-1, -1, 30))
    for chunk_size in (1, 2, None):
        assert torch.equal(pair_nearest_neighbour_field(source, keyframes, pair, chunk_size), expected)


def test_bf16_field_is_the_float32_field_of_the_same_values():
    source = torch.randn(4, 50, 32, generator=generator(3)).to(torch.bfloat16)
    assert torch.equal(nearest_neighbour_field(source, source[[0, 3]]),
                       nearest_neighbour_field(source.float(), source[[0, 3]].float()))


# ------------------------------------------------------------------------------------------ propagation
@pytest.mark.parametrize("dtype", DTYPES)
def test_keyframe_gets_exactly_its_own_tokens_in_paper_mode(dtype):
    frame_ids, keyframe_ids = list(range(10)), [2, 6, 9]
    source = torch.randn(10, 24, 8, generator=generator(4)).to(dtype)
    source[:, 5] = source[:, 11]                                  # duplicate tokens must not break it
    keyframe_out = torch.randn(2, 3, 24, 8, generator=generator(5)).to(dtype)   # (chunks, K, T, C)
    out = edit(frame_ids, keyframe_ids, source, keyframe_out)
    assert out.shape == (2, 10, 24, 8) and out.dtype == dtype
    for j, k in enumerate(keyframe_ids):
        assert torch.equal(out[:, k], keyframe_out[:, j])


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rolled_texture_propagates_the_rolled_edited_texture(mode, dtype):
    """Both keyframes hold exact matches of the same edited texture, so any blend of them is that token."""
    h, w, frames = 4, 9, 16
    texture, edited = torch.randn(2, h, w, 6, generator=generator(6)).to(dtype)
    frame_ids = list(range(16, 16 + frames))                      # frames 16..31 of a longer video
    keyframe_ids = [19, 28]
    shifts = [f - 16 for f in frame_ids]
    source = rolled_texture(texture, shifts)
    keyframe_out = torch.stack([rolled_texture(edited, [k - 16 for k in keyframe_ids]),
                                rolled_texture(-edited, [k - 16 for k in keyframe_ids])])  # two chunks
    out = edit(frame_ids, keyframe_ids, source, keyframe_out, mode, interval=8)
    assert torch.equal(out[0], rolled_texture(edited, shifts))
    assert torch.equal(out[1], rolled_texture(-edited, shifts))


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_frames_give_identical_outputs(mode, dtype):
    frame = torch.randn(1, 20, 8, generator=generator(7)).to(dtype)
    frame[:, 3] = frame[:, 4]
    source = frame.expand(12, -1, -1).clone()
    keyframe_out = torch.randn(2, 1, 20, 8, generator=generator(8)).to(dtype).expand(-1, 3, -1, -1).clone()
    out = edit(range(12), [1, 6, 10], source, keyframe_out, mode, interval=4)
    assert torch.equal(out, keyframe_out[:, :1].expand(-1, 12, -1, -1))


def test_propagation_blends_the_two_gathered_keyframes_by_the_weights():
    keyframe_out = torch.randn(1, 2, 6, 3, generator=generator(9))
    field = torch.tensor([[[5, 4, 3, 2, 1, 0], [0, 0, 1, 1, 2, 2]]])          # (1 frame, 2, T)
    pair, weights = torch.tensor([[1, 0]]), torch.tensor([[0.25, 0.75]])
    out = propagate(keyframe_out, field, pair, weights)
    expected = 0.25 * keyframe_out[0, 1, field[0, 0]] + 0.75 * keyframe_out[0, 0, field[0, 1]]
    assert torch.allclose(out[0, 0], expected, atol=1e-6)


def test_official_propagation_is_the_reference_full_pass_block_written_out():
    """The non-pivotal pass of omerbt/TokenFlow's TokenFlow block, written out as that code does it, batch by batch
    (batch_size = the keyframe interval, one keyframe per batch): cosine similarity of the batch's tokens to the
    keyframe tokens of batch i and i-1 (``batch_cosine_sim``), argmax, gather each keyframe's output of every chunk
    (source, uncond, cond), blend with w1 = sigmoid(d2 / (d1 + d2)) of the distances to the two batch centres."""
    frames, batch_size = 12, 4
    g = generator(13)
    source = torch.randn(frames, 10, 8, generator=g)                      # (F, T, C) the source branch's tokens
    keyframe_ids = [1, 6, 8]                                              # one per batch of 4
    pivot = source[keyframe_ids]                                          # the keyframe pass's source tokens
    keyframe_out = torch.randn(3, len(keyframe_ids), 10, 8, generator=g)  # (chunks, K, T, C)
    expected = []
    for i, b in enumerate(range(0, frames, batch_size)):
        n = batch_size
        x = source[b:b + n].reshape(-1, 8)
        idxs = [i] + ([i - 1] if i > 0 else [])
        y = pivot[idxs].reshape(-1, 8)
        sim = (x / x.norm(dim=-1, keepdim=True)) @ (y / y.norm(dim=-1, keepdim=True)).T
        if len(idxs) == 2:
            sim1, sim2 = sim.chunk(2, dim=1)
            idx1, idx2 = sim1.argmax(-1), sim2.argmax(-1)                 # (n·T,)
            attn_1 = keyframe_out[:, i].reshape(3, -1, 8)[:, idx1].view(3, n, 10, 8)
            attn_2 = keyframe_out[:, i - 1].reshape(3, -1, 8)[:, idx2].view(3, n, 10, 8)
            s = torch.arange(n) + i * n
            d1, d2 = (s - (i * n + n // 2)).abs(), (s - ((i - 1) * n + n // 2)).abs()
            w1 = torch.sigmoid(d2 / (d1 + d2))[None, :, None, None]
            expected.append(w1 * attn_1 + (1 - w1) * attn_2)
        else:
            expected.append(keyframe_out[:, i].reshape(3, -1, 8)[:, sim.argmax(-1)].view(3, n, 10, 8))
    expected = torch.cat(expected, 1)                                       # (chunks, F, T, C)
    out = edit(range(frames), keyframe_ids, source, keyframe_out, "official", interval=batch_size)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_propagation_in_frame_slices_equals_the_per_frame_blend(dtype, monkeypatch):
    import tve.attention.tokenflow as tokenflow
    chunks, keyframes, tokens, channels, frames = 2, 3, 10, 4, 7
    keyframe_out = torch.randn(chunks, keyframes, tokens, channels, generator=generator(11)).to(dtype)
    field = torch.randint(0, tokens, (frames, 2, tokens), generator=generator(12))
    pair = torch.randint(0, keyframes, (frames, 2), generator=generator(13))
    w = torch.rand(frames, generator=generator(14))
    weights = torch.stack([1 - w, w], 1)
    whole = propagate(keyframe_out, field, pair, weights)
    monkeypatch.setattr(tokenflow, "PROPAGATION_BUDGET", 3 * chunks * tokens * channels * 2)   # 2 frames a slice
    sliced = propagate(keyframe_out, field, pair, weights)
    assert sliced.dtype == dtype and torch.equal(sliced, whole)
    for f in range(frames):
        a = keyframe_out[:, pair[f, 0], field[f, 0]].float()
        b = keyframe_out[:, pair[f, 1], field[f, 1]].float()
        assert torch.equal(sliced[:, f], torch.lerp(a, b, weights[f, 1]).to(dtype))


# ------------------------------------------------------------------------------------------ weights
def test_paper_weights_sum_to_one_are_linear_between_keyframes_and_ends_use_one_keyframe():
    frame_ids, keyframe_ids = list(range(20)), [3, 8, 15]
    pair, weights = propagation_weights(frame_ids, keyframe_ids, "paper", 4)
    assert pair.dtype == torch.long and pair.shape == (20, 2) and weights.shape == (20, 2)
    assert torch.allclose(weights.sum(1), torch.ones(20))
    for f in range(3):                                            # before the first keyframe
        assert pair[f].tolist() == [0, 0] and weights[f].tolist() == [1.0, 0.0]
    for f in range(15, 20):                                       # at or after the last keyframe
        assert pair[f].tolist() == [2, 2] and weights[f].tolist() == [1.0, 0.0]
    for j, k in enumerate(keyframe_ids):                          # a keyframe blends only itself
        assert pair[k].tolist() == [j, j] and weights[k].tolist() == [1.0, 0.0]
    for j, (k_prev, k_next) in enumerate(zip(keyframe_ids, keyframe_ids[1:])):
        inner = range(k_prev + 1, k_next)
        assert all(pair[f].tolist() == [j, j + 1] for f in inner)
        expected = torch.tensor([(k_next - f) / (k_next - k_prev) for f in inner])
        assert torch.allclose(weights[list(inner), 0], expected)
        line = torch.cat([torch.ones(1), weights[list(inner), 0], torch.zeros(1)])   # k_prev .. k_next
        assert torch.allclose(line.diff(n=2), torch.zeros(len(inner)), atol=1e-6)


def test_official_weights_reproduce_the_reference_formula_by_hand():
    """16 frames, interval 8 (windows 0..7, 8..15, centres 4 and 12), keyframes 3 and 12."""
    pair, weights = propagation_weights(range(16), [3, 12], "official", 8)

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    # window 0: its own keyframe only
    assert pair[0].tolist() == [0, 0] and weights[0].tolist() == [1.0, 0.0]
    assert pair[5].tolist() == [0, 0] and weights[5].tolist() == [1.0, 0.0]
    # window 1: own keyframe (index 1) and the previous window's (index 0); d_cur = |f - 12|, d_prev = |f - 4|
    expected = {8: sigmoid(4 / (4 + 4)), 10: sigmoid(6 / (2 + 6)), 12: sigmoid(8 / (0 + 8)), 15: sigmoid(11 / (3 + 11))}
    for f, w_cur in expected.items():
        assert pair[f].tolist() == [1, 0]
        assert weights[f].tolist() == pytest.approx([w_cur, 1 - w_cur], abs=1e-6)
    # so, unlike paper mode, keyframe 12 blends in the previous keyframe's tokens: sigmoid(1)
    assert weights[12, 0].item() == pytest.approx(0.7310586, abs=1e-6)


def test_official_current_keyframe_weight_is_a_sigmoid_in_half_to_0_731():
    for interval, frames in [(1, 5), (2, 9), (3, 10), (8, 40), (5, 23)]:
        keyframe_ids = [min(w * interval + (w * 7) % interval, frames - 1)
                        for w in range(math.ceil(frames / interval))]
        pair, weights = propagation_weights(range(frames), keyframe_ids, "official", interval)
        two = pair[:, 0] != pair[:, 1]
        assert torch.equal(two, torch.arange(frames) >= interval)
        assert (weights[two, 0] >= 0.5).all() and (weights[two, 0] <= 0.7311).all()
        assert torch.allclose(weights.sum(1), torch.ones(frames))


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_global_frame_ids_give_the_weights_of_the_same_frames_counted_from_zero(mode):
    local = propagation_weights(range(16), [3, 12], mode, 8)
    shifted = propagation_weights(range(16, 32), [19, 28], mode, 8)
    assert all(torch.equal(a, b) for a, b in zip(local, shifted))


def test_official_windows_are_windows_of_global_ids_like_the_keyframe_picker():
    """A context window starting mid-window (frames 4..19, interval 8) touches global windows 0, 1 and 2."""
    pair, weights = propagation_weights(range(4, 20), [5, 10, 18], "official", 8)
    assert all(pair[f - 4].tolist() == [0, 0] for f in range(4, 8))     # the call's first window
    assert all(pair[f - 4].tolist() == [1, 0] for f in range(8, 16))
    assert all(pair[f - 4].tolist() == [2, 1] for f in range(16, 20))
    # frame 19: centre of its window 20, of the previous 12 → d_cur = 1, d_prev = 7
    assert weights[19 - 4, 0].item() == pytest.approx(1 / (1 + math.exp(-(7 / (1 + 7)))), abs=1e-6)


def test_official_previous_window_must_be_the_adjacent_one():
    """Frames 0..3 and 12..15 (interval 4): window 3 has no frames of window 2 before it, so one keyframe."""
    pair, weights = propagation_weights([0, 1, 2, 3, 12, 13, 14, 15], [1, 13], "official", 4)
    assert pair[4:].tolist() == [[1, 1]] * 4 and weights[4:, 0].tolist() == [1.0] * 4


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("frame_ids, keyframe_ids, mode, interval, match", [
    (range(8), [5, 2], "paper", 4, "keyframe ids .* not strictly increasing"),
    (range(8), [2, 2], "paper", 4, "keyframe ids .* not strictly increasing"),
    (range(8), [2, 9], "paper", 4, "keyframe ids .* not among the frame ids"),
    (range(8), [], "paper", 4, "0 keyframes"),
    ([0, 1, 1, 2], [1], "paper", 4, "repeat a frame"),
    ([0.0, 1.0], [0], "paper", 4, "are not ids"),
    (range(8), [2], "sideways", 4, "mode"),
    (range(8), [2], "official", 0, "interval"),
    (range(8), [1, 2], "official", 4, "one keyframe"),           # two keyframes in window 0
    (range(8), [1], "official", 4, "one keyframe"),              # window 1 has none
])
def test_bad_weight_inputs_are_refused(frame_ids, keyframe_ids, mode, interval, match):
    with pytest.raises((ValueError, AssertionError), match=match):
        propagation_weights(frame_ids, keyframe_ids, mode, interval)


def test_bad_shapes_raise_a_clear_value_error():
    source = torch.randn(4, 10, 8)
    with pytest.raises(ValueError, match="source_keyframes"):
        nearest_neighbour_field(source, torch.randn(2, 10, 6))
    with pytest.raises(ValueError, match="source_frames"):
        nearest_neighbour_field(source[0], source[:1])
    with pytest.raises(ValueError, match="chunk_size"):
        nearest_neighbour_field(source, source[:2], chunk_size=0)
    with pytest.raises(ValueError, match="pair"):
        pair_nearest_neighbour_field(source, source[:2], torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="pair"):
        pair_nearest_neighbour_field(source, source[:2], torch.full((4, 2), 2))
    keyframe_out, field = torch.randn(1, 2, 10, 8), torch.zeros(4, 2, 10, dtype=torch.long)
    pair, weights = torch.zeros(4, 2, dtype=torch.long), torch.tensor([[1.0, 0.0]] * 4)
    with pytest.raises(ValueError, match="keyframe_out"):
        propagate(keyframe_out[0], field, pair, weights)
    with pytest.raises(ValueError, match="field"):
        propagate(keyframe_out, field[:, :, :9], pair, weights)
    with pytest.raises(ValueError, match="pair"):
        propagate(keyframe_out, field, pair[:3], weights)
    with pytest.raises(ValueError, match="weights"):
        propagate(keyframe_out, field, pair, weights[:, :1])
    with pytest.raises(ValueError, match="summing to 1"):
        propagate(keyframe_out, field, pair, weights * 0.5)
