"""What the inversion checks before the first step, exact step counts, and masked edits, on the real host."""
import pytest
import torch

from tve.engine.run import Pass, current_pass
from tve.tests.hosts import make_conditioning, make_latent, make_tiny_model

pytestmark = pytest.mark.real_host


def sample(model, latent, sigmas, noise=None, noise_mask=None, seed=5, cfg=4.0):
    from tve.engine import host
    noise = torch.zeros_like(latent) if noise is None else noise
    return host.sample(model, noise, cfg, "euler", sigmas, make_conditioning(seed=seed), make_conditioning(seed=6),
                       latent, noise_mask=noise_mask)


def inverted(frames=3, size=8, steps=4, seed=2):
    from tve.engine.inversion import invert
    model = make_tiny_model("sd15")
    latent = make_latent(frames, size, size, seed=seed)["samples"]
    x_T, inversion = invert(model, latent, make_conditioning(seed=1), steps, "ddim_uniform")
    return model, latent, x_T, inversion


def injected(model, inversion):
    from tve.engine.injection import apply_feature_injection
    return apply_feature_injection(model, inversion, 1.0, 1.0, "tokenflow", "sigma-matched")


def v_prediction(model):
    from tve.engine import host
    return host.run_core_node("ModelSamplingDiscrete", model=model, sampling="v_prediction", zsnr=False)[0]


# ---------------------------------------------------------------------------------------------- host pins
def test_effective_sampling_reads_the_patched_model_sampling():
    from tve.engine import host
    base = host.effective_sampling(make_tiny_model("sd15"))
    assert base.prediction == "EPS" and base.sigma_min < 0.1 < 10 < base.sigma_max
    assert host.effective_sampling(make_tiny_model("sd2")).prediction == "V_PREDICTION"
    patched = host.effective_sampling(v_prediction(make_tiny_model("sd15")))
    assert patched.prediction == "V_PREDICTION" and not patched.matches(base)
    assert host.model_family(v_prediction(make_tiny_model("sd15"))) == "SD15/EPS"     # the base type is unchanged
    assert host.latent_channels(make_tiny_model("sdxl")) == 4


