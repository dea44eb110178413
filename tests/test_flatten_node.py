"""TVE_ApplyFLATTEN: node logic on both hosts; inversion + edit on the real host."""
import pytest
import torch

from tve.flow.estimate import FlowField
from tve.flow.trajectories import build_trajectories
from tve.engine import host, passes
from tve.engine.run import SamplingRun
from tve.engine.stack import stack_of
from tve.nodes.edit_nodes import ApplyFLATTEN
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
    flatten = stack_of(patched).attention_chain(next(iter(replaces)))[-1]
    top = min(b.level for b in host.attention_blocks(model))
    assert flatten.grids == {(-(-8 // 2 ** top), -(-8 // 2 ** top))}
    assert "patches_replace" not in model.model_options["transformer_options"]


def block_call(trajectories, chunks_pattern, dtype, grid_hw=(8, 8), channels=64, heads=2):
    """q, k, v and extra_options of one attention call whose CFG chunk c holds tokens number pattern[c]."""
    frames, tokens = trajectories.frames, grid_hw[0] * grid_hw[1]
    kinds = [[torch.randn(frames, tokens, channels, generator=torch.Generator().manual_seed(10 * i + j)).to(dtype)
              for j in range(3)] for i in range(max(chunks_pattern) + 1)]
    q, k, v = (torch.cat([kinds[p][j] for p in chunks_pattern]) for j in range(3))
    extra = {"n_heads": heads, "cond_or_uncond": list(range(len(chunks_pattern))),
             "activations_shape": (len(chunks_pattern) * frames, channels, *grid_hw)}
    return q, k, v, extra


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk", ["dense_output", "projections"])
@pytest.mark.parametrize("pattern", [[0, 0], [0, 1]])
def test_equal_cfg_chunks_are_computed_once_with_the_result_of_computing_every_chunk(monkeypatch, dtype, qk, pattern):
    import tve.engine.flatten as flatten_node
    trajectories = trajectories_for(6)
    model = apply(make_tiny_model("sd15"), trajectories, grids="all", qk=qk)
    (flatten,) = stack_of(model).methods
    q, k, v, extra = block_call(trajectories, pattern, dtype)
    computed = []
    dense = flatten_node.dense_attention

    def spy(q_, k_, v_, heads, chunks, **kwargs):
        computed.append(chunks)
        return dense(q_, k_, v_, heads, chunks, **kwargs)

    monkeypatch.setattr(flatten_node, "dense_attention", spy)
    run = SamplingRun(stack=stack_of(model))
    once = flatten.attend(q, k, v, extra, run, inner=None)
    monkeypatch.setattr(flatten_node, "once_per_distinct_chunk", lambda attend, q_, k_, v_, chunks:
                        attend(q_, k_, v_, chunks))
    every = flatten.attend(q, k, v, extra, run, inner=None)
    assert computed == [len(set(pattern)), len(pattern)]
    assert once.dtype == dtype and once.shape == v.shape
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert torch.allclose(once.float(), every.float(), **tolerance)


def test_bad_choices_are_clear_errors():
    model = make_tiny_model("sd15")
    with pytest.raises(ValueError, match="token_grids"):
        apply(model, trajectories_for(4), grids="some")
    with pytest.raises(ValueError, match="qk_source"):
        apply(model, trajectories_for(4), qk="values")


# ---------------------------------------------------------------------------------------------- real host
def sample(model, x, sigmas, family, cfg=4.0):
    return host.sample(model, torch.zeros_like(x), cfg, "euler", sigmas, make_conditioning(family, 5),
                       make_conditioning(family, 6), x)


@pytest.mark.real_host
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qk", ["dense_output", "projections"])
def test_inversion_and_edit_with_flatten_run_for_16_frames(family, qk):
    from tve.engine.injection import apply_feature_injection
    from tve.engine.inversion import invert
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
    split = sample(cond_chunks_split(model), x, sigmas, "sd15")
    assert torch.allclose(together, split, atol=1e-4 * together.abs().max())


@pytest.mark.real_host
def test_flatten_edit_computes_the_first_blocks_equal_cfg_chunks_once_and_is_unchanged_by_it(monkeypatch):
    """Before any text enters the UNet, cond and uncond hold the same tokens: that block is computed once per step,
    and the edit equals computing every chunk."""
    import tve.engine.flatten as flatten_node
    from tve.engine.injection import apply_feature_injection
    from tve.engine.inversion import invert
    model = apply(make_tiny_model("sd15"), trajectories_for(8))
    x_T, inversion = invert(model, make_latent(8, 8, 8)["samples"], make_conditioning("sd15"), 3, "ddim_uniform")
    edit = apply_feature_injection(model, inversion, 0.5, 0.8, "flatten", "sigma-matched")
    computed = []
    shared = flatten_node.once_per_distinct_chunk

    def spy(attend, q, k, v, chunks):
        def counted(q_, k_, v_, n):
            computed.append((chunks, n))
            return attend(q_, k_, v_, n)
        return shared(counted, q, k, v, chunks)

    monkeypatch.setattr(flatten_node, "once_per_distinct_chunk", spy)
    once = sample(edit, x_T, inversion.sigmas, "sd15")
    monkeypatch.setattr(flatten_node, "once_per_distinct_chunk", lambda attend, q, k, v, chunks:
                        attend(q, k, v, chunks))
    every = sample(edit, x_T, inversion.sigmas, "sd15")
    steps = len(inversion.sigmas) - 1
    assert computed.count((2, 1)) == steps                   # the first block, every step of the edit pass
    assert computed.count((2, 2)) > 0                        # after the text, cond and uncond differ
    assert torch.allclose(once, every, atol=1e-5 * every.abs().max())


@pytest.mark.real_host
def test_trajectories_of_another_latent_size_or_frame_count_are_refused():
    model = apply(make_tiny_model("sd15"), trajectories_for(8))
    sigmas = host.sigma_grid(model, "ddim_uniform", 2)
    with pytest.raises(ValueError, match="trajectories"):
        sample(model, make_latent(8, 8, 16)["samples"], sigmas, "sd15")
    with pytest.raises(ValueError, match="trajectories"):
        sample(model, make_latent(6, 8, 8)["samples"], sigmas, "sd15")
