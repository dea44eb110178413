"""The TVE methods on a MODEL (both hosts): in the order applied, one wrapper set, composition rules that are the
methods' own, refusals before anything is applied, and notes where a node's settings replace another's."""
import re

import pytest

from tve.engine import host, identity, passes
from tve.engine.cross_frame import apply_cross_frame
from tve.engine.flatten import apply_flatten
from tve.engine.methods import Refused
from tve.engine.run import Pass
from tve.engine.stack import apply_frame_windows, stack_of
from tve.flow.estimate import FlowField
from tve.flow.trajectories import build_trajectories
from tve.tests.hosts import make_tiny_model
from tve.tools.video_world import render_clip


def cross_frame(model, mode, grids="all"):
    return apply_cross_frame(model, mode, 2, 0, False, 2, 0, grids, 0.0, 1.0)


def flatten(model):
    clip = render_clip(4, 64, 64, seed=0, sprites=1)
    flow = FlowField(forward=clip.flow_forward, backward=clip.flow_backward, occlusion=clip.occlusion_forward,
                     method="ground truth")
    return apply_flatten(model, build_trajectories(flow, (8, 8), seed=0), "highest resolution", "dense_output")


def nodes_of(model):
    return [m.node for m in stack_of(model).methods]


def test_a_later_cross_frame_mode_wins_on_the_blocks_it_selects_and_one_wrapper_set_remains():
    model = make_tiny_model("sd15")
    both = cross_frame(cross_frame(model, "keyframes"), "dense", "latent/2")
    stack = stack_of(both)
    for block in host.attention_blocks(both):
        assert stack.attention_chain(block.key)[-1].mode == ("dense" if block.level == 1 else "keyframes"), block
    assert nodes_of(both) == [identity.CROSS_FRAME, identity.CROSS_FRAME]
    latent_2 = sum(b.level == 1 for b in host.attention_blocks(model))
    assert stack_of(both).notes == (f"{identity.CROSS_FRAME}: applied again; these settings replace the earlier ones "
                                    f"on {latent_2} of the {len(host.attention_blocks(model))} blocks they were on "
                                    "(the later node's win per block)",)
    assert stack_of(cross_frame(model, "dense", "latent/2")).notes == ()
    covering = cross_frame(both, "anchor")                          # all blocks: both earlier modes are gone
    assert [m.mode for m in stack_of(covering).methods] == ["anchor"]
    assert stack_of(covering).notes == (f"{identity.CROSS_FRAME}: applied again; these settings replace the "
                                        "earlier ones",) * 2
    for wrapper_type in (host.OUTER_SAMPLE, host.CALC_COND_BATCH):
        assert len(both.get_wrappers(wrapper_type, host.WRAPPER_KEY)) == 1
    assert stack_of(model).methods == () and host.get_attachment(model) is None


@pytest.mark.parametrize("first_is_flatten", [True, False])
def test_flatten_and_cross_frame_attention_refuse_each_other_in_either_order_naming_both(first_is_flatten):
    model = make_tiny_model("sd15")
    first = flatten(model) if first_is_flatten else cross_frame(model, "dense")
    with pytest.raises(Refused) as refusal:
        cross_frame(first, "anchor") if first_is_flatten else flatten(first)
    assert str(identity.FLATTEN) in str(refusal.value) and str(identity.CROSS_FRAME) in str(refusal.value)
    assert "neither order" in str(refusal.value)
    assert nodes_of(first) == [identity.FLATTEN if first_is_flatten else identity.CROSS_FRAME]


def test_flatten_applied_again_is_one_flatten_and_its_routers_stay_in_place():
    twice = flatten(flatten(make_tiny_model("sd15")))
    assert nodes_of(twice) == [identity.FLATTEN]
    assert stack_of(twice).notes == (f"{identity.FLATTEN}: applied again; these settings replace the earlier ones",)
    assert set(host.attn1_replaces(twice).values()) == {passes.route_attention}


def test_pass_names_are_one_enum():
    assert [p.value for p in Pass] == ["inversion", "source", "keyframes", "edit"]


def test_another_nodes_attention_replace_is_not_hidden_by_flatten_or_cross_frame_attention():
    model = make_tiny_model("sd15").clone()
    key = host.attention_blocks(model)[0].key
    model.set_model_attn1_replace(lambda q, k, v, extra: v, *key)
    for apply in (flatten, lambda m: cross_frame(m, "dense")):
        with pytest.raises(Refused, match="another node already replaced self-attention"):
            apply(model)


