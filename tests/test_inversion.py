"""DDIM inversion: the host-free sampler function, and the node inside the real ComfyUI sampling stack."""
import math
from typing import Sequence

import pytest
import torch

from tve.engine.inversion import FORMULAS, sample_ddim_inversion
from tve.tests.hosts import FAMILIES, make_conditioning, make_latent, make_tiny_model

real_host = pytest.mark.real_host


def gaussian_denoiser(s: float):
    """Exact D(x; σ) for data ~ N(0, s²) per dimension: the posterior mean x·s²/(s²+σ²)."""
    return lambda x, sigma: x * (s * s / (s * s + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2))


def euler_float64(x: torch.Tensor, sigmas: torch.Tensor, s: float, floor: float) -> torch.Tensor:
    """Independent float64 Euler walk of the probability-flow ODE dx/dσ = (x − D(x;σ))/σ on ``sigmas``."""
    x = x.double()
    for a, b in zip(sigmas[:-1].double().tolist(), sigmas[1:].double().tolist()):
        sig = max(a, floor)
        x = x + (b - a) * (x - x * s * s / (s * s + sig * sig)) / sig
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inversion_sampler_matches_float64_euler_on_gaussian_data(dtype):
    sigmas = torch.tensor([0.0, 0.03, 0.3, 1.0, 3.0, 14.6])
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    recorded = {}
    x_T = sample_ddim_inversion(gaussian_denoiser(1.0), x0, sigmas.to(dtype), sigma_floor=0.03,
                                record=lambda i, x: recorded.__setitem__(i, x))
    expected = euler_float64(x0, sigmas, 1.0, 0.03)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert x_T.dtype == dtype
    assert torch.allclose(x_T.double(), expected, rtol=tol, atol=tol * expected.abs().max())
    assert sorted(recorded) == list(range(len(sigmas)))
    assert torch.equal(recorded[0], x0) and torch.equal(recorded[len(sigmas) - 1], x_T)


def test_inversion_sampler_first_step_evaluates_at_the_floor_not_zero():
    seen = []

    def model(x, sigma):
        seen.append(float(sigma[0]))
        return torch.zeros_like(x)

    sample_ddim_inversion(model, torch.ones(1, 4, 2, 2), torch.tensor([0.0, 1.0, 2.0]), sigma_floor=0.0292)
    assert seen == pytest.approx([0.0292, 1.0])


# ---------------------------------------------------------------------------------------------- next_sigma
# The toy below is an EPS 'UNet' of Gaussian data N(0, s²) that sees DDPM's latent u = √ᾱ·x (ᾱ = 1/(1+σ²)):
# its noise estimate is known in closed form, so the inversion can be written out in DDPM's own variables.
def c_in(sigma):
    """DDPM's √ᾱ as a function of σ (σ_data = 1): what the UNet of an EPS model sees of a latent x at σ."""
    return 1 / (sigma * sigma + 1) ** 0.5


def toy_eps(u, sigma, s: float):
    """ε̂ of the toy UNet for input u at noise level σ: x = u/√ᾱ, posterior ε = x·σ/(s²+σ²)."""
    return u / c_in(sigma) * sigma / (s * s + sigma * sigma)


def toy_denoiser(s: float, seen: list | None = None):
    """D(x; σ) of the toy as a k-diffusion model (what comfy's EPS sampling makes of the UNet)."""
    def model(x, sigma):
        sig = sigma.reshape(-1, *[1] * (x.ndim - 1))
        if seen is not None:
            seen.append((x * c_in(sig), float(sigma[0])))
        return x - sig * toy_eps(x * c_in(sig), sig, s)
    return model


