"""TVE_ApplyTokenFlow on the real host: passes, keyframe draws, equivalence with extended attention + PnP."""
import pytest
import torch

from tve.tests.hosts import (FAMILIES, cond_chunks_split, context_window_calls, make_conditioning, make_latent,
                             make_tiny_model, with_context_windows)

pytestmark = pytest.mark.real_host


class PassRecorder:
    """DIFFUSION_MODEL wrapper: per UNet call, the pass, its σ and the global frame ids it ran on."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        from tve.engine.run import call_frame_ids, current_pass
        frames = x.shape[0] // len(transformer_options["cond_or_uncond"])
        self.calls.append((current_pass(transformer_options).value, float(transformer_options["sigmas"][0]),
                           call_frame_ids(frames, transformer_options)))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def inverted(family="sd15", frames=16, steps=3, size=8):
    from tve.engine.inversion import invert
    model = make_tiny_model(family)
    cond = make_conditioning(family, seed=1)
    x_T, inversion = invert(model, make_latent(frames, size, size)["samples"], cond, steps, "ddim_uniform")
    return model, cond, x_T, inversion


def edit(model, x_T, sigmas, family="sd15", cfg=4.0):
    from tve.engine import host
    return host.sample(model, torch.zeros_like(x_T), cfg, "euler", sigmas, make_conditioning(family, 5),
                       make_conditioning(family, 6), x_T)


def tokenflow(model, inversion, interval=4, seed=7, mode="paper", attn=0.5, conv=0.8):
    from tve.nodes.edit_nodes import ApplyTokenFlow
    return ApplyTokenFlow().apply(model, inversion, interval, seed, mode, attn, conv)[0]


def recorded(model):
    from tve.engine import host
    spy = PassRecorder()
    host.add_wrapper(model, host.DIFFUSION_MODEL, "test_spy", spy)
    return spy


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_edit_runs_16_frames_with_source_keyframe_and_full_passes(family):
    model, cond, x_T, inversion = inverted(family)
    patched = tokenflow(model, inversion)
    spy = recorded(patched)
    out = edit(patched, x_T, inversion.sigmas, family)
    assert out.shape == x_T.shape and torch.isfinite(out).all()
    passes = [c[0] for c in spy.calls]
    assert passes == ["source", "keyframes", "edit"] * 3
    for name, _, ids in spy.calls:
        if name == "keyframes":
            assert len(ids) == 4 and [i // 4 for i in ids] == [0, 1, 2, 3]


def test_keyframes_change_between_steps_and_repeat_with_the_same_seed():
    model, cond, x_T, inversion = inverted(steps=6)

    def draws(seed):
        patched = tokenflow(model, inversion, seed=seed)
        spy = recorded(patched)
        out = edit(patched, x_T, inversion.sigmas)
        return [ids for name, _, ids in spy.calls if name == "keyframes"], out

    first, out1 = draws(7)
    again, out2 = draws(7)
    other, _ = draws(8)
    assert first == again and torch.equal(out1, out2)
    assert len(set(first)) > 1
    assert other != first


def test_interval_one_equals_keyframe_attention_plus_injection():
    from tve.nodes.edit_nodes import ApplyCrossFrameAttention
    from tve.engine.injection import apply_feature_injection
    model, cond, x_T, inversion = inverted(frames=4, steps=3)
    via_tokenflow = edit(tokenflow(model, inversion, interval=1), x_T, inversion.sigmas)
    extended = ApplyCrossFrameAttention().apply(model, "keyframes", 1, 0, False, 2, 7, "all", 0.0, 1.0)[0]
    reference = apply_feature_injection(extended, inversion, 0.5, 0.8, "tokenflow", "sigma-matched")
    expected = edit(reference, x_T, inversion.sigmas)
    assert torch.allclose(via_tokenflow, expected, atol=1e-4 * expected.abs().max())


def test_cond_and_uncond_split_by_memory_give_the_same_edit():
    model, cond, x_T, inversion = inverted(frames=8, steps=3)
    patched = tokenflow(model, inversion)
    together = edit(patched, x_T, inversion.sigmas)
    split = edit(cond_chunks_split(patched), x_T, inversion.sigmas)
    assert torch.allclose(together, split, atol=1e-4 * together.abs().max())


def test_official_propagation_runs_and_differs_from_paper():
    model, cond, x_T, inversion = inverted(frames=16, steps=2)
    paper = edit(tokenflow(model, inversion, mode="paper"), x_T, inversion.sigmas)
    official = edit(tokenflow(model, inversion, mode="official"), x_T, inversion.sigmas)
    assert torch.isfinite(official).all() and not torch.allclose(paper, official)


def test_core_context_windows_draw_keyframes_inside_each_window():
    model, cond, x_T, inversion = inverted(frames=16, steps=2)
    patched = tokenflow(model, inversion, interval=4)
    windowed = with_context_windows(patched, 8)
    spy = recorded(windowed)
    out = edit(windowed, x_T, inversion.sigmas)
    assert torch.isfinite(out).all()
    windows = context_window_calls(windowed, 16)                      # with core 0.33+'s causal frame first
    edit_calls = [ids for name, _, ids in spy.calls if name == "edit"]
    keyframe_calls = [ids for name, _, ids in spy.calls if name == "keyframes"]
    assert edit_calls == windows * 2                                  # 2 steps, every window's frames
    assert len(keyframe_calls) == 2 * len(windows)
    for ids, window in zip(keyframe_calls, windows * 2):
        # one keyframe per interval of global ids among the frames the call holds, the causal frame included
        assert set(ids) <= set(window) and sorted(i // 4 for i in ids) == sorted({i // 4 for i in window})


def test_bad_inputs_are_refused_before_sampling():
    model, cond, x_T, inversion = inverted(frames=4, steps=2)
    with pytest.raises(ValueError, match="keyframe_interval"):
        tokenflow(model, inversion, interval=0)
    with pytest.raises(ValueError, match="propagation"):
        tokenflow(model, inversion, mode="sideways")
    with pytest.raises(ValueError, match="inversion"):
        tokenflow(make_tiny_model("sdxl"), inversion)
