"""TVE_FrameWindows on the real host: the passes that ran hold at most a window of frames, per-frame work is
unchanged by batching, shared frames (anchor, keyframes) are in every window, TokenFlow batches equal its single
pass where the keyframe groups see the same keyframes, and bad settings are refused."""
import pytest
import torch

from tve.tests.hosts import make_conditioning, make_latent, make_tiny_model
from tve.tests.test_tokenflow_node import edit, recorded

pytestmark = pytest.mark.real_host


def windows(model, size, overlap=0):
    from tve.nodes.edit_nodes import ApplyFrameWindows
    return ApplyFrameWindows.execute(model, size, overlap).result[0]


def inverted(model, frames, steps=2, size=8):
    from tve.engine.inversion import invert
    return invert(model, make_latent(frames, size, size)["samples"], make_conditioning("sd15", seed=1), steps,
                  "ddim_uniform")


def pnp(model, inversion):
    from tve.engine.injection import apply_feature_injection
    return apply_feature_injection(model, inversion, 0.5, 0.8, "tokenflow", "sigma-matched")


def cross_frame(model, mode, interval=4, anchor=0):
    from tve.nodes.edit_nodes import ApplyCrossFrameAttention
    return ApplyCrossFrameAttention.execute(model, mode, interval, anchor, False, 2, 7, "all", 0.0, 1.0).result[0]


def tokenflow(model, inversion, interval, mode="paper"):
    from tve.nodes.edit_nodes import ApplyTokenFlow
    return ApplyTokenFlow.execute(model, inversion, interval, 7, mode, 0.5, 0.8).result[0]


def test_per_frame_inversion_and_pnp_edit_in_batches_equal_one_batch_and_no_pass_holds_more():
    model = make_tiny_model("sd15")
    whole, batched = windows(model, 0), windows(model, 4)
    x_whole, inv_whole = inverted(whole, 10)
    spy = recorded(batched)
    x_batched, inv_batched = inverted(batched, 10)
    assert {len(ids) for _, _, ids in spy.calls} == {4, 2}                          # 4 + 4 + 2 frames
    assert torch.allclose(x_batched, x_whole, atol=1e-5 * float(x_whole.abs().max()))
    out_whole = edit(pnp(whole, inv_whole), x_whole, inv_whole.sigmas)
    edited = pnp(batched, inv_batched)
    spy = recorded(edited)
    out_batched = edit(edited, x_batched, inv_batched.sigmas)
    assert max(len(ids) for _, _, ids in spy.calls) == 4
    assert [name for name, _, _ in spy.calls[:2]] == ["source", "edit"]           # each batch: its source, then edit
    assert torch.allclose(out_batched, out_whole, atol=1e-4 * float(out_whole.abs().max()))