def ddpm_next_timestep_inversion(x0: torch.Tensor, sigmas: Sequence[float], s: float) -> torch.Tensor:
    """TokenFlow's inversion step restated in DDPM's variables, float64: from x_{t_i} (ᾱ_i) to x_{t_{i+1}} with the
    UNet's ε at the NEXT timestep, x̂_0 = (x_{t_i} − √(1−ᾱ_i)·ε)/√ᾱ_i, x_{t_{i+1}} = √ᾱ_{i+1}·x̂_0 + √(1−ᾱ_{i+1})·ε.
    Starts at σ = 0 (ᾱ = 1); returns the k-diffusion latent x_T = x_{t_T}/√ᾱ_T."""
    alphas = [1 / (1 + sg * sg) for sg in sigmas]
    x = x0.double()
    for i in range(len(sigmas) - 1):
        eps = toy_eps(x, torch.tensor(sigmas[i + 1], dtype=torch.float64), s)
        x0_hat = (x - (1 - alphas[i]) ** 0.5 * eps) / alphas[i] ** 0.5
        x = alphas[i + 1] ** 0.5 * x0_hat + (1 - alphas[i + 1]) ** 0.5 * eps
    return x / alphas[-1] ** 0.5


def sd_sigmas(steps: int) -> torch.Tensor:
    """Ascending σ of SD's DDIM timesteps 1 + i·⌊1000/steps⌋ (scaled-linear β 0.00085…0.012), from 0."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)[torch.arange(steps) * (1000 // steps) + 1]
    return torch.cat([torch.zeros(1, dtype=torch.float64), ((1 - alphas) / alphas).sqrt()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_sigma_inversion_is_ddpm_inversion_with_the_next_timesteps_noise(dtype):
    sigmas = sd_sigmas(10)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    recorded = {}
    x_T = sample_ddim_inversion(toy_denoiser(0.8), x0.to(dtype), sigmas.to(dtype), sigma_floor=0.0292,
                                formula="next_sigma", input_scale=c_in, record=recorded.__setitem__)
    expected = ddpm_next_timestep_inversion(x0.to(dtype), sigmas.to(dtype).tolist(), 0.8)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert x_T.dtype == dtype
    assert torch.allclose(x_T.double(), expected, rtol=tol, atol=tol * expected.abs().max())
    assert sorted(recorded) == list(range(len(sigmas))) and torch.equal(recorded[len(sigmas) - 1], x_T)


def test_next_sigma_feeds_the_unet_the_current_latent_at_the_next_sigma():
    sigmas = torch.tensor([0.0, 0.03, 0.5, 2.0, 9.0])
    seen, recorded = [], {}
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    sample_ddim_inversion(toy_denoiser(1.0, seen), x0, sigmas, sigma_floor=0.0292, formula="next_sigma",
                          input_scale=c_in, record=recorded.__setitem__)
    assert [sigma for _, sigma in seen] == pytest.approx(sigmas[1:].tolist())     # never σ_min, never σ_i
    for i, (unet_input, _) in enumerate(seen):                                     # √ᾱ_i·x_i: x_i as it is at σ_i
        assert torch.allclose(unet_input, recorded[i] * c_in(sigmas[i]), rtol=1e-6, atol=1e-6)


def euler_sampling(x: torch.Tensor, descending: torch.Tensor, model) -> torch.Tensor:
    """DDIM (Euler) sampling down ``descending`` to 0."""
    for hi, lo in zip(descending[:-1], descending[1:]):
        x = x + (lo - hi) * (x - model(x, hi.reshape(1))) / hi
    return x


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_next_sigma_reconstructs_gaussian_data_better_at_every_step_count(s):
    x0 = s * torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model = toy_denoiser(s)
    for steps in (10, 25, 50):
        sigmas = sd_sigmas(steps)
        errors = {}
        for formula in FORMULAS:
            x_T = sample_ddim_inversion(model, x0, sigmas, sigma_floor=float(sigmas[1]) * 0.5, formula=formula,
                                        input_scale=c_in)
            errors[formula] = float((euler_sampling(x_T, sigmas.flip(0), model) - x0).norm() / x0.norm())
        assert errors["next_sigma"] < 0.6 * errors["current_sigma"], (steps, errors)


def test_inversion_formula_is_checked():
    x, sigmas = torch.ones(1, 4, 2, 2), torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="formula"):
        sample_ddim_inversion(toy_denoiser(1.0), x, sigmas, sigma_floor=0.03, formula="previous_sigma")
    with pytest.raises(ValueError, match="input_scale"):
        sample_ddim_inversion(toy_denoiser(1.0), x, sigmas, sigma_floor=0.03, formula="next_sigma")


# ---------------------------------------------------------------------------------------------- real host
class AnalyticUNet(torch.nn.Module):
    """EPS 'UNet' of Gaussian data N(0, s²): returns ε̂ = x·σ/(s²+σ²) for the host's scaled input."""

    def __init__(self, model_sampling, s: float):
        super().__init__()
        self.model_sampling, self.s = model_sampling, s
        self.dtype = torch.float32

    def forward(self, xc, timesteps, context=None, control=None, transformer_options={}, **kwargs):
        sigma = self.model_sampling.sigma(timesteps).reshape(-1, 1, 1, 1).to(xc.dtype)
        x = xc * (sigma ** 2 + 1) ** 0.5
        return x * sigma / (self.s ** 2 + sigma ** 2)