@pytest.mark.parametrize("steps", [2, 6, 7, 30, 50, 400])
def test_ddim_uniform_inversion_grid_has_exactly_the_steps_asked_at_diffusers_timesteps(steps):
    from tve.engine import host
    model = make_tiny_model("sd15")
    ms = model.get_model_object("model_sampling")
    grid = host.inversion_sigma_grid(model, "ddim_uniform", steps)
    timesteps = [1 + i * (1000 // steps) for i in range(steps)]                 # diffusers, "leading", offset 1
    expected = torch.tensor([float(ms.sigmas[t]) for t in reversed(timesteps)] + [0.0])
    assert len(grid) == steps + 1 and torch.allclose(grid, expected)
    core = host.sigma_grid(model, "ddim_uniform", steps)
    assert torch.equal(grid, core[-steps - 1:])                                 # core's lowest steps, then 0
    if 1000 % steps == 0:
        assert torch.equal(grid, core)
    assert len(host.inversion_sigma_grid(model, "karras", steps)) == steps + 1


def test_inversion_of_6_steps_runs_6_model_evaluations():
    from tve.engine import host
    from tve.engine.inversion import invert
    model = make_tiny_model("sd15").clone()
    calls = []
    host.add_wrapper(model, host.DIFFUSION_MODEL, "count",
                     lambda executor, *args, **kwargs: calls.append(1) or executor(*args, **kwargs))
    _, inversion = invert(model, make_latent(2, 8, 8)["samples"], make_conditioning(), 6, "ddim_uniform")
    assert len(calls) == 6 and len(inversion.sigmas) == 7


def test_set_inpaint_latent_is_what_a_masked_run_puts_outside_the_mask():
    from tve.engine import host
    model = make_tiny_model("sd15").clone()
    seen = []

    def outside(sigma, noise, latent_image, x=None, **kwargs):
        seen.append(float(sigma.reshape(-1)[0]))
        return torch.full_like(latent_image, 3.0)

    host.set_inpaint_latent(model, outside)
    sigmas = host.sigma_grid(model, "ddim_uniform", 3)
    mask = torch.zeros(1, 8, 8)
    sample(model, torch.zeros(2, 4, 8, 8), sigmas, noise_mask=mask)
    assert seen == pytest.approx(sigmas[:-1].tolist(), rel=1e-5)
    assert host.prepare_mask(mask, (2, 4, 8, 8), torch.device("cpu")).shape == (2, 4, 8, 8)


# ---------------------------------------------------------------------------------------------- start latent, noise, model
def test_the_inverted_latent_and_a_partial_start_down_the_grid_are_accepted():
    from tve.engine import host
    model, latent, x_T, inversion = inverted(steps=4)
    patched = injected(model, inversion)
    sample(patched, x_T, inversion.sigmas)
    k = 2                                                           # SplitSigmas at step 2: the lower part
    start = host.process_latent_out(model, inversion.latents[k].float())
    sample(patched, start, inversion.sigmas[k:])


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
def test_a_partial_start_from_latents_stored_in_half_precision_is_accepted(storage):
    import dataclasses
    from tve.engine import host
    model, latent, x_T, inversion = inverted(steps=4)
    stored = dataclasses.replace(inversion, latents=inversion.latents.to(storage))    # an fp16/bf16 model's storage
    patched = injected(model, stored)
    sample(patched, x_T, stored.sigmas)
    start = host.process_latent_out(model, stored.latents[1].float())
    sample(patched, start, stored.sigmas[1:])


def test_an_edit_sampled_in_two_stages_continues_and_equals_the_one_stage_edit():
    model, latent, x_T, inversion = inverted(steps=4)
    patched = injected(model, inversion)
    whole = sample(patched, x_T, inversion.sigmas)
    first = sample(patched, x_T, inversion.sigmas[:3])               # SplitSigmas at step 2: the upper part
    second = sample(patched, first, inversion.sigmas[2:])           # continues from where the first stage ended
    assert torch.allclose(second, whole, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="^latent_image: sampling starts at σ"):
        sample(patched, first * 1.1, inversion.sigmas[2:])


@pytest.mark.parametrize("wired, message", [
    ("clean", "from the clean VAE latent of the frames, not the inverted one"),
    ("other_video", r"from a latent this inversion did not make \(another video, or another inversion\)"),
    ("x_T_part_way", "from the inversion's x_T, but sampling starts part-way down the grid"),
])
def test_a_start_latent_the_inversion_did_not_make_is_refused_naming_the_wire(wired, message):
    model, latent, x_T, inversion = inverted(steps=4)
    _, _, other_x_T, _ = inverted(steps=4, seed=9)
    patched = injected(model, inversion)
    start, sigmas = {"clean": (latent, inversion.sigmas), "other_video": (other_x_T, inversion.sigmas),
                     "x_T_part_way": (x_T, inversion.sigmas[1:])}[wired]
    with pytest.raises(ValueError, match=f"^latent_image: sampling starts at σ=.* {message}; connect the "
                                         "inverted_latent output"):
        sample(patched, start, sigmas)


def test_new_noise_on_the_inverted_latent_is_refused():
    model, latent, x_T, inversion = inverted(steps=3)
    with pytest.raises(ValueError, match="^noise: the sampler adds new noise .* DisableNoise"):
        sample(injected(model, inversion), x_T, inversion.sigmas, noise=torch.randn_like(x_T))


def test_a_model_whose_sampling_was_patched_is_refused_at_apply_time_and_at_the_first_step():
    from tve.engine.tokenflow import apply_tokenflow
    model, latent, x_T, inversion = inverted(steps=3)
    with pytest.raises(ValueError, match=r"^model: samples V_PREDICTION .* inversion was made with a model that "
                                         r"samples EPS"):
        apply_tokenflow(v_prediction(model), inversion, 2, 0, "paper", 0.5, 0.8)
    patched_after = v_prediction(apply_tokenflow(model, inversion, 2, 0, "paper", 0.5, 0.8))
    with pytest.raises(ValueError, match="^model: samples V_PREDICTION"):
        sample(patched_after, x_T, inversion.sigmas)


def test_trajectories_of_another_latent_than_the_inverted_one_are_refused():
    from tve.flow.estimate import estimate_flow
    from tve.engine.flatten import apply_flatten
    from tve.nodes.flow_nodes import FlowTrajectories
    from tve.engine.inversion import invert
    flow = estimate_flow(torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0)), "dis")
    latent, other = make_latent(3, 8, 8, seed=2), make_latent(3, 8, 8, seed=3)
    trajectories, = FlowTrajectories.execute(flow, latent, 0, True).result
    flat = apply_flatten(make_tiny_model("sd15"), trajectories, "highest resolution", "dense_output")
    with pytest.raises(ValueError, match="^trajectories: built on another latent than the one DDIM Inversion"):
        invert(flat, other["samples"], make_conditioning(), 2, "ddim_uniform")
    _, other_inversion = invert(make_tiny_model("sd15"), other["samples"], make_conditioning(), 2, "ddim_uniform")
    with pytest.raises(ValueError, match="^inversion: made from another latent than the trajectories"):
        injected(flat, other_inversion)
    _, inversion = invert(flat, latent["samples"], make_conditioning(), 2, "ddim_uniform")
    injected(flat, inversion)


