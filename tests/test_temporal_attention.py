"""Temporal attention (Tune-A-Video's LayerNorm kind and EI²'s STAM) against a per-token reference, Instance
Centering, the identity at initialisation and the variance bound of the normalised mappings."""
import pytest
import torch

from tve.attention.temporal import (CONVERGED_ITERATIONS, KINDS, TemporalAttention, instance_centering,
                                    power_iteration, spectral_normalized, temporal_attention)

DTYPES = [torch.float32, torch.bfloat16]
CHANNELS, HEADS, TOKENS = 8, 2, 6


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def trained(kind, seed=0):
    """A module with every parameter random (as after tuning): no zero output left."""
    module = TemporalAttention(CHANNELS, HEADS, kind, generator(seed))
    g = generator(seed + 100)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.ndim == 0 else 0.0))
    module.refresh_spectral_norms(CONVERGED_ITERATIONS)
    return module


def reference(x, chunks, module):
    """Loop over chunks and tokens: plain multi-head softmax attention along the frames of one token."""
    w = module.weights()
    frames = x.shape[0] // chunks
    out = x.clone()
    d = CHANNELS // HEADS
    for c in range(chunks):
        for t in range(x.shape[1]):
            seq = x[c * frames:(c + 1) * frames, t].double()                          # (F, C)
            if w.kind == "stam":
                h = seq - seq.mean(0)
            else:
                h = torch.nn.functional.layer_norm(seq, (CHANNELS,), w.norm_weight.double(), w.norm_bias.double())
            q, k, v = (h @ m.double().T for m in (w.q, w.k, w.v))
            heads = []
            for i in range(HEADS):
                s = slice(i * d, (i + 1) * d)
                a = torch.softmax(q[:, s] @ k[:, s].T / d ** 0.5, -1)
                heads.append(a @ v[:, s])
            mixed = torch.cat(heads, 1) @ w.out.double().T
            if w.out_bias is not None:
                mixed = mixed + w.out_bias.double()
            out[c * frames:(c + 1) * frames, t] = (seq + mixed).to(x.dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_untrained_temporal_attention_is_exactly_the_identity(kind, dtype):
    module = TemporalAttention(CHANNELS, HEADS, kind, generator())
    x = torch.randn(2 * 5, TOKENS, CHANNELS, generator=generator(1)).to(dtype)
    weights = module.weights().to(x.device, dtype)
    assert torch.equal(temporal_attention(x, 2, weights), x)


@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_temporal_attention_matches_a_per_token_reference(kind, chunks):
    module = trained(kind)
    x = torch.randn(chunks * 4, TOKENS, CHANNELS, generator=generator(2))
    with torch.no_grad():
        assert torch.allclose(module(x, chunks), reference(x, chunks, module), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_temporal_attention_is_close_to_fp32(kind):
    module = trained(kind)
    x = torch.randn(2 * 4, TOKENS, CHANNELS, generator=generator(3))
    with torch.no_grad():
        full = module(x, 2)
        half = temporal_attention(x.bfloat16(), 2, module.weights().to(x.device, torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 5e-2 * full.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_frames_of_other_chunks_and_other_tokens_do_not_leak_in(kind):
    module = trained(kind)
    x = torch.randn(2 * 4, TOKENS, CHANNELS, generator=generator(4))
    y = x.clone()
    y[4:] = torch.randn(y[4:].shape, generator=generator(11))        # the second chunk
    y[:4, 1:] *= 2.0                                                    # other tokens of the first chunk
    with torch.no_grad():
        a, b = module(x, 2), module(y, 2)
    assert torch.equal(a[:4, 0], b[:4, 0])
    assert not torch.allclose(a[:4, 1:], b[:4, 1:], atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_reordering_the_frames_reorders_the_output(kind):
    module = trained(kind)
    x = torch.randn(5, TOKENS, CHANNELS, generator=generator(5))
    order = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        assert torch.allclose(module(x[order], 1), module(x, 1)[order], atol=1e-5)


def test_instance_centering_removes_the_mean_over_frames_and_keeps_the_scale():
    seq = torch.randn(7, 5, CHANNELS, generator=generator(6)) * 4.0 + 9.0
    centred = instance_centering(seq)
    assert centred.mean(1).abs().max() < 1e-5
    shift = seq - centred                                                          # a constant per instance
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-5)
    assert torch.allclose(centred.std(1), seq.std(1), atol=1e-5)                  # not rescaled, unlike LayerNorm
    assert torch.allclose(instance_centering(centred), centred, atol=1e-6)


def test_instance_centering_of_one_frame_is_zero_so_stam_leaves_a_single_frame_unchanged():
    module = trained("stam")
    x = torch.randn(1, TOKENS, CHANNELS, generator=generator(7))
    with torch.no_grad():
        assert torch.equal(module(x, 1), x)


def test_stam_mappings_have_spectral_norm_one_and_bound_the_residual():
    module = trained("stam")
    w = module.weights()
    for m in (w.q, w.k, w.v):
        assert torch.linalg.matrix_norm(m, ord=2).item() == pytest.approx(1.0, abs=1e-3)
    x = torch.randn(6, TOKENS, CHANNELS, generator=generator(8)) * 10.0
    with torch.no_grad():
        residual = module(x, 1) - x                                                # (F, T, C)
    centred = x - x.mean(0, keepdim=True)
    bound = module.gain.abs() * centred.pow(2).sum((0, 2)).sqrt()                 # |g|·sqrt(Σ_f ‖IC(x)_f‖²)
    assert (residual.norm(dim=2) <= bound[None] * (1 + 1e-3)).all()


def test_layernorm_kind_rescales_small_features_which_stam_does_not():
    """The covariate shift of EI² §3.1 in one line: LayerNorm lifts a small-variance input to unit scale before
    the temporal mapping, so its residual does not shrink with the input; STAM's does."""
    x = torch.randn(6, TOKENS, CHANNELS, generator=generator(9))
    ratios = {}
    for kind in KINDS:
        module = trained(kind)
        with torch.no_grad():
            big, small = module(x, 1) - x, module(x * 1e-3, 1) - x * 1e-3
        ratios[kind] = small.norm() / big.norm()
    assert ratios["stam"] < 1e-2
    assert ratios["layernorm"] > 0.3


def test_power_iteration_finds_the_largest_singular_value_and_normalisation_is_differentiable():
    w = torch.randn(CHANNELS, CHANNELS, generator=generator(10), requires_grad=True)
    u, v = power_iteration(w, torch.nn.functional.normalize(torch.ones(CHANNELS), dim=0), CONVERGED_ITERATIONS)
    assert torch.dot(u, w.detach() @ v).item() == pytest.approx(torch.linalg.svdvals(w.detach())[0].item(), rel=1e-4)
    spectral_normalized(w, u, v).sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_one_power_iteration_per_step_tracks_a_slowly_changing_weight():
    module = trained("stam")
    with torch.no_grad():
        for _ in range(20):
            module.q.add_(0.01 * torch.randn(module.q.shape, generator=generator(12)))
            module.refresh_spectral_norms(1)
    assert torch.linalg.matrix_norm(module.weights().q, ord=2).item() == pytest.approx(1.0, abs=2e-2)


def test_bad_kind_heads_and_channels_are_clear_errors():
    with pytest.raises(ValueError, match="kind"):
        TemporalAttention(CHANNELS, HEADS, "groupnorm")
    with pytest.raises(ValueError, match="heads"):
        TemporalAttention(CHANNELS, 3, "stam")
    module = TemporalAttention(CHANNELS, HEADS, "stam")
    with pytest.raises(ValueError, match="channels"):
        module(torch.zeros(4, TOKENS, 2 * CHANNELS), 1)
    with pytest.raises(ValueError, match="chunks"):
        module(torch.zeros(5, TOKENS, CHANNELS), 2)