def analytic_model(s: float = 1.0):
    model = make_tiny_model("sd15").clone()
    model.add_object_patch("diffusion_model", AnalyticUNet(model.get_model_object("model_sampling"), s))
    return model


def reconstruct(model, x_T, conditioning, sigmas):
    from tve.engine import host
    return host.sample(model, torch.zeros_like(x_T), 1.0, "euler", sigmas, conditioning, conditioning, x_T)


@real_host
def test_node_inversion_and_reconstruction_match_float64_euler_and_improve_with_steps():
    """The current_sigma formula is Euler in σ written out in float64."""
    from tve.engine.inversion import invert
    s = 1.0
    model = analytic_model(s)
    cond = make_conditioning("sd15")
    latent = make_latent(3, 8, 8)["samples"] / 0.18215 * s          # model space: data ~ N(0, s²)
    errors = []
    for steps in (10, 50):
        x_T, inversion = invert(model, latent, cond, steps, "ddim_uniform", formula="current_sigma")
        floor = float(model.get_model_object("model_sampling").sigma_min)
        x0 = latent * 0.18215
        expected_T = euler_float64(x0, inversion.sigmas.flip(0), s, floor)
        assert torch.allclose((x_T * 0.18215).double(), expected_T, rtol=1e-4, atol=1e-4 * expected_T.abs().max())
        recon = reconstruct(model, x_T, cond, inversion.sigmas)
        expected_recon = euler_float64(expected_T, inversion.sigmas, s, floor) / 0.18215
        assert torch.allclose(recon.double(), expected_recon, rtol=1e-3, atol=1e-3 * expected_recon.abs().max())
        errors.append(float((recon - latent).norm() / latent.norm()))
    assert errors[1] < errors[0] * 0.5, errors


