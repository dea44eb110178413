"""What the real server tells the frontend about the pack (/object_info): a tooltip on every input, only
TVE_-prefixed custom socket types, the previews as output nodes, tie-break seeds without a re-roll control."""
import pytest

pytestmark = pytest.mark.real_host

CORE_TYPES = {"MODEL", "LATENT", "IMAGE", "CONDITIONING", "SIGMAS", "INT", "FLOAT", "STRING", "BOOLEAN", "MASK",
              "VAE", "CLIP", "CONTROL_NET", "NOISE", "GUIDER", "SAMPLER", "VIDEO", "AUDIO",
              "OPTICAL_FLOW"}                  # core's RAFT (ComfyUI 0.33+), an optional input of Optical Flow (TVE)
PREVIEWS = {"TVE_PreviewFlow", "TVE_PreviewTrajectories", "TVE_PreviewFeatures"}
FIXED_SEEDS = {"TVE_FlowTrajectories", "TVE_PreviewTrajectories", "TVE_ApplyTokenFlow", "TVE_ApplyCrossFrameAttention"}


def pack_nodes(object_info: dict) -> dict:
    return {name: info for name, info in object_info.items() if name.startswith("TVE_")}


def inputs(info: dict) -> dict:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def test_every_pack_input_has_a_tooltip(object_info):
    missing = [f"{node}.{name}" for node, info in pack_nodes(object_info).items()
               for name, spec in inputs(info).items() if not (len(spec) > 1 and spec[1].get("tooltip"))]
    assert not missing


def test_custom_socket_types_carry_the_prefix(object_info):
    types = set()
    for info in pack_nodes(object_info).values():
        types |= {spec[0] for spec in inputs(info).values() if isinstance(spec[0], str)}
        types |= set(info["output"])
    custom = types - CORE_TYPES - {"COMBO"}
    assert custom and all(t.startswith("TVE_") for t in custom), custom


def test_the_previews_are_output_nodes_that_still_return_images(object_info):
    for name in PREVIEWS:
        assert object_info[name]["output_node"], name
        assert set(object_info[name]["output"]) == {"IMAGE"}, name


def test_tie_break_and_keyframe_seeds_do_not_re_roll(object_info):
    for name in FIXED_SEEDS:
        assert inputs(object_info[name])["seed"][1].get("control_after_generate") is False, name
    assert inputs(object_info["TVE_MotionDynamicsLatents"])["seed"][1].get("control_after_generate") is True
