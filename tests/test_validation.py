"""The validation layer: each bad value is one error naming its input; fingerprints tell one latent from another
but not from its own fp16/bf16 cast. Runs on both hosts."""
import math

import pytest
import torch

from tve.engine import validation
from tve.nodes.edit_nodes import ApplyCrossFrameAttention
from tve.nodes.edit_nodes import ApplyFLATTEN
from tve.nodes.flow_nodes import FlowTrajectories, OpticalFlow, PreviewFlow, PreviewTrajectories
from tve.nodes.measure_nodes import ConsistencyMetrics
from tve.engine.feature_preview import pca_image
from tve.flow.estimate import estimate_flow
from tve.tests.hosts import make_latent, make_tiny_model, make_vae

VAE = make_vae()


def clip(frames=3, height=24, width=32, seed=0):
    return torch.rand(frames, height, width, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_naming_the_input(bad):
    with pytest.raises(ValueError, match="^start_percent: expected a finite number"):
        validation.number(bad, "start_percent", 0.0, 1.0)
    assert validation.number(0.25, "start_percent", 0.0, 1.0) == 0.25
    with pytest.raises(ValueError, match=r"^cfg: expected a number at least 0.0, got -1"):
        validation.number(-1, "cfg", 0.0)


def test_a_bool_is_not_an_integer_and_ranges_are_said():
    with pytest.raises(ValueError, match="^keyframe_interval: expected an integer, got True"):
        validation.integer(True, "keyframe_interval", 1)
    with pytest.raises(ValueError, match=r"^coarse_factor: expected an integer at least 1, got 0"):
        validation.integer(0, "coarse_factor", 1)
    assert validation.integer(3, "coarse_factor", 1) == 3


def test_frames_empty_single_tiny_or_nan_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"^images: is empty \(0 frames\)"):
        validation.frames(clip(0), "images")
    with pytest.raises(ValueError, match=r"^images: has 1 frame\(s\); at least 2 frames needed"):
        validation.frames(clip(1), "images", 2)
    with pytest.raises(ValueError, match=r"^images: frames are 32x4 px; at least 8x8 px needed \(one latent cell\)"):
        validation.frames(clip(2, 4, 32), "images")
    nan = clip(2)
    nan[1, :8, :8] = math.nan
    with pytest.raises(ValueError, match=r"^images: 192 of .* values are NaN or infinite \(an fp16 VAE"):
        validation.frames(nan, "images")
    assert validation.frames(clip(2), "images", 2) is not None


def test_latents_of_other_model_families_or_empty_are_refused():
    with pytest.raises(ValueError, match=r"^latent: has 16-channel latents \(SD3 / Flux\); TVE edits with "
                                         r"SD1.x, SD2.x and SDXL"):
        validation.latent({"samples": torch.zeros(2, 16, 8, 8)}, "latent")
    with pytest.raises(ValueError, match=r"^latent: is empty \(0 frames\)"):
        validation.latent({"samples": torch.zeros(0, 4, 8, 8)}, "latent")
    with pytest.raises(ValueError, match=r"^latent: expected image latents"):
        validation.latent({"samples": torch.zeros(1, 4, 2, 8, 8)}, "latent")
    with pytest.raises(ValueError, match="^latent: expected a LATENT"):
        validation.latent(torch.zeros(1, 4, 8, 8), "latent")
    nan = torch.zeros(1, 4, 8, 8)
    nan[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="^latent: 1 of 256 values are NaN or infinite"):
        validation.latent({"samples": nan}, "latent")


def test_fingerprint_survives_a_half_precision_cast_but_not_another_latent():
    x = make_latent(3, 16, 16, seed=1)["samples"] * 14.0
    other = make_latent(3, 16, 16, seed=2)["samples"] * 14.0
    fp = validation.fingerprint(x)
    assert fp.shape == (3, validation.FINGERPRINT_SAMPLES)
    for dtype in (torch.float16, torch.bfloat16):
        assert validation.same_fingerprint(validation.fingerprint(x.to(dtype)), fp)
    assert not validation.same_fingerprint(validation.fingerprint(other), fp)
    assert not validation.same_fingerprint(validation.fingerprint(x + 0.2 * other), fp)
    assert not validation.same_fingerprint(validation.fingerprint(x[:2]), fp)