@real_host
def test_node_next_sigma_inversion_is_ddpm_inversion_with_the_next_timesteps_noise():
    from tve.nodes.inversion_node import DDIMInversion
    s = 0.8
    model = analytic_model(s)
    latent = make_latent(2, 8, 8)["samples"] / 0.18215 * s          # model space: data ~ N(0, s²)
    x_T, inversion, sigmas = DDIMInversion.execute(model, {"samples": latent}, make_conditioning("sd15"), 10,
                                                   "ddim_uniform", 1, "next_sigma").result
    expected = ddpm_next_timestep_inversion(latent * 0.18215, sigmas.flip(0).tolist(), s)
    assert torch.allclose((x_T["samples"] * 0.18215).double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    current, _ = DDIMInversion.execute(model, {"samples": latent}, make_conditioning("sd15"), 10, "ddim_uniform", 1,
                                       "current_sigma").result[:2]
    assert not torch.allclose(current["samples"], x_T["samples"], rtol=1e-3)
    with pytest.raises(ValueError, match="formula"):
        DDIMInversion.execute(model, {"samples": latent}, make_conditioning("sd15"), 10, "ddim_uniform", 1, "tve")


@real_host
@pytest.mark.parametrize("family", FAMILIES)
def test_inversion_keys_are_the_sampling_grid_sigmas_and_float32_latents_are_kept_in_float32(family):
    from tve.engine import host
    from tve.nodes.inversion_node import DDIMInversion
    model = make_tiny_model(family)
    latent = make_latent(4, 16, 16)
    x_T, inversion, sigmas = DDIMInversion.execute(model, latent, make_conditioning(family), 4, "ddim_uniform").result
    grid = host.sigma_grid(model, "ddim_uniform", 4)
    assert torch.equal(inversion.sigmas, grid) and torch.equal(sigmas, grid)
    assert host.model_dtype(model) == torch.float32
    assert inversion.latents.shape == (5, 4, 4, 16, 16) and inversion.latents.dtype == torch.float32
    assert inversion.latents.device == host.intermediate_device()
    ms = model.get_model_object("model_sampling")
    assert torch.allclose(inversion.latents[-1], model.model.process_latent_in(latent["samples"]))
    assert torch.allclose(inversion.latents[0], model.model.process_latent_in(x_T["samples"]), atol=1e-5)
    assert inversion.family == host.model_family(model) and inversion.frames == 4
    assert float(ms.sigma_min) > 0


@real_host
@pytest.mark.parametrize("family", FAMILIES)
def test_next_sigma_shows_the_unet_each_latent_as_it_is_at_its_own_sigma(family):
    """TokenFlow's step, through the host's sampling: the diffusion model's input at step i is the latent x_i as
    the model would see it at σ_i (x_0 itself first), while its timestep is that of σ_{i+1}."""
    from tve.engine import host
    from tve.engine.inversion import invert
    model = make_tiny_model(family)
    calls = []
    spy = model.clone()
    host.add_wrapper(spy, host.DIFFUSION_MODEL, "test_spy", lambda executor, *args, **kw: (
        calls.append((args[0].clone(), float(args[5]["sigmas"].reshape(-1)[0]))), executor(*args, **kw))[1])
    latent = make_latent(2, 8, 8)["samples"]
    _, inversion = invert(spy, latent, make_conditioning(family), 3, "ddim_uniform", formula="next_sigma")
    ascending = inversion.sigmas.flip(0)                                     # 0, σ_1, σ_2, σ_3
    latents = inversion.latents.flip(0)                                      # x_0 … x_3 (model space)
    assert [sigma for _, sigma in calls] == pytest.approx(ascending[1:].tolist(), rel=1e-5)
    c_in = host.input_scale(model)
    for i, (unet_input, _) in enumerate(calls):
        expected = latents[i].float() * c_in(ascending[i])
        assert torch.allclose(unet_input.float(), expected, rtol=1e-5, atol=1e-5), i
    assert torch.equal(calls[0][0].float(), latents[0].float())              # c_in(0) = 1: x_0 as it is


@real_host
def test_inversion_rejects_too_few_steps_and_leaves_the_artists_model_unpatched():
    from tve.engine.inversion import invert
    model = make_tiny_model("sd15")
    before = repr(model.model_options)
    with pytest.raises(ValueError, match="steps"):
        invert(model, make_latent(2, 8, 8)["samples"], make_conditioning(), 1, "ddim_uniform")
    invert(model, make_latent(2, 8, 8)["samples"], make_conditioning(), 2, "ddim_uniform")
    assert repr(model.model_options) == before


@real_host
def test_inversion_from_another_family_or_grid_is_refused():
    from tve.engine import validation
    from tve.engine.inversion import invert
    _, inversion = invert(make_tiny_model("sd15"), make_latent(2, 8, 8)["samples"], make_conditioning(), 3,
                          "ddim_uniform")
    with pytest.raises(ValueError, match="SD15"):
        validation.inversion_fits_model(inversion, make_tiny_model("sdxl"))
    with pytest.raises(ValueError, match="latent"):
        validation.inversion_latent(inversion, torch.zeros(2, 4, 8, 16))
    with pytest.raises(ValueError, match="σ grid"):
        inversion.index_of(float(inversion.sigmas[1]) * 1.1)
    assert inversion.index_of(float(inversion.sigmas[1])) == 1
    assert math.isfinite(float(inversion.latents.abs().max()))


@real_host
def test_subdivided_ddim_uniform_grid_is_part_of_the_finer_ddim_uniform_grid():
    # diffusers' DDIM timesteps for n·m steps contain those of n steps and every m-th between them.
    from tve.engine import host
    model = make_tiny_model("sd15")
    coarse = host.sigma_grid(model, "ddim_uniform", 5)
    fine = host.subdivided_grid(model, coarse, 10)
    reference = host.sigma_grid(model, "ddim_uniform", 50)
    assert len(fine) == 4 * 10 + 1 + 1                       # 4 nonzero intervals split, the step to 0 kept
    assert torch.equal(fine[torch.isin(fine, coarse)], coarse)
    for sigma in fine.tolist():
        assert torch.isclose(reference, torch.tensor(sigma), rtol=1e-5).any(), sigma


@real_host
def test_finer_inversion_keeps_the_source_on_the_sampling_grid_and_x_T_at_its_top():
    from tve.engine import host
    from tve.engine.inversion import invert
    model = make_tiny_model("sd15")
    calls = []
    spy = model.clone()
    host.add_wrapper(spy, host.DIFFUSION_MODEL, "test_spy", lambda executor, *args, **kw: (
        calls.append(float(args[5]["sigmas"].reshape(-1)[0])), executor(*args, **kw))[1])
    latent = make_latent(2, 8, 8)["samples"]
    x_T, inversion = invert(spy, latent, make_conditioning(), 4, "ddim_uniform", multiple=5, formula="current_sigma")
    grid = host.sigma_grid(model, "ddim_uniform", 4)
    assert torch.equal(inversion.sigmas, grid)
    assert inversion.latents.shape[0] == len(grid)
    assert len(calls) == 3 * 5 + 1                           # the fine walk: 5 steps per nonzero interval
    assert calls[-1] == pytest.approx(float(host.subdivided_grid(model, grid, 5)[1]), rel=1e-5)
    assert torch.allclose(inversion.latents[0].float(), host.process_latent_in(model, x_T).float(), atol=1e-5)
    assert torch.allclose(inversion.latents[-1].float(), host.process_latent_in(model, latent).float(), atol=1e-6)
    with pytest.raises(ValueError, match="inversion_multiple"):
        invert(model, latent, make_conditioning(), 4, "ddim_uniform", multiple=0)


@real_host
def test_finer_inversion_reconstructs_the_trained_models_clip_more_faithfully():
    from tve.engine import host
    from tve.engine.inversion import invert
    from tve.tests.trained_model import load_trained_model, trained_conditioning
    from tve.tools.train_test_model import HELD_OUT_SEED, render_frames
    model = load_trained_model()
    cond = trained_conditioning("source")
    raw = render_frames(1, 2, HELD_OUT_SEED + 3)
    errors = []
    for multiple in (1, 5):       # current_sigma: next_sigma at 1x is already as close (bench/inversion.py)
        x_T, inversion = invert(model, raw, cond, 10, "ddim_uniform", multiple, formula="current_sigma")
        recon = host.sample(model, torch.zeros_like(x_T), 1.0, "euler", inversion.sigmas, cond, cond, x_T)
        errors.append(float((recon - raw).norm() / raw.norm()))
    assert errors[1] < 0.8 * errors[0], errors
@pytest.mark.parametrize("weights, kept", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                           (torch.bfloat16, torch.float16), (torch.float8_e4m3fn, torch.float16),
                                           (torch.float8_e5m2, torch.float16)])
def test_source_latents_are_never_stored_below_fp16_precision(weights, kept):
    from tve.engine.inversion import storage_dtype
    assert storage_dtype(weights) == kept
    assert torch.finfo(storage_dtype(weights)).eps <= torch.finfo(torch.float16).eps


@real_host
def test_inversion_of_a_low_precision_model_keeps_the_source_to_fp16_precision(monkeypatch):
    from tve.engine import host
    from tve.engine.inversion import invert
    model = make_tiny_model("sd15")
    latent = make_latent(2, 8, 8)["samples"]
    _, exact = invert(model, latent, make_conditioning(), 3, "ddim_uniform")
    monkeypatch.setattr(host, "model_dtype", lambda m: torch.float8_e4m3fn)     # what UNETLoader's fp8 option reports
    _, stored = invert(model, latent, make_conditioning(), 3, "ddim_uniform")
    assert stored.latents.dtype == torch.float16
    error = (stored.latents.float() - exact.latents).abs() / exact.latents.abs().clamp(min=1e-2)
    assert float(error.max()) <= 2 ** -11                                       # fp16 rounding, not fp8's 2^-4
