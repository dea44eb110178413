"""PnP feature injection from the live source branch, on the real host with tiny models of all three families."""
import pytest
import torch

from tve.tests.hosts import FAMILIES, make_conditioning, make_latent, make_tiny_model

pytestmark = pytest.mark.real_host


def run_edit(model, x_T, positive, negative, sigmas, cfg=1.0):
    from tve.engine import host
    return host.sample(model, torch.zeros_like(x_T), cfg, "euler", sigmas, positive, negative, x_T)


class UNetInputs:
    """DIFFUSION_MODEL wrapper that records, per UNet call, the pass and the model-space latent it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        from tve.engine.run import current_pass
        sigma = transformer_options["sigmas"].reshape(-1)[0].float()
        self.calls.append((current_pass(transformer_options).value, float(sigma),
                           (x.float() * (sigma ** 2 + 1) ** 0.5).clone()))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def inverted(family="sd15", frames=3, steps=4):
    from tve.engine.inversion import invert
    model = make_tiny_model(family)
    cond = make_conditioning(family, seed=1)
    x_T, inversion = invert(model, make_latent(frames, 8, 8)["samples"], cond, steps, "ddim_uniform")
    return model, cond, x_T, inversion


@pytest.mark.parametrize("order", ["sigma-matched", "clean-first"])
def test_source_pass_at_step_i_reads_the_latent_stored_for_its_sigma(order):
    from tve.engine import host
    from tve.engine.injection import apply_feature_injection
    model, cond, x_T, inversion = inverted(steps=4)
    patched = apply_feature_injection(model, inversion, 1.0, 1.0, "tokenflow", order)
    spy = UNetInputs()
    host.add_wrapper(patched, host.DIFFUSION_MODEL, "test_spy", spy)
    run_edit(patched, x_T, make_conditioning(seed=5), make_conditioning(seed=6), inversion.sigmas)
    sources = [c for c in spy.calls if c[0] == "source"]
    edits = [c for c in spy.calls if c[0] == "edit"]
    assert len(sources) == len(edits) == 4
    n = len(inversion.sigmas) - 1
    sigma_min = float(model.get_model_object("model_sampling").sigma_min)
    for step, (_, sigma, x) in enumerate(sources):
        i = step if order == "sigma-matched" else n - step
        assert sigma == pytest.approx(max(float(inversion.sigmas[i]), sigma_min), rel=1e-5)
        assert torch.allclose(x, inversion.latents[i].float(), atol=1e-4)
        assert edits[step][1] == pytest.approx(float(inversion.sigmas[step]), rel=1e-5)


def test_injection_stops_at_its_schedule_fraction():
    from tve.engine import host
    from tve.engine.injection import apply_feature_injection
    model, cond, x_T, inversion = inverted(steps=4)
    patched = apply_feature_injection(model, inversion, 0.25, 0.5, "tokenflow", "sigma-matched")
    spy = UNetInputs()
    host.add_wrapper(patched, host.DIFFUSION_MODEL, "test_spy", spy)
    run_edit(patched, x_T, make_conditioning(seed=5), make_conditioning(seed=6), inversion.sigmas, cfg=2.0)
    assert [c[0] for c in spy.calls] == ["source", "edit", "source", "edit", "edit", "edit"]


@pytest.mark.parametrize("family", FAMILIES)
def test_injecting_the_source_into_itself_is_the_identity(family):
    # At the first step the edit starts from x_T, which is the source latent at σ_0: with the source prompt the
    # source pass and the edit pass see the same input, so injecting the source's features changes nothing.
    # (Later steps differ only because a random-weight model cannot invert exactly.)
    from tve.engine.injection import apply_feature_injection
    model, cond, x_T, inversion = inverted(family, steps=6)
    first = inversion.sigmas[:2]
    plain = run_edit(model, x_T, cond, cond, first)
    patched = apply_feature_injection(model, inversion, 1.0, 1.0, "tokenflow", "sigma-matched")
    assert torch.allclose(run_edit(patched, x_T, cond, cond, first), plain, atol=1e-5 * plain.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_injection_changes_an_edit_with_another_prompt_only_while_active(family):
    # (Whether it changes it *towards the source* is a question for a trained model: see bench/consistency.py.)
    from tve.engine.injection import apply_feature_injection
    model, cond, x_T, inversion = inverted(family, steps=6)
    other = make_conditioning(family, seed=9)
    free = run_edit(model, x_T, other, other, inversion.sigmas)
    off = apply_feature_injection(model, inversion, 0.0, 0.0, "tokenflow", "sigma-matched")
    on = apply_feature_injection(model, inversion, 1.0, 1.0, "tokenflow", "sigma-matched")
    assert torch.equal(run_edit(off, x_T, other, other, inversion.sigmas), free)
    assert not torch.allclose(run_edit(on, x_T, other, other, inversion.sigmas), free, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_map_to_decoder_blocks_of_each_family(family):
    from tve.engine.injection import injection_targets
    model = make_tiny_model(family)
    for preset in ("tokenflow", "flatten"):
        attn, conv = injection_targets(model, preset)
        assert all(b.key[0] == "output" for b in attn)
        assert conv and all(isinstance(i, int) for i in conv)
    attn, conv = injection_targets(model, "tokenflow")
    first_decoder_attention = min(b.key[1] for b in attn) - 1
    assert first_decoder_attention >= 0 and conv == [3]


def test_injection_refuses_an_inversion_of_another_family_and_a_foreign_sigma_grid():
    from tve.engine import host
    from tve.engine.injection import apply_feature_injection
    model, cond, x_T, inversion = inverted("sd15", steps=4)
    with pytest.raises(ValueError, match="inversion"):
        apply_feature_injection(make_tiny_model("sdxl"), inversion, 0.5, 0.8, "tokenflow", "sigma-matched")
    patched = apply_feature_injection(model, inversion, 0.5, 0.8, "tokenflow", "sigma-matched")
    other_grid = host.sigma_grid(model, "karras", 4)
    with pytest.raises(ValueError, match="σ grid"):
        run_edit(patched, x_T, cond, cond, other_grid)
    assert "patches" not in model.model_options["transformer_options"]
    assert not model.get_wrappers(host.CALC_COND_BATCH, host.WRAPPER_KEY)
