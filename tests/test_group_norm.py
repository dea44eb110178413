"""Frame-pooled GroupNorm (FLATTEN's inflated UNet): GroupNorm of the (chunks, C, F, h, w) video tensor, against
torch's GroupNorm on that tensor and the mean/variance written out by hand."""
import pytest
import torch
import torch.nn.functional as F

from tve.attention.group_norm import frame_pooled_group_norm


def video_group_norm(x: torch.Tensor, frames: int, groups: int, weight, bias, eps: float) -> torch.Tensor:
    """torch's GroupNorm of the 5-D (chunks, C, F, h, w) tensor, float64, back in the (chunks·F, C, h, w) layout."""
    chunks = x.shape[0] // frames
    video = x.double().unflatten(0, (chunks, frames)).transpose(1, 2)          # (chunks, C, F, h, w)
    out = F.group_norm(video, groups, None if weight is None else weight.double(),
                       None if bias is None else bias.double(), eps)
    return out.transpose(1, 2).flatten(0, 1)


def by_hand(x: torch.Tensor, frames: int, groups: int, weight, bias, eps: float) -> torch.Tensor:
    """Per chunk and group: the mean and biased variance of every value of its frames, channels and pixels."""
    x = x.double()
    out = torch.empty_like(x)
    per_group = x.shape[1] // groups
    for start in range(0, x.shape[0], frames):
        for g in range(groups):
            rows, chans = slice(start, start + frames), slice(g * per_group, (g + 1) * per_group)
            values = x[rows, chans]
            mean = values.sum() / values.numel()
            var = ((values - mean) ** 2).sum() / values.numel()
            out[rows, chans] = (values - mean) / (var + eps).sqrt()
    if weight is not None:
        out = out * weight.double().view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.double().view(1, -1, 1, 1)
    return out


def sample(chunks: int, frames: int, channels: int = 8, h: int = 3, w: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(chunks * frames, channels, h, w, generator=g) * 2 + torch.randn(chunks * frames, channels, 1, 1,
                                                                                    generator=g)
    weight = 1 + 0.3 * torch.randn(channels, generator=g)
    bias = 0.2 * torch.randn(channels, generator=g)
    return x, weight, bias


@pytest.mark.parametrize("chunks, frames, groups", [(2, 5, 4), (1, 3, 8), (3, 2, 1), (2, 1, 2)])
def test_equals_group_norm_of_the_video_tensor_and_the_formula(chunks, frames, groups):
    x, weight, bias = sample(chunks, frames)
    out = frame_pooled_group_norm(x, frames, groups, weight, bias, eps=1e-5)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.allclose(out.double(), video_group_norm(x, frames, groups, weight, bias, 1e-5), atol=1e-5)
    assert torch.allclose(out.double(), by_hand(x, frames, groups, weight, bias, 1e-5), atol=1e-5)


def test_without_affine_parameters_and_with_other_eps():
    x, _, _ = sample(2, 4)
    out = frame_pooled_group_norm(x, 4, 2, eps=1e-6)
    assert torch.allclose(out.double(), by_hand(x, 4, 2, None, None, 1e-6), atol=1e-5)


def test_one_frame_is_plain_per_frame_group_norm():
    x, weight, bias = sample(6, 1)
    expected = torch.nn.GroupNorm(4, 8, eps=1e-5)
    with torch.no_grad():
        expected.weight.copy_(weight)
        expected.bias.copy_(bias)
        assert torch.allclose(frame_pooled_group_norm(x, 1, 4, weight, bias, 1e-5), expected(x), atol=1e-5)


def test_frames_are_pooled_so_a_per_frame_brightness_survives():
    """Frame f = a shared pattern + f: per-frame GroupNorm removes the offsets, the pooled one keeps them (as the
    video's statistics): frame means rise by one pooled standard deviation's worth per unit of offset."""
    frames = 4
    pattern = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    x = pattern + torch.arange(frames, dtype=torch.float32).view(frames, 1, 1, 1)
    pooled = frame_pooled_group_norm(x, frames, 4)
    per_frame = frame_pooled_group_norm(x, 1, 4)
    assert torch.allclose(per_frame, per_frame[:1].expand_as(per_frame), atol=1e-5)
    step = pooled.mean(dim=(1, 2, 3)).diff()                                   # (F-1,) frame-to-frame mean change
    assert (step > 0.1).all() and torch.allclose(step, step[:1].expand_as(step), atol=1e-4)


def test_chunks_are_normalised_apart():
    x, weight, bias = sample(2, 3)
    out = frame_pooled_group_norm(x, 3, 4, weight, bias)
    changed = x.clone()
    changed[3:] = changed[3:] * 10 + 50                                        # only the second chunk
    again = frame_pooled_group_norm(changed, 3, 4, weight, bias)
    assert torch.equal(out[:3], again[:3])
    assert torch.allclose(out[:3], frame_pooled_group_norm(x[:3], 3, 4, weight, bias), atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_inputs_get_float32_statistics_and_keep_their_dtype(dtype, tol):
    """Values 1000 ± 1: a half-precision sum or square would lose the variance; float32 statistics keep it."""
    x, weight, bias = sample(2, 4)
    x = (1000 + x / 4).to(dtype)
    out = frame_pooled_group_norm(x, 4, 4, weight.to(dtype), bias.to(dtype))
    assert out.dtype == dtype
    expected = by_hand(x, 4, 4, weight.to(dtype), bias.to(dtype), 1e-5)
    assert torch.allclose(out.double(), expected, atol=tol * expected.abs().max())


def test_bad_shapes_name_the_input():
    x, weight, _ = sample(2, 3)
    with pytest.raises(ValueError, match="frames"):
        frame_pooled_group_norm(x, 4, 4)
    with pytest.raises(ValueError, match="groups"):
        frame_pooled_group_norm(x, 3, 3)
    with pytest.raises(ValueError, match="weight"):
        frame_pooled_group_norm(x, 3, 4, weight[:4])
    with pytest.raises(ValueError, match="x"):
        frame_pooled_group_norm(torch.zeros(6), 3, 1)