def test_cross_frame_attention_refuses_nan_and_bool_widgets():
    node, model = ApplyCrossFrameAttention, make_tiny_model("sd15")
    good = dict(mode="keyframes", keyframe_interval=2, anchor_frame=0, anchor_include_self=False, coarse_factor=2,
                seed=0, token_grids="all", start_percent=0.0, end_percent=1.0)
    for name, bad in [("start_percent", math.nan), ("end_percent", math.inf), ("keyframe_interval", True),
                      ("coarse_factor", 0), ("anchor_include_self", 1), ("mode", "sparse")]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            node.execute(model, **{**good, name: bad})
    node.execute(model, **good)


def test_flow_nodes_refuse_tiny_nan_or_single_frames_before_opencv_sees_them():
    node = OpticalFlow
    with pytest.raises(ValueError, match=r"^images: frames are 15x15 px; at least 16x16 px needed \(OpenCV DIS's "
                                         r"12 px patch after VAEEncode's crop to a multiple of 8"):
        node.execute(clip(2, 15, 15), VAE, "dis", "none (method dis)", 8)
    node.execute(clip(2, 16, 16), VAE, "dis", "none (method dis)", 8)
    with pytest.raises(ValueError, match=r"^images: frames are 32x6 px; at least 8x8 px needed"):
        node.execute(clip(2, 6, 32), VAE, "raft_small", "none (method dis)", 8)
    with pytest.raises(ValueError, match=r"^images: has 1 frame\(s\)"):
        node.execute(clip(1), VAE, "dis", "none (method dis)", 8)
    nan = clip(2)
    nan[0, 4:12, 4:12] = math.nan
    with pytest.raises(ValueError, match="^images: .* NaN"):
        node.execute(nan, VAE, "dis", "none (method dis)", 8)


def test_flow_consumers_refuse_non_finite_flow_and_frames():
    flow = estimate_flow(clip(3), "dis")
    bad = type(flow)(forward=flow.forward.clone().fill_(math.nan), backward=flow.backward, occlusion=flow.occlusion,
                     method="dis")
    latent = make_latent(3, 3, 4)
    with pytest.raises(ValueError, match="^flow: .* NaN or infinite in its forward flow"):
        FlowTrajectories.execute(bad, latent, 0, True)
    with pytest.raises(ValueError, match="^flow: "):
        PreviewFlow.execute(bad)
    with pytest.raises(ValueError, match="^flow: "):
        ConsistencyMetrics.execute(clip(3), bad)
    nan = clip(3)
    nan[2] = math.nan
    with pytest.raises(ValueError, match="^images: .* NaN"):
        ConsistencyMetrics.execute(nan, flow)
    with pytest.raises(ValueError, match="^source_images: .* NaN"):
        ConsistencyMetrics.execute(clip(3), flow, source_images=nan)
    trajectories, = FlowTrajectories.execute(flow, latent, 0, True).result
    with pytest.raises(ValueError, match="^images: .* NaN"):
        PreviewTrajectories.execute(trajectories, nan, "latent", 8, 0)
    with pytest.raises(ValueError, match="^latent: has 16-channel"):
        FlowTrajectories.execute(flow, {"samples": torch.zeros(3, 16, 3, 4)}, 0, True)


def test_trajectories_carry_the_fingerprint_of_their_latent_and_sources_of_two_latents_are_refused():
    flow = estimate_flow(clip(3), "dis")
    latent = make_latent(3, 3, 4)
    trajectories, = FlowTrajectories.execute(flow, latent, 0, True).result
    assert validation.same_fingerprint(trajectories.source, validation.fingerprint(latent["samples"]))
    other, = FlowTrajectories.execute(flow, make_latent(3, 3, 4, seed=9), 0, True).result
    validation.same_sources([trajectories, trajectories])
    with pytest.raises(ValueError, match="^trajectories: made from another latent than the trajectories"):
        validation.same_sources([trajectories, other])
    # FLATTEN applied again is one FLATTEN with the later settings (issue 15): its trajectories replace the first.
    model, = ApplyFLATTEN.execute(make_tiny_model("sd15"), trajectories, "highest resolution", "dense_output").result
    shown = ApplyFLATTEN.execute(model, other, "highest resolution", "dense_output")
    again, = shown.result
    assert shown.ui["text"] == ["Apply FLATTEN (TVE): applied again; these settings replace the earlier ones"]
    from tve.engine.stack import stack_of
    assert stack_of(again).sources() == [other]