# ---------------------------------------------------------------------------------------------- masks
def test_ddim_inversion_keeps_noise_mask_and_batch_index_on_its_latent():
    from tve.nodes.inversion_node import DDIMInversion
    latent = {**make_latent(2, 8, 8), "noise_mask": torch.ones(1, 64, 64), "batch_index": [4, 5]}
    out, inversion, _ = DDIMInversion.execute(make_tiny_model("sd15"), latent, make_conditioning(), 2,
                                              "ddim_uniform").result
    assert out["noise_mask"] is latent["noise_mask"] and out["batch_index"] == [4, 5]
    assert not torch.equal(out["samples"], latent["samples"])


def masked_edit_outputs(apply, frames=4):
    """(source, edit with a mask on the left half, edit without a mask, mask) — latents (F, 4, 8, 8)."""
    model, latent, x_T, inversion = inverted(frames=frames, steps=4)
    patched = apply(model, inversion)
    mask = torch.zeros(1, 8, 8)
    mask[..., :4] = 1.0                                            # edit the left half only
    return latent, sample(patched, x_T, inversion.sigmas, noise_mask=mask), sample(patched, x_T, inversion.sigmas), mask


@pytest.mark.parametrize("method", ["injection", "tokenflow"])
def test_a_masked_edit_changes_only_the_masked_region(method):
    from tve.engine.tokenflow import apply_tokenflow
    apply = injected if method == "injection" else (
        lambda model, inversion: apply_tokenflow(model, inversion, 2, 0, "paper", 0.5, 0.8))
    source, masked, unmasked, mask = masked_edit_outputs(apply)
    left, right = (slice(None), slice(None), slice(None), slice(0, 4)), (slice(None), slice(None), slice(None),
                                                                         slice(4, 8))
    assert torch.allclose(masked[right], source[right], atol=1e-5)
    assert (masked[left] - source[left]).abs().mean() > 0.05
    assert (unmasked[right] - source[right]).abs().mean() > 0.05        # without the mask the whole frame changes


def test_outside_the_mask_every_edit_step_sees_the_source_at_its_sigma():
    from tve.engine import host
    model, latent, x_T, inversion = inverted(frames=2, steps=4)
    patched = injected(model, inversion)
    seen = []

    def spy(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        sigma = transformer_options["sigmas"].reshape(-1)[0].float()
        if current_pass(transformer_options) is Pass.EDIT:
            seen.append((x.float() * (sigma ** 2 + 1) ** 0.5)[..., 4:].clone())
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    host.add_wrapper(patched, host.DIFFUSION_MODEL, "test_spy", spy)
    mask = torch.zeros(1, 8, 8)
    mask[..., :4] = 1.0
    sample(patched, x_T, inversion.sigmas, noise_mask=mask, cfg=1.0)
    assert len(seen) == 4
    for i, x in enumerate(seen):
        assert torch.allclose(x, inversion.latents[i][..., 4:].float(), atol=1e-4)


def test_an_outer_sample_wrapper_sees_the_sampled_patcher():
    from tve.engine import host
    model = make_tiny_model("sd15").clone()
    seen = {}

    def outer(executor, *args, **kwargs):
        seen["patcher"] = host.sampling_model(executor)
        return executor(*args, **kwargs)

    host.add_wrapper(model, host.OUTER_SAMPLE, "test_spy", outer)
    sample(model, torch.zeros(1, 4, 8, 8), host.sigma_grid(model, "ddim_uniform", 2))
    assert seen["patcher"] is model


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(0, 4, 8, 8), r"^latent_image: is empty \(0 frames\)"),
    (torch.zeros(2, 4, 0, 8), r"^latent_image: latents are 8x0 cells"),
    (torch.full((2, 4, 8, 8), float("nan")), r"^latent_image: 512 of 512 values are NaN"),
    (torch.zeros(2, 16, 8, 8), r"^latent_image: has 16-channel latents"),
])
def test_a_cross_frame_model_refuses_an_empty_nan_or_foreign_latent_before_the_first_step(bad, message):
    from tve.engine import host
    from tve.nodes.edit_nodes import ApplyCrossFrameAttention
    model, = ApplyCrossFrameAttention.execute(make_tiny_model("sd15"), "dense", 2, 0, False, 2, 0, "all", 0.0,
                                              1.0).result
    with pytest.raises(ValueError, match=message):
        sample(model, bad, host.sigma_grid(model, "ddim_uniform", 2))


