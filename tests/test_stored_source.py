"""FLATTEN's stored-feature mode (issue 25 item 2): DDIM Inversion keeps the features FLATTEN's PnP blocks inject,
at the sampling grid's σ, and the edit replays them instead of a live source pass.

The stored features are the live source pass's (the same UNet call: the source latent x_i at σ_i, the source
conditioning, FLATTEN's attention and pooled norms over the same frames), so an edit with them is bit-identical to
the live one, on SD1.5-, SD2- and SDXL-layout models, with either inversion formula and in frame windows; it makes
no source call at all; the inversion adds only the calls its formula lacks (``current_sigma``: the top σ;
``next_sigma``: every stored σ, each ended after the last feature kept) and its own result is unchanged. Readers the
stored features do not cover are refused when their node runs, and a sampler or windowing that would need features
that were not kept is refused when sampling starts, naming what to change."""
import pytest
import torch

from tve.tests.hosts import FAMILIES, make_conditioning, make_latent
from tve.tests.test_flatten_node import trajectories_for
from tve.tests.test_source_exit import PointsRun, model_of

pytestmark = pytest.mark.real_host

FRAMES, STEPS = 4, 4              # attention injection at steps 0-1, ResBlock injection at 0-2: stored_steps 0.75


def flatten_model(family, source_features, windows=None):
    from tve.engine.flatten import apply_flatten
    from tve.engine.stack import apply_frame_windows
    model = model_of(family)
    if windows is not None:
        model = apply_frame_windows(model, *windows)
    return apply_flatten(model, trajectories_for(FRAMES), "highest resolution", "dense_output", True,
                         source_features, 0.75)


def inverted(model, family, formula="next_sigma", multiple=1):
    from tve.engine.inversion import invert
    return invert(model, make_latent(FRAMES, 8, 8)["samples"], make_conditioning(family, seed=1), STEPS,
                  "ddim_uniform", multiple, formula)


def injected(model, inversion, attn_end=0.5, conv_end=0.75, preset="flatten", order="sigma-matched"):
    from tve.engine.injection import apply_feature_injection
    return apply_feature_injection(model, inversion, attn_end, conv_end, preset, order)


def edit(model, x_T, sigmas, family, sampler="euler"):
    from tve.engine import host
    return host.sample(model, torch.zeros_like(x_T), 4.0, sampler, sigmas, make_conditioning(family, 5),
                       make_conditioning(family, 6), x_T)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("formula", ["next_sigma", "current_sigma"])
def test_an_edit_replaying_stored_features_is_bit_identical_to_the_live_source_pass_and_runs_none(family, formula):
    live_model = flatten_model(family, "live")
    x_T, live = inverted(live_model, family, formula)
    stored_model = flatten_model(family, "stored")
    x_T_stored, stored = inverted(stored_model, family, formula)
    assert torch.equal(x_T, x_T_stored) and torch.equal(live.latents, stored.latents)   # the inversion is unchanged
    assert live.stored is None and stored.stored is not None
    reference = edit(injected(live_model, live), x_T, live.sigmas, family)
    replaying = injected(stored_model, stored)
    ran = PointsRun(replaying)
    assert torch.equal(edit(replaying, x_T, stored.sigmas, family), reference)
    assert ran.of("source") == [] and len(ran.of("edit")) == STEPS                  # no source call, one per step


@pytest.mark.parametrize("formula", ["next_sigma", "current_sigma"])
def test_a_finer_inversion_stores_the_features_at_the_sampling_grids_sigma(formula):
    """inversion_multiple 2: the inversion walks 8 steps and keeps the source (and its features) at the 4-step
    sampling grid's σ only."""
    live_model, stored_model = flatten_model("sd15", "live"), flatten_model("sd15", "stored")
    x_T, live = inverted(live_model, "sd15", formula, multiple=2)
    _, stored = inverted(stored_model, "sd15", formula, multiple=2)
    assert {step for step, _ in stored.stored.kept} == {0, 1, 2}
    assert torch.equal(edit(injected(stored_model, stored), x_T, stored.sigmas, "sd15"),
                       edit(injected(live_model, live), x_T, live.sigmas, "sd15"))


@pytest.mark.parametrize("windows", [(2, 0), (3, 1)])
def test_stored_features_are_kept_per_frame_window_and_replay_bit_identically(windows):
    live_model = flatten_model("sd15", "live", windows)
    x_T, live = inverted(live_model, "sd15")
    stored_model = flatten_model("sd15", "stored", windows)
    _, stored = inverted(stored_model, "sd15")
    held = {ids for _, ids in stored.stored.kept}
    assert len(held) > 1 and set().union(*map(set, held)) == set(range(FRAMES))       # several windows, every frame
    assert torch.equal(edit(injected(stored_model, stored), x_T, stored.sigmas, "sd15"),
                       edit(injected(live_model, live), x_T, live.sigmas, "sd15"))