@pytest.mark.parametrize("mode", ["dense", "anchor", "keyframes"])
def test_attention_across_frames_runs_in_overlapping_windows_holding_the_shared_frames(mode):
    model = windows(cross_frame(make_tiny_model("sd15"), mode), 6, 2)
    spy = recorded(model)
    x = make_latent(14, 8, 8)["samples"]
    from tve.engine import host
    sigmas = host.sigma_grid(model, "normal", 2)
    edit(model, x, sigmas)
    edits = [ids for name, _, ids in spy.calls if name == "edit"][:3]              # the windows of the first step
    own = [sorted(set(ids)) for ids in edits]
    assert sorted({f for ids in own for f in ids}) == list(range(14))
    if mode == "anchor":
        assert all(0 in ids for ids in own) and max(len(ids) for ids in own) == 7   # 6 own frames + the anchor
    if mode == "dense":
        assert own == [[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9], [8, 9, 10, 11, 12, 13]]
    if mode == "keyframes":
        from tve.attention.tokenflow import pick_keyframes
        keyframes = set(pick_keyframes(range(14), 4, 7, 0).tolist())
        for ids in own:                              # each window holds the global keyframes of its frames' windows
            assert {k for k in keyframes if k // 4 in {i // 4 for i in ids}} <= set(ids)


def test_overlapping_windows_blend_so_a_frame_in_two_windows_gets_their_mean():
    from tve.engine.frame_windows import FrameWindows
    model = cross_frame(make_tiny_model("sd15"), "dense")
    x = make_latent(6, 8, 8)["samples"]
    from tve.engine import host
    sigmas = host.sigma_grid(model, "normal", 1)
    out = edit(windows(model, 4, 2), x, sigmas)
    first = edit(model, x[:4], sigmas)
    second = edit(model, x[2:], sigmas)
    expected = torch.cat([first[:2], (2 * first[2:3] + 1 * second[0:1]) / 3, (1 * first[3:4] + 2 * second[1:2]) / 3,
                          second[2:]])                                           # pyramid weights 1,2,2,1
    assert FrameWindows(4, 2).schedule(4, True) == [[0, 1, 2, 3]] and len(FrameWindows(4, 2).schedule(5, True)) == 2
    assert torch.allclose(out, expected, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_tokenflow_batches_hold_a_batch_and_a_few_keyframes_and_equal_the_single_pass(mode):
    # interval 6 over 12 frames: two keyframes; each group's keyframe pass holds both (the other as context), so
    # the batched edit computes what the single pass does, batch by batch (official: the propagated source branch
    # runs per batch too, the per-frame source pass holds the keyframes)
    model = make_tiny_model("sd15")
    whole, batched = windows(model, 0), windows(model, 6)
    x_T, inversion = inverted(whole, 12)
    expected = edit(tokenflow(whole, inversion, 6, mode), x_T, inversion.sigmas)
    patched = tokenflow(batched, inversion, 6, mode)
    spy = recorded(patched)
    out = edit(patched, x_T, inversion.sigmas)
    passes = {"paper": ["source", "keyframes", "edit", "source", "edit"],                     # batch 0 needs both
              "official": ["source", "keyframes", "source", "edit"] * 2}[mode]    # batch 0 blends its own only
    step = [(name, ids) for name, _, ids in spy.calls][:len(passes)]
    assert [name for name, _ in step] == passes
    assert all(len(ids) == 2 for name, ids in step if name == "keyframes")
    if mode == "official":                  # per batch: the keyframes' per-frame source, the propagated source
        assert sorted(step[0][1]) == sorted(step[1][1]) == sorted(step[4][1]) == sorted(step[5][1])
        assert [sorted(ids) for _, ids in (step[2], step[6])] == [list(range(6)), list(range(6, 12))]
    assert [sorted(ids) for name, ids in step if name == "edit"] == [list(range(6)), list(range(6, 12))]
    assert torch.allclose(out, expected, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_long_tokenflow_keyframe_groups_are_bounded_and_every_frame_is_edited_once_per_step(mode):
    model = windows(make_tiny_model("sd15"), 8)
    x_T, inversion = inverted(model, 40, steps=2)
    patched = tokenflow(model, inversion, 4, mode)
    spy = recorded(patched)
    out = edit(patched, x_T, inversion.sigmas)
    assert torch.isfinite(out).all()
    calls = [(name, ids) for name, _, ids in spy.calls]
    keyframe_calls = [ids for name, ids in calls if name == "keyframes"]
    assert max(len(ids) for ids in keyframe_calls) <= 2 * 2 + 2       # at most 2 new groups of 2, 2 neighbours
    edited = [f for name, ids in calls if name == "edit" for f in ids]
    assert sorted(edited) == sorted([*range(40)] * 2)                          # 2 steps
    assert max(len(ids) for name, ids in calls if name == "source") <= 8 + 6


def test_tokenflow_with_one_frame_per_window_still_attends_across_keyframes():
    # why frames_per_window 1 is not refused with TokenFlow alone (issue 24): every keyframe pass holds its
    # neighbouring groups' keyframes as context, so the keyframes still attend to each other
    model = windows(make_tiny_model("sd15"), 1)
    x_T, inversion = inverted(model, 8, steps=2)
    patched = tokenflow(model, inversion, 2)                              # 4 keyframes a step
    spy = recorded(patched)
    assert torch.isfinite(edit(patched, x_T, inversion.sigmas)).all()
    calls = [(name, ids) for name, _, ids in spy.calls]
    keyframe_calls = [ids for name, ids in calls if name == "keyframes"]
    assert keyframe_calls and min(len(ids) for ids in keyframe_calls) >= 2
    assert max(len(ids) for name, ids in calls if name == "edit") == 1


def test_bad_window_settings_name_the_input():
    model = make_tiny_model("sd15")
    with pytest.raises(ValueError, match="overlap"):
        windows(model, 4, 4)
    with pytest.raises(ValueError, match="frames_per_window"):
        windows(model, -1, 0)


def test_frame_windows_compose_in_any_order_and_applied_twice_the_later_wins():
    from tve.engine.stack import stack_of
    model = make_tiny_model("sd15")
    x_T, inversion = inverted(windows(model, 0), 12)
    before = tokenflow(windows(model, 6), inversion, 6)
    after = windows(tokenflow(model, inversion, 6), 6)
    twice = windows(tokenflow(windows(model, 3, 1), inversion, 6), 6)
    assert stack_of(twice).windows == stack_of(before).windows == stack_of(after).windows
    outs = [edit(m, x_T, inversion.sigmas) for m in (before, after, twice)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert stack_of(model).windows.size == 16                 # untouched original: the default


def test_inversion_of_a_flatten_model_runs_in_overlapping_windows_on_global_trajectory_ids():
    from tve.nodes.edit_nodes import ApplyFLATTEN
    from tve.tests.test_flatten_node import trajectories_for
    model = ApplyFLATTEN.execute(make_tiny_model("sd15"), trajectories_for(14), "highest resolution",
                                 "dense_output").result[0]
    windowed = windows(model, 6, 2)
    spy = recorded(windowed)
    x_T, inversion = inverted(windowed, 14)
    first_step = [sorted(ids) for name, _, ids in spy.calls if name == "inversion"][:3]
    assert first_step == [list(range(0, 6)), list(range(4, 10)), list(range(8, 14))]
    assert torch.isfinite(x_T).all()