@pytest.mark.parametrize("applied", ["injection", "cross_frame"])
def test_multigpu_cfg_split_on_a_tve_model_is_refused_before_the_first_step(applied):
    """core 0.33's MultiGPU CFG Split (``MultiGPU_WorkUnits``) adds a clone of the model per extra GPU under the
    additional-model key ``multigpu``; on this CPU host there is no second device, so the clone is added as the
    node does on a two-GPU machine. TVE refuses before any UNet call, naming the model."""
    from tve.engine import host
    from tve.nodes.edit_nodes import ApplyCrossFrameAttention
    from tve.tests.test_tokenflow_node import recorded
    model, latent, x_T, inversion = inverted(steps=2)
    if applied == "injection":
        patched, start, sigmas = injected(model, inversion), x_T, inversion.sigmas
    else:
        (patched,) = ApplyCrossFrameAttention.execute(model, "dense", 2, 0, False, 2, 0, "all", 0.0, 1.0).result
        start, sigmas = latent, host.sigma_grid(model, "ddim_uniform", 2)
    split = patched.clone()
    split.set_additional_models("multigpu", [patched.clone()])
    spy = recorded(split)
    with pytest.raises(ValueError, match="^model: MultiGPU CFG Split spreads each step's conds over several GPUs"):
        sample(split, start, sigmas)
    assert spy.calls == []
    assert torch.isfinite(sample(patched, start, sigmas)).all()              # without it the model samples


def test_preview_features_refuses_non_finite_features_naming_the_model():
    import dataclasses
    from tve.nodes.measure_nodes import PreviewFeatures
    model, latent, x_T, inversion = inverted(frames=2, steps=2)
    broken = dataclasses.replace(inversion, latents=torch.full_like(inversion.latents, float("nan")))
    with pytest.raises(ValueError, match="^model: .* NaN or infinite in its features of the source at step 1"):
        PreviewFeatures.execute(model, broken, 0.5, "output latent", 2, 2)
    pca, field = PreviewFeatures.execute(model, inversion, 0.5, "output latent", 2, 2).result
    assert pca.shape == field.shape == (2, 16, 16, 3) and bool(torch.isfinite(pca).all())


def test_an_inversion_whose_model_gives_nan_stops_naming_the_model():
    from tve.engine.inversion import invert

    class NaNUNet(torch.nn.Module):
        dtype = torch.float32

        def forward(self, x, *args, **kwargs):
            return torch.full_like(x, float("nan"))

    model = make_tiny_model("sd15").clone()
    model.add_object_patch("diffusion_model", NaNUNet())
    with pytest.raises(ValueError, match=r"^model: .* NaN or infinite in the latent it inverted to at step 1 of 3"):
        invert(model, make_latent(2, 8, 8)["samples"], make_conditioning(), 3, "ddim_uniform")


def _nan_square():
    """A 64x48 mask with an 8x8 square of NaN: 64 of 3072 values."""
    mask = torch.ones(1, 48, 64)
    mask[:, 8:16, 8:16] = float("nan")
    return mask


@pytest.mark.parametrize("mask, error", [
    (torch.full((1, 48, 64), float("nan")), r"^latent: its noise_mask has 3072 of 3072 values NaN or infinite"),
    (_nan_square(), r"^latent: its noise_mask has 64 of 3072 values NaN or infinite"),
    (torch.ones(4, 48, 64), r"^latent: its noise_mask has 4 masks but the latent has 6 frames; expected one mask per "
                            r"frame \(6\) or one for all frames"),
], ids=["nan", "nan_64_of_3072", "4_masks_6_frames"])
def test_ddim_inversion_refuses_a_noise_mask_the_edit_could_not_use_naming_its_latent(mask, error):
    from tve.nodes.inversion_node import DDIMInversion
    latent = {**make_latent(6, 6, 8), "noise_mask": mask}
    with pytest.raises(ValueError, match=error):
        DDIMInversion.execute(make_tiny_model("sd15"), latent, make_conditioning(), 2, "ddim_uniform")


def test_an_edit_refuses_a_nan_noise_mask_set_after_the_inversion_naming_latent_image():
    model, latent, x_T, inversion = inverted(frames=3, steps=2)
    patched = injected(model, inversion)
    mask = torch.ones(1, 8, 8)
    mask[0, 0, :4] = float("nan")
    with pytest.raises(ValueError, match=r"^latent_image: its noise_mask has \d+ of \d+ values NaN or infinite"):
        sample(patched, x_T, inversion.sigmas, noise_mask=mask)
