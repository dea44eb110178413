"""TokenFlow with ControlNet and T2I-Adapter (core ControlNetApplyAdvanced, a stack of both): the hints follow the
frames of the keyframe pass and of every context window. Real host; tiny ControlNet and T2I-Adapter built from
comfy's own classes."""
import pytest
import torch

from tve.tests.hosts import (context_window_calls, make_conditioning, make_latent, make_tiny_controlnet,
                             make_tiny_model, make_tiny_t2i_adapter, with_context_windows)

pytestmark = pytest.mark.real_host

FRAMES, SIZE, STEPS, INTERVAL = 8, 8, 2, 4
# SD1.5's three input blocks per level, which a T2I-Adapter needs
LAYOUT = dict(num_res_blocks=[2, 2], transformer_depth=[1, 1, 1, 1], transformer_depth_output=[1] * 6)


class ControlRecorder:
    """Per UNet call: the pass, the global frame ids and a copy of the control residuals it was given."""

    def __init__(self, model):
        from tve.engine import host
        self.calls = []
        host.add_wrapper(model, host.DIFFUSION_MODEL, "test_spy", self)

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        from tve.engine.run import call_frame_ids, current_pass
        frames = x.shape[0] // len(transformer_options["cond_or_uncond"])
        copied = None if control is None else {
            name: [None if t is None else t.detach().clone() for t in tensors] for name, tensors in control.items()}
        self.calls.append((current_pass(transformer_options).value, call_frame_ids(frames, transformer_options),
                           len(transformer_options["cond_or_uncond"]), copied))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


@pytest.fixture(scope="module")
def setup():
    from tve.engine.inversion import invert
    model = make_tiny_model("sd15", **LAYOUT)
    cond = make_conditioning("sd15", seed=1)
    x_T, inversion = invert(model, make_latent(FRAMES, SIZE, SIZE)["samples"], cond, STEPS, "ddim_uniform")
    hints = torch.rand(FRAMES, SIZE * 8, SIZE * 8, 3, generator=torch.Generator().manual_seed(5))
    return model, x_T, inversion, hints


def controlled(hints, controls):
    """Edit conditioning with ``controls`` stacked by core ControlNetApplyAdvanced, each with the per-frame hints."""
    from tve.engine import host
    positive, negative = make_conditioning("sd15", 5), make_conditioning("sd15", 6)
    for control in controls:
        positive, negative = host.run_core_node("ControlNetApplyAdvanced", positive=positive, negative=negative,
                                                control_net=control, image=hints, strength=1.0, start_percent=0.0,
                                                end_percent=1.0)
    return positive, negative


def edit(model, x_T, sigmas, positive, negative):
    from tve.engine import host
    return host.sample(model, torch.zeros_like(x_T), 3.0, "euler", sigmas, positive, negative, x_T)


def rows(tensor, chunks, frame_positions):
    """The rows of ``frame_positions`` in every cond chunk of a (chunks·F, ...) batch."""
    per_chunk = tensor.reshape(chunks, -1, *tensor.shape[1:])
    return per_chunk[:, list(frame_positions)].reshape(-1, *tensor.shape[1:])


def assert_keyframe_residuals_are_their_own_frames(recorder):
    steps = 0
    for i, (name, ids, chunks, control) in enumerate(recorder.calls):
        if name != "keyframes":
            continue
        edit_name, edit_ids, edit_chunks, edit_control = recorder.calls[i + 1]
        assert edit_name == "edit" and control is not None and edit_chunks == chunks
        compared = 0
        for part, tensors in control.items():
            for t, full in zip(tensors, edit_control[part]):
                if t is None:
                    continue
                expected = rows(full, chunks, [edit_ids.index(k) for k in ids])
                assert torch.allclose(t, expected, atol=1e-4 * (1 + expected.abs().max())), (part, ids)
                wrong = rows(full, chunks, range(len(ids)))             # what core's broadcast would have given
                assert not torch.allclose(t, wrong, atol=1e-3), (part, ids)
                compared += 1
        assert compared
        steps += 1
    assert steps == STEPS


@pytest.mark.parametrize("stack", ["controlnet", "t2i_adapter", "controlnet+t2i_adapter"])
def test_keyframe_pass_sees_the_control_residuals_of_the_keyframes_own_hints(setup, stack):
    from tve.engine.tokenflow import apply_tokenflow
    model, x_T, inversion, hints = setup
    controls = {"controlnet": [make_tiny_controlnet(**LAYOUT)], "t2i_adapter": [make_tiny_t2i_adapter()],
                "controlnet+t2i_adapter": [make_tiny_controlnet(**LAYOUT), make_tiny_t2i_adapter()]}[stack]
    patched = apply_tokenflow(model, inversion, INTERVAL, 7, "paper", 0.5, 0.8)
    recorder = ControlRecorder(patched)
    out = edit(patched, x_T, inversion.sigmas, *controlled(hints, controls))
    assert torch.isfinite(out).all()
    assert [c[0] for c in recorder.calls] == ["source", "keyframes", "edit"] * STEPS
    assert all(c[3] is None for c in recorder.calls if c[0] == "source")    # the source pass is not controlled
    assert_keyframe_residuals_are_their_own_frames(recorder)


def test_context_windows_give_each_window_its_own_hints(setup):
    from tve.engine.tokenflow import apply_tokenflow
    model, x_T, inversion, hints = setup
    positive, negative = controlled(hints, [make_tiny_controlnet(**LAYOUT)])
    plain = apply_tokenflow(model, inversion, INTERVAL, 7, "paper", 0.5, 0.8)
    whole = ControlRecorder(plain)
    edit(plain, x_T, inversion.sigmas[:2], positive, negative)
    windowed = with_context_windows(plain, 4)
    per_window = ControlRecorder(windowed)
    edit(windowed, x_T, inversion.sigmas[:2], positive, negative)
    full = next(c for c in whole.calls if c[0] == "edit")
    windows = [c for c in per_window.calls if c[0] == "edit"]
    assert [c[1] for c in windows] == context_window_calls(windowed, 8)
    for _, ids, chunks, control in windows:
        for t, reference in zip(control["output"], full[3]["output"]):
            if t is not None:
                # the keyframe draw differs per window, so only the ControlNet input rows can be compared: x is
                # the same, the hints must be the window's own frames
                assert torch.allclose(t, rows(reference, chunks, ids), atol=1e-4 * (1 + reference.abs().max()))


def test_a_hint_batch_that_is_not_one_image_per_frame_is_refused_before_any_step(setup):
    from tve.engine.tokenflow import apply_tokenflow
    model, x_T, inversion, hints = setup
    patched = apply_tokenflow(model, inversion, INTERVAL, 7, "paper", 0.5, 0.8)
    recorder = ControlRecorder(patched)
    with pytest.raises(ValueError, match="control: .* 3 hint images but the video has 8 frames"):
        edit(patched, x_T, inversion.sigmas, *controlled(hints[:3], [make_tiny_controlnet(**LAYOUT)]))
    assert recorder.calls == []
