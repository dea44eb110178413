"""Core Context Windows (Manual) on every TVE feature, as an artist adds the node: each of its calls holds a window of
the video's frames (0.33+ puts the frame before the window in front, ``causal_window_fix``, and drops its output
afterwards), and every TVE pass inside a call reads exactly the frames that call holds, by global id."""
import pytest
import torch

from tve.tests.hosts import context_window_calls, make_conditioning, make_latent, make_tiny_model, with_context_windows
from tve.tests.test_frame_windows import cross_frame, inverted, pnp, tokenflow, windows
from tve.tests.test_tokenflow_node import edit, recorded

pytestmark = pytest.mark.real_host

FRAMES, LENGTH = 8, 4


def core_windows(model):
    return with_context_windows(model, LENGTH, overlap=1)


def passes_by_call(spy, calls):
    """The recorded (pass, global ids) grouped by the core window call (edit pass) they ran in."""
    groups, current = [], []
    for name, _, ids in spy.calls:
        current.append((name, ids))
        if name == "edit":
            groups.append(current)
            current = []
    assert not current, f"passes after the last edit call: {current}"
    return groups


def assert_every_pass_reads_its_calls_frames(spy, calls, steps):
    groups = passes_by_call(spy, calls)
    assert [group[-1][1] for group in groups] == calls * steps      # the sampler's call: the window, causal frame too
    for group in groups:
        held = set(group[-1][1])
        for name, ids in group:
            assert set(ids) <= held, f"{name} pass read frames {ids} outside its call {sorted(held)}"


@pytest.mark.parametrize("mode", ["dense", "fine_coarse"])       # keyframes: drawn on global ids, so a call
#                                                                    renumbered as a whole video draws others
def test_cross_frame_attention_inside_core_windows_equals_each_windows_call_on_its_own(mode):
    model = cross_frame(make_tiny_model("sd15"), mode, interval=2)
    windowed = core_windows(model)
    calls = context_window_calls(windowed, FRAMES)
    x = make_latent(FRAMES, 8, 8)["samples"]
    from tve.engine import host
    sigmas = host.sigma_grid(model, "normal", 1)                     # one step: every call starts from the same x
    spy = recorded(windowed)
    out = edit(windowed, x, sigmas)
    assert_every_pass_reads_its_calls_frames(spy, calls, 1)
    # core blends overlapping windows: recompute them from each call alone with core's own fuse, here by running
    # each call as a whole video and comparing the frames only one window holds
    owners = {}
    for ids in calls:
        own = ids[len(ids) - LENGTH:]                                  # the window's own frames (no causal frame)
        for f in own:
            owners.setdefault(f, []).append(ids)
    for ids in calls:
        alone = edit(model, x[list(ids)], sigmas)
        for pos, f in enumerate(ids):
            if owners.get(f) == [ids]:                                # held as its own by this call only
                assert torch.allclose(out[f], alone[pos], atol=1e-4 * float(alone.abs().max())), (mode, f)


def test_pnp_injection_inside_core_windows_reads_the_source_of_each_calls_frames():
    model = make_tiny_model("sd15")
    x_T, inversion = inverted(model, FRAMES)
    windowed = core_windows(pnp(model, inversion))
    spy = recorded(windowed)
    out = edit(windowed, x_T, inversion.sigmas)
    assert torch.isfinite(out).all()
    calls = context_window_calls(windowed, FRAMES)
    assert_every_pass_reads_its_calls_frames(spy, calls, 2)
    groups = passes_by_call(spy, calls)
    for group in groups[:len(calls)]:                                 # step 0 injects; step 1 is past both ends
        assert [name for name, _ in group] == ["source", "edit"] and group[0][1] == group[1][1]
    assert all([name for name, _ in group] == ["edit"] for group in groups[len(calls):])


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_tokenflow_inside_core_windows_draws_keyframes_and_propagates_within_each_call(mode):
    model = make_tiny_model("sd15")
    x_T, inversion = inverted(model, FRAMES)
    windowed = core_windows(tokenflow(model, inversion, 2, mode))
    spy = recorded(windowed)
    out = edit(windowed, x_T, inversion.sigmas)
    assert torch.isfinite(out).all()
    calls = context_window_calls(windowed, FRAMES)
    assert_every_pass_reads_its_calls_frames(spy, calls, 2)
    for group in passes_by_call(spy, calls):
        (keyframes,) = [ids for name, ids in group if name == "keyframes"]
        held = group[-1][1]
        assert sorted(i // 2 for i in keyframes) == sorted({i // 2 for i in held})   # one per interval it holds


def test_flatten_inside_core_windows_attends_along_the_trajectories_of_each_calls_frames():
    from tve.nodes.edit_nodes import ApplyFLATTEN
    from tve.tests.test_flatten_node import trajectories_for
    model = ApplyFLATTEN.execute(make_tiny_model("sd15"), trajectories_for(FRAMES), "all", "dense_output").result[0]
    x_T, inversion = inverted(model, FRAMES)
    windowed = core_windows(pnp(model, inversion))
    spy = recorded(windowed)
    out = edit(windowed, x_T, inversion.sigmas)
    assert torch.isfinite(out).all()
    assert_every_pass_reads_its_calls_frames(spy, context_window_calls(windowed, FRAMES), 2)


def test_tve_frame_windows_split_each_core_windows_call():
    model = windows(cross_frame(make_tiny_model("sd15"), "dense"), 2, 0)
    windowed = core_windows(model)
    spy = recorded(windowed)
    from tve.engine import host
    edit(windowed, make_latent(FRAMES, 8, 8)["samples"], host.sigma_grid(model, "normal", 1))
    calls = context_window_calls(windowed, FRAMES)
    edits = [ids for name, _, ids in spy.calls if name == "edit"]
    assert max(len(ids) for ids in edits) == 2
    # the TVE windows of each core call cover exactly that call's frames
    covered, i = [], 0
    for ids in calls:
        seen = set()
        while seen != set(ids):
            assert set(edits[i]) <= set(ids)
            seen |= set(edits[i])
            i += 1
        covered.append(sorted(seen))
    assert i == len(edits) and covered == [sorted(ids) for ids in calls]


def test_an_anchor_frame_a_core_window_does_not_hold_is_refused_naming_the_input():
    model = core_windows(cross_frame(make_tiny_model("sd15"), "anchor", anchor=0))
    from tve.engine import host
    with pytest.raises(ValueError, match="anchor_frame: frame 0 is not among the frames of this call"):
        edit(model, make_latent(FRAMES, 8, 8)["samples"], host.sigma_grid(model, "normal", 1))
