"""TVE_ApplyFLATTEN: node logic on both hosts; inversion + edit on the real host."""
import pytest
import torch

from tve.flow.estimate import FlowField
from tve.flow.trajectories import build_trajectories
from tve.nodes import host, passes
from tve.nodes.flatten import ApplyFLATTEN
from tve.tests.hosts import FAMILIES, cond_chunks_split, make_conditioning, make_latent, make_tiny_model
from tve.tools.video_world import render_clip


def trajectories_for(frames=16, latent_hw=(8, 8), seed=0):
    clip = render_clip(frames, latent_hw[0] * 8, latent_hw[1] * 8, seed=seed, sprites=1)
    flow = FlowField(forward=clip.flow_forward, backward=clip.flow_backward, occlusion=clip.occlusion_forward,
                     method="ground truth")
    return build_trajectories(flow, latent_hw, seed=0)


def apply(model, trajectories, grids="highest resolution", qk="dense_output"):
    return ApplyFLATTEN().apply(model, trajectories, grids, qk)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_gets_dense_attention_and_the_top_grid_gets_trajectories(family):
    model = make_tiny_model(family)
    patched = apply(model, trajectories_for(4))
    replaces = patched.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert set(replaces) == {b.key for b in host.attention_blocks(model)}
    assert set(replaces.values()) == {passes.route_attention}
    flatten = passes.state_of(patched).attention[next(iter(replaces))]
    top = min(b.level for b in host.attention_blocks(model))
    assert flatten.grids == {(-(-8 // 2 ** top), -(-8 // 2 ** top))}
    assert "patches_replace" not in model.model_options["transformer_options"]


def test_bad_choices_are_clear_errors():
    model = make_tiny_model("sd15")
    with pytest.raises(ValueError, match="token_grids"):
        apply(model, trajectories_for(4), grids="some")
    with pytest.raises(ValueError, match="qk_source"):
        apply(model, trajectories_for(4), qk="values")


# ---------------------------------------------------------------------------------------------- real host
def sample(model, x, sigmas, family, cfg=4.0):
    import comfy.sample
    import comfy.samplers
    return comfy.sample.sample_custom(model, torch.zeros_like(x), cfg, comfy.samplers.sampler_object("euler"), sigmas,
                                      make_conditioning(family, 5), make_conditioning(family, 6), x,
                                      disable_pbar=True)


@pytest.mark.real_host
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qk", ["dense_output", "projections"])
def test_inversion_and_edit_with_flatten_run_for_16_frames(family, qk):
    from tve.nodes.injection import apply_feature_injection
    from tve.nodes.inversion import invert
    model = apply(make_tiny_model(family), trajectories_for(16), qk=qk)
    x_T, inversion = invert(model, make_latent(16, 8, 8)["samples"], make_conditioning(family), 3, "ddim_uniform")
    edited = sample(apply_feature_injection(model, inversion, 0.5, 0.8, "flatten", "sigma-matched"), x_T,
                    inversion.sigmas, family)
    assert edited.shape == x_T.shape and torch.isfinite(edited).all()


@pytest.mark.real_host
def test_flatten_edit_is_identical_with_cond_and_uncond_together_or_split():
    model = apply(make_tiny_model("sd15"), trajectories_for(8), grids="all")
    x = make_latent(8, 8, 8)["samples"]
    sigmas = host.sigma_grid(model, "ddim_uniform", 2)
    together = sample(model, x, sigmas, "sd15")
    with cond_chunks_split():
        split = sample(model, x, sigmas, "sd15")
    assert torch.allclose(together, split, atol=1e-4 * together.abs().max())


@pytest.mark.real_host
def test_trajectories_of_another_latent_size_or_frame_count_are_refused():
    model = apply(make_tiny_model("sd15"), trajectories_for(8))
    sigmas = host.sigma_grid(model, "ddim_uniform", 2)
    with pytest.raises(ValueError, match="trajectories"):
        sample(model, make_latent(8, 8, 16)["samples"], sigmas, "sd15")
    with pytest.raises(ValueError, match="trajectories"):
        sample(model, make_latent(6, 8, 8)["samples"], sigmas, "sd15")
