"""Every core sampler with PnP injection and TokenFlow: the source pass runs at the σ of every model evaluation,
on the inversion's grid or between its points (dpm_2, SDE and adaptive samplers), with the source latent the
inversion's own Euler step gives there. Real host, tiny SD1.5 model."""
import pytest
import torch

from tve.tests.hosts import REAL_HOST, make_conditioning, make_latent, make_tiny_model

pytestmark = pytest.mark.real_host

FRAMES, SIZE, STEPS = 2, 8, 3


def sampler_names():
    """Every core sampler (the stand-in host has none; these tests skip there)."""
    if not REAL_HOST:
        return ["euler"]
    from tve.engine import host
    return host.sampler_names()


@pytest.fixture(scope="module")
def inverted():
    from tve.engine.inversion import invert
    model = make_tiny_model("sd15")
    cond = make_conditioning("sd15", seed=1)
    x_T, inversion = invert(model, make_latent(FRAMES, SIZE, SIZE)["samples"], cond, STEPS, "ddim_uniform")
    return model, x_T, inversion


class SourceInputs:
    """Per UNet call: the pass, its σ and the model-space latent it was given (EPS: x·sqrt(σ²+1))."""

    def __init__(self, model):
        from tve.engine import host
        self.calls = []
        host.add_wrapper(model, host.DIFFUSION_MODEL, "test_spy", self)

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        from tve.engine.run import current_pass
        sigma = float(transformer_options["sigmas"].reshape(-1)[0])
        self.calls.append((current_pass(transformer_options).value, sigma, (x.float() * (sigma ** 2 + 1) ** 0.5)))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def interpolated(inversion, sigma):
    grid = inversion.sigmas
    i = int((grid >= sigma).sum()) - 1
    if abs(float(grid[i]) - sigma) < 1e-6 * sigma:
        return inversion.latents[i].float()
    f = (float(grid[i]) - sigma) / float(grid[i] - grid[i + 1])
    return (1 - f) * inversion.latents[i].float() + f * inversion.latents[i + 1].float()


def edit(model, x_T, sigmas, sampler):
    from tve.engine import host
    return host.sample(model, torch.zeros_like(x_T), 2.0, sampler, sigmas, make_conditioning("sd15", 5),
                       make_conditioning("sd15", 6), x_T, seed=0)


@pytest.mark.parametrize("feature", ["injection", "TokenFlow"])
@pytest.mark.parametrize("sampler", sampler_names())
def test_every_core_sampler_runs_with_the_source_at_each_evaluated_sigma(inverted, sampler, feature):
    from tve.engine.injection import apply_feature_injection
    from tve.engine.tokenflow import apply_tokenflow
    model, x_T, inversion = inverted
    patched = (apply_feature_injection(model, inversion, 1.0, 1.0, "tokenflow", "sigma-matched")
               if feature == "injection" else apply_tokenflow(model, inversion, 2, 3, "paper", 1.0, 1.0))
    spy = SourceInputs(patched)
    out = edit(patched, x_T, inversion.sigmas.clone(), sampler)          # some samplers write into sigmas
    assert torch.isfinite(out).all()
    per_step = 3 if feature == "TokenFlow" else 2
    names = [c[0] for c in spy.calls]
    assert names == (["source", "keyframes", "edit"] if feature == "TokenFlow" else ["source", "edit"]) * (
        len(names) // per_step)
    for source, *_, last in zip(spy.calls[::per_step], spy.calls[per_step - 1::per_step]):
        assert source[1] == pytest.approx(last[1], rel=1e-5)
        assert torch.allclose(source[2], interpolated(inversion, source[1]), atol=1e-4)


def test_samplers_that_evaluate_between_grid_points_read_the_inversions_euler_step(inverted):
    # dpm_2 evaluates at the geometric midpoint of each step: there the source must be the straight line in σ
    # that the DDIM inversion walked from the grid σ below it.
    from tve.engine.injection import apply_feature_injection
    model, x_T, inversion = inverted
    patched = apply_feature_injection(model, inversion, 1.0, 1.0, "tokenflow", "sigma-matched")
    spy = SourceInputs(patched)
    edit(patched, x_T, inversion.sigmas, "dpm_2")
    grid = inversion.sigmas
    off_grid = [c for c in spy.calls if c[0] == "source" and not torch.isclose(grid, torch.tensor(c[1]), rtol=1e-4).any()]
    assert len(off_grid) == STEPS - 1, (grid, [c[1] for c in spy.calls])
    for _, sigma, x in off_grid:
        i = int((grid >= sigma).sum()) - 1
        lo, hi = float(grid[i + 1]), float(grid[i])
        assert lo < sigma < hi
        assert not torch.allclose(x, inversion.latents[i].float(), atol=1e-3)


def test_a_schedule_off_the_inversion_grid_is_refused_before_any_step(inverted):
    from tve.engine import host
    from tve.engine.tokenflow import apply_tokenflow
    model, x_T, inversion = inverted
    patched = apply_tokenflow(model, inversion, 2, 3, "paper", 1.0, 1.0)
    spy = SourceInputs(patched)
    with pytest.raises(ValueError, match="σ grid"):
        edit(patched, x_T, host.sigma_grid(model, "karras", STEPS), "euler")
    assert spy.calls == []