@pytest.mark.parametrize("windows_first", [True, False])
def test_a_window_of_one_frame_is_refused_for_attention_across_frames_in_either_order(windows_first):
    model = make_tiny_model("sd15")
    with pytest.raises(Refused, match="^frames_per_window: 1 frame per window leaves Apply FLATTEN"):
        flatten(apply_frame_windows(model, 1, 0)) if windows_first else apply_frame_windows(flatten(model), 1, 0)
    assert stack_of(apply_frame_windows(model, 1, 0)).windows.size == 1      # per-frame work: any window


def node_output_notes(out):
    """The notes a MODEL node shows on its output (none where it shows nothing)."""
    return out.ui["text"] if out.ui is not None else []


@pytest.mark.real_host
def test_injection_and_tokenflow_in_either_order_say_whose_injection_settings_remain(caplog):
    from tve.engine.inversion import invert
    from tve.nodes.edit_nodes import ApplyFeatureInjection, ApplyTokenFlow
    from tve.tests.hosts import make_conditioning, make_latent
    model = make_tiny_model("sd15")
    _, inversion = invert(model, make_latent(3, 8, 8)["samples"], make_conditioning("sd15"), 2, "ddim_uniform")

    def injection(m):
        return ApplyFeatureInjection.execute(m, inversion, 0.5, 0.8, "tokenflow", "sigma-matched")

    def tokenflow(m):
        return ApplyTokenFlow.execute(m, inversion, 2, 0, "paper", 0.5, 0.8)

    first_injection, first_tokenflow = injection(model)[0], tokenflow(model)[0]
    with caplog.at_level("WARNING"):
        caplog.clear()
        then_tokenflow, then_injection = tokenflow(first_injection), injection(first_tokenflow)
    assert node_output_notes(then_tokenflow) == [
        f"{identity.TOKENFLOW}: its PnP injection settings replace the PnP injection settings "
        f"{identity.FEATURE_INJECTION} set on this model (one per model; the later node's win)"]
    assert node_output_notes(then_injection) == [
        f"{identity.FEATURE_INJECTION}: its PnP injection settings replace the PnP injection settings "
        f"{identity.TOKENFLOW} set on this model (one per model; the later node's win)"]
    assert [r.getMessage() for r in caplog.records] == [f"[TVE] {n}" for n in node_output_notes(then_tokenflow)
                                                        + node_output_notes(then_injection)]     # once each
    assert node_output_notes(tokenflow(model)) == node_output_notes(injection(model)) == []


def test_frame_windows_applied_again_says_its_settings_replace_the_earlier_ones():
    from tve.nodes.edit_nodes import ApplyFrameWindows
    model = make_tiny_model("sd15")
    once = ApplyFrameWindows.execute(model, 8, 2)
    assert node_output_notes(once) == []                   # the default windows are no node's settings
    twice = ApplyFrameWindows.execute(once.result[0], 0, 0)
    assert node_output_notes(twice) == [
        f"{identity.FRAME_WINDOWS}: applied again; these settings (all frames per window, overlap 0) replace the "
        "earlier ones (8 frames per window, overlap 2): one per model, the later node's win"]
    assert stack_of(twice.result[0]).windows.size == 0
    assert node_output_notes(ApplyFrameWindows.execute(cross_frame(once.result[0], "dense"), 4, 0)) != []   # still said


@pytest.mark.real_host
@pytest.mark.parametrize("mode", ["dense", "anchor"])
def test_core_context_windows_of_one_frame_are_refused_with_attention_across_frames_when_sampling_starts(mode):
    import torch
    from tve.tests.hosts import make_conditioning, with_context_windows
    model = with_context_windows(cross_frame(make_tiny_model("sd15"), mode), 1, overlap=0)
    latent = torch.randn(4, 4, 8, 8)
    with pytest.raises(Refused, match=rf"^context_length: core's Context Windows node gives every call 1 frame, "
                                      rf"which leaves {re.escape(str(identity.CROSS_FRAME))} nothing to attend to"):
        host.sample(model, torch.randn_like(latent), 1.0, "euler", torch.tensor([1.0, 0.0]), make_conditioning(),
                    make_conditioning(), latent)
    per_frame = with_context_windows(make_tiny_model("sd15"), 1, overlap=0)       # nothing across frames: fine
    host.sample(per_frame, torch.randn_like(latent), 1.0, "euler", torch.tensor([1.0, 0.0]), make_conditioning(),
                make_conditioning(), latent)
