"""The TVE state on a MODEL (both hosts): features in order, one wrapper set, refusals before anything is applied."""
import pytest

from tve.flow.estimate import FlowField
from tve.flow.trajectories import build_trajectories
from tve.nodes import host, passes
from tve.nodes.cross_frame import apply_cross_frame
from tve.nodes.flatten import apply_flatten
from tve.tests.hosts import make_tiny_model
from tve.tools.video_world import render_clip


def cross_frame(model, mode, grids="all"):
    return apply_cross_frame(model, mode, 2, 0, False, 2, 0, grids, 0.0, 1.0)


def flatten(model):
    clip = render_clip(4, 64, 64, seed=0, sprites=1)
    flow = FlowField(forward=clip.flow_forward, backward=clip.flow_backward, occlusion=clip.occlusion_forward,
                     method="ground truth")
    return apply_flatten(model, build_trajectories(flow, (8, 8), seed=0), "highest resolution", "dense_output")


def test_a_later_cross_frame_mode_wins_on_the_blocks_it_selects_and_one_wrapper_set_remains():
    model = make_tiny_model("sd15")
    both = cross_frame(cross_frame(model, "keyframes"), "dense", "latent/2")
    state = passes.state_of(both)
    for block in host.attention_blocks(both):
        assert state.attention[block.key].mode == ("dense" if block.level == 1 else "keyframes"), block
    assert state.applied == (passes.CROSS_FRAME_NODE,)
    for wrapper_type in (host.OUTER_SAMPLE, host.CALC_COND_BATCH):
        assert len(both.get_wrappers(wrapper_type, host.WRAPPER_KEY)) == 1
    assert passes.state_of(model).applied == () and host.get_attachment(model) is None


@pytest.mark.parametrize("first_is_flatten", [True, False])
def test_flatten_and_cross_frame_attention_refuse_each_other_in_either_order_naming_both(first_is_flatten):
    model = make_tiny_model("sd15")
    first = flatten(model) if first_is_flatten else cross_frame(model, "dense")
    with pytest.raises(passes.Refused) as refusal:
        cross_frame(first, "anchor") if first_is_flatten else flatten(first)
    assert passes.FLATTEN_NODE in str(refusal.value) and passes.CROSS_FRAME_NODE in str(refusal.value)
    assert "neither order" in str(refusal.value)
    assert passes.state_of(first).applied == ((passes.FLATTEN_NODE,) if first_is_flatten
                                              else (passes.CROSS_FRAME_NODE,))


def test_flatten_applied_again_is_one_flatten_and_its_routers_stay_in_place():
    twice = flatten(flatten(make_tiny_model("sd15")))
    state = passes.state_of(twice)
    assert state.applied == (passes.FLATTEN_NODE,)
    assert len({id(f) for f in state.attention.values()}) == 1
    assert set(host.attn1_replaces(twice).values()) == {passes.route_attention}


def test_pass_names_are_one_enum():
    assert [p.value for p in passes.Pass] == ["inversion", "source", "keyframes", "edit"]


def test_another_nodes_attention_replace_is_not_hidden_by_flatten_or_cross_frame_attention():
    model = make_tiny_model("sd15").clone()
    key = host.attention_blocks(model)[0].key
    model.set_model_attn1_replace(lambda q, k, v, extra: v, *key)
    for apply in (flatten, lambda m: cross_frame(m, "dense")):
        with pytest.raises(passes.Refused, match="another node already replaced self-attention"):
            apply(model)