def test_pca_preview_of_a_single_token_grid_gives_a_picture():
    features = torch.randn(2, 1, 8)
    picture = pca_image(features, (1, 1))
    assert picture.shape == (2, 1, 1, 3) and bool(torch.isfinite(picture).all())
    assert pca_image(torch.ones(1, 1, 8), (1, 1)).abs().max() == 0


# ---------------------------------------------------------------------------------------------- noise masks
LATENT_6 = (6, 4, 6, 8)                      # 6 frames of 64x48 px


@pytest.mark.parametrize("mask", [None, torch.ones(1, 48, 64), torch.rand(6, 48, 64), torch.rand(6, 1, 48, 64),
                                  torch.zeros(48, 64), torch.rand(6, 6, 8), torch.rand(6, 51, 66)],
                         ids=["none", "one", "per_frame", "per_frame_with_channel", "2d", "latent_size", "uncropped"])
def test_a_noise_mask_of_one_or_every_frame_finite_in_0_1_at_the_frames_aspect_passes(mask):
    validation.noise_mask(mask, LATENT_6, "latent")


def _nan_patch(mask, count):
    mask = mask.clone()
    mask.reshape(-1)[:count] = float("nan")
    return mask


@pytest.mark.parametrize("mask, error", [
    (torch.full((1, 48, 64), float("nan")), r"its noise_mask has 3072 of 3072 values NaN or infinite; expected values "
                                            r"in \[0, 1\]"),
    (_nan_patch(torch.ones(1, 48, 64), 64), r"its noise_mask has 64 of 3072 values NaN or infinite"),
    (torch.full((6, 48, 64), float("inf")), r"its noise_mask has 18432 of 18432 values NaN or infinite"),
    (torch.ones(4, 48, 64), r"its noise_mask has 4 masks but the latent has 6 frames; expected one mask per frame \(6\) "
                            r"or one for all frames \(core would repeat them without a word\)"),
    (torch.ones(8, 1, 48, 64), r"its noise_mask has 8 masks but the latent has 6 frames; .*\(core would cut them"),
    (torch.full((1, 48, 64), 255.0), r"its noise_mask holds values from 255 to 255; expected values in \[0, 1\]"),
    (torch.full((1, 48, 64), -0.5), r"its noise_mask holds values from -0.5 to -0.5; expected values in \[0, 1\]"),
    (torch.ones(1, 64, 64), r"its noise_mask is 64x64 but the frames are 8x6 latent cells \(64x48 px\); core would "
                            r"stretch it"),
    (torch.ones(1, 48, 64, dtype=torch.uint8), r"its noise_mask holds torch.uint8 values; expected floats in \[0, 1\]"),
    (torch.ones(64), r"its noise_mask is \(64,\); expected a MASK \(frames, height, width\)"),
    ([[1.0]], r"its noise_mask is list; expected a MASK"),
], ids=["nan", "nan_64_of_3072", "inf", "4_masks_6_frames", "8_masks_6_frames", "0_255", "negative", "stretched",
        "uint8", "1d", "list"])
def test_a_bad_noise_mask_is_one_error_naming_the_latent_and_what_was_expected(mask, error):
    with pytest.raises(ValueError, match="^latent: " + error):
        validation.noise_mask(mask, LATENT_6, "latent")


def test_a_mask_core_already_fitted_to_the_latent_is_checked_for_its_values_only():
    prepared = torch.rand(LATENT_6)                        # what a 0.33 sampler hands its OUTER_SAMPLE wrappers
    validation.sampled_noise_mask(prepared, LATENT_6, "latent_image")
    with pytest.raises(ValueError, match=r"^latent_image: its noise_mask has 1 of 1152 values NaN"):
        validation.sampled_noise_mask(_nan_patch(prepared, 1), LATENT_6, "latent_image")
    with pytest.raises(ValueError, match=r"^latent_image: its noise_mask has 4 masks but the latent has 6 frames"):
        validation.sampled_noise_mask(torch.ones(4, 1, 48, 64), LATENT_6, "latent_image")     # as 0.3.x gives it
    validation.sampled_noise_mask(None, LATENT_6, "latent_image")