@pytest.mark.parametrize("formula, calls", [("current_sigma", STEPS + 1), ("next_sigma", STEPS + 3)])
def test_the_inversion_adds_only_the_calls_its_formula_lacks_and_keeps_what_injection_reads(formula, calls):
    """3 of 4 steps kept: current_sigma evaluates (x_i, σ_i) itself except at the top σ; next_sigma never does,
    so each kept σ costs one call, ended right after the last feature kept."""
    from tve.engine import host
    from tve.engine.injection import injection_targets
    model = flatten_model("sd15", "stored")
    ran = PointsRun(model)
    with host.forward_hooks(ran.hooks):
        _, inversion = inverted(model, "sd15", formula)
    kept = inversion.stored
    assert len(ran.of("inversion")) == calls and kept.steps == 3
    attn_blocks, conv_ids = injection_targets(model, "flatten")
    assert kept.reads.tokens == {b.key for b in attn_blocks} and kept.reads.resblocks == set(conv_ids)
    assert set(kept.kept) == {(step, tuple(range(FRAMES))) for step in range(3)}
    whole = max(ran.of("inversion"), key=len)
    ended = [points for points in ran.of("inversion") if len(points) < len(whole)]
    assert len(ended) == calls - STEPS and all(points[-1] <= kept.last_point for points in ended)
    for features in kept.kept.values():
        assert set(features.tokens) == kept.reads.tokens and set(features.resblocks) == kept.reads.resblocks
        assert all(t.shape[0] == FRAMES and t.device == host.intermediate_device() for t in features.tokens.values())
    assert kept.nbytes == 3 * sum(t.numel() * t.element_size() for f in [next(iter(kept.kept.values()))]
                                  for t in (*f.tokens.values(), *f.resblocks.values()))
    assert f"3 of 4 steps, 4 frames: {kept.nbytes / (1 << 20):.1f} MiB ({kept.nbytes / FRAMES / (1 << 20):.2f} MiB per " \
           "frame)" in kept.describe(FRAMES, STEPS)


def test_readers_the_stored_features_do_not_cover_are_refused_when_their_node_runs():
    from tve.engine.methods import Refused
    from tve.nodes.edit_nodes import ApplyTokenFlow
    model = flatten_model("sd15", "stored")
    _, inversion = inverted(model, "sd15")
    with pytest.raises(Refused, match=r"^inversion: keeps .* first 3 of 4 steps .*Apply Feature Injection \(TVE\) "
                                      "reads others.*block_preset flatten"):
        injected(model, inversion, preset="tokenflow")
    with pytest.raises(Refused, match=r"^conv_injection_end: .* step 4 of 4.*end it by 0\.75.*stored_steps"):
        injected(model, inversion, conv_end=1.0)
    with pytest.raises(Refused, match=r"^attention_injection_end: .* step 4 of 4"):
        injected(model, inversion, attn_end=1.0)
    with pytest.raises(Refused, match="^order: clean-first.*use sigma-matched"):
        injected(model, inversion, order="clean-first")
    with pytest.raises(Refused, match=r"^inversion: .*Apply TokenFlow \(TVE\) reads others.*source_features to live"):
        ApplyTokenFlow.execute(model, inversion, 2, 7, "paper", 0.5, 0.75)
    injected(model, inversion, attn_end=0.75, conv_end=0.75)                           # covered: accepted


def test_a_sampler_between_grid_sigmas_or_other_frame_windows_is_refused_naming_the_fix():
    from tve.engine.stack import apply_frame_windows
    model = flatten_model("sd15", "stored")
    x_T, inversion = inverted(model, "sd15")
    with pytest.raises(ValueError, match="^sampler: .*between two σ of the inversion's grid.*source_features to live"):
        edit(injected(model, inversion), x_T, inversion.sigmas, "sd15", sampler="dpm_2")
    with pytest.raises(ValueError, match="^inversion: .*frame windows 0-3 but this edit's pass holds frames 0-1"):
        edit(apply_frame_windows(injected(model, inversion), 2, 0), x_T, inversion.sigmas, "sd15")


def test_bad_settings_are_clear_errors():
    from tve.engine.flatten import apply_flatten
    model = model_of("sd15")
    with pytest.raises(ValueError, match="source_features"):
        apply_flatten(model, trajectories_for(FRAMES), "highest resolution", "dense_output", True, "cached")
    with pytest.raises(ValueError, match="stored_steps"):
        apply_flatten(model, trajectories_for(FRAMES), "highest resolution", "dense_output", True, "stored", 1.5)
