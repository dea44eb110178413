"""TVE_ApplyFLATTEN: node logic on both hosts; inversion + edit on the real host."""
import pytest
import torch

from tve.flow.estimate import FlowField
from tve.flow.trajectories import build_trajectories
from tve.engine import host, passes
from tve.engine.run import SamplingRun
from tve.engine.stack import stack_of
from tve.nodes.edit_nodes import ApplyFLATTEN
from tve.tests.hosts import (FAMILIES, cond_chunks_split, make_conditioning, make_latent, make_tiny_model,
                             with_context_windows)
from tve.tools.video_world import render_clip


def trajectories_for(frames=16, latent_hw=(8, 8), seed=0):
    clip = render_clip(frames, latent_hw[0] * 8, latent_hw[1] * 8, seed=seed, sprites=1)
    flow = FlowField(forward=clip.flow_forward, backward=clip.flow_backward, occlusion=clip.occlusion_forward,
                     method="ground truth")
    return build_trajectories(flow, latent_hw, seed=0)


def apply(model, trajectories, grids="highest resolution", qk="dense_output"):
    return ApplyFLATTEN.execute(model, trajectories, grids, qk).result[0]


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
    run.alike_chunks = tuple(pattern.index(p) for p in pattern)        # what the engine read from the call's inputs
    name, block_id, index = flatten.first_block
    extra.update(block=(name, block_id), block_index=index)
    once = flatten.attend(q, k, v, extra, run, inner=None)
    monkeypatch.setattr(flatten_node, "once_per_distinct_chunk", lambda attend, q_, k_, v_, kinds:
                        attend(q_, k_, v_, len(kinds)))
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

    def spy(attend, q, k, v, kinds):
        def counted(q_, k_, v_, n):
            computed.append((len(kinds), n))
            return attend(q_, k_, v_, n)
        return shared(counted, q, k, v, kinds)

    monkeypatch.setattr(flatten_node, "once_per_distinct_chunk", spy)
    once = sample(edit, x_T, inversion.sigmas, "sd15")
    monkeypatch.setattr(flatten_node, "once_per_distinct_chunk", lambda attend, q, k, v, kinds:
                        attend(q, k, v, len(kinds)))
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


# ---------------------------------------------------------------------------------------------- frame-pooled norm
def pooled_by_hand(x: torch.Tensor, frames: int, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of each chunk's (C, F, h, w) video tensor, written out: per chunk of ``frames`` consecutive rows
    and per group, the mean and biased variance of all its values (frames × channels × pixels), float64."""
    x = x.double()
    groups, out = norm.num_groups, torch.empty_like(x)
    for start in range(0, x.shape[0], frames):
        chunk = x[start:start + frames].transpose(0, 1)                              # (C, F, h, w)
        values = chunk.reshape(groups, -1)                                           # (G, C/G·F·h·w)
        mean = values.mean(dim=1, keepdim=True)
        var = ((values - mean) ** 2).mean(dim=1, keepdim=True)
        normed = ((values - mean) / (var + norm.eps).sqrt()).reshape(chunk.shape)
        out[start:start + frames] = normed.transpose(0, 1)
    return out * norm.weight.double().view(1, -1, 1, 1) + norm.bias.double().view(1, -1, 1, 1)


def probe_norms(model):
    """What every ResBlock / output GroupNorm of ``model`` is called with and what the UNet goes on with (the input
    of the SiLU after it), with the frames each chunk of that UNet call holds (its rows over its CFG chunks): a list
    of (norm, frames, x, normed) per call, and the probes' handles."""
    calls, handles, frames = [], [], [0]

    def unet_call(executor, x, *args, **kwargs):
        options = args[4] if len(args) > 4 else kwargs["transformer_options"]
        frames[0] = x.shape[0] // len(options["cond_or_uncond"])
        return executor(x, *args, **kwargs)

    host.add_wrapper(model, host.DIFFUSION_MODEL, "test_probe_norms", unet_call)
    for path, norm in host.resblock_group_norms(model).items():
        silu = model.get_model_object(path[:-1] + "1")
        pending = []
        handles.append(norm.register_forward_pre_hook(lambda m, args, p=pending: p.append(args[0].detach().clone())))
        handles.append(silu.register_forward_pre_hook(
            lambda m, args, p=pending, n=norm: calls.append((n, frames[0], p.pop(), args[0].detach().clone()))))
    return calls, handles


def probed(model, run):
    calls, handles = probe_norms(model)
    try:
        out = run()
    finally:
        for handle in handles:
            handle.remove()
    return out, calls


@pytest.mark.real_host
@pytest.mark.parametrize("windows", [None, "frame windows", "core context windows"])
def test_frame_pooled_norm_is_group_norm_of_each_chunks_video_tensor_in_inversion_and_edit(windows):
    """Every ResBlock and output GroupNorm, in the inversion and the edit (source pass and CFG chunks): GroupNorm of
    the (C, F, h, w) tensor of the frames the pass holds (a frame window's with Frame Windows, the call's with core's
    context windows)."""
    from tve.engine.injection import apply_feature_injection
    from tve.engine.inversion import invert
    from tve.engine.stack import apply_frame_windows
    frames = 3
    model = apply(make_tiny_model("sd15"), trajectories_for(frames))
    if windows == "frame windows":
        model = apply_frame_windows(model, 2, 1)
    elif windows == "core context windows":
        model = with_context_windows(model, 2, 1)
    inverting = model.clone()
    (x_T, inversion), inverted = probed(inverting, lambda: invert(
        inverting, make_latent(frames, 8, 8)["samples"], make_conditioning("sd15"), 2, "ddim_uniform"))
    edit = apply_feature_injection(model, inversion, 0.5, 0.8, "flatten", "sigma-matched")
    probe = edit.clone()
    _, edited = probed(probe, lambda: sample(probe, x_T, inversion.sigmas, "sd15"))
    held = {n for _, n, _, _ in inverted + edited}
    assert held == {frames} if windows is None else (held == {2} if windows == "frame windows" else 2 in held)
    assert {x.shape[0] // n for _, n, x, _ in inverted + edited} == {1, 2}   # one chunk (inversion, source), two
    for norm, n, x, normed in inverted + edited:
        expected = pooled_by_hand(x, n, norm)
        assert torch.allclose(normed.double(), expected, atol=1e-4), (norm, x.shape)
        assert not torch.allclose(normed.double(), pooled_by_hand(x, 1, norm), atol=1e-4)   # not per frame


@pytest.mark.real_host
def test_frame_pooled_norm_off_leaves_every_norm_per_frame_and_the_edit_as_before():
    from tve.engine.stack import stack_of
    frames = 3
    trajectories = trajectories_for(frames)
    base = make_tiny_model("sd15")
    off = ApplyFLATTEN.execute(base, trajectories, "highest resolution", "dense_output", False).result[0]
    on = apply(base, trajectories)
    assert [m.pooled_norm for m in stack_of(off).methods] == [False]
    x = make_latent(frames, 8, 8)["samples"]
    sigmas = host.sigma_grid(base, "ddim_uniform", 2)
    probe = off.clone()
    out_off, calls = probed(probe, lambda: sample(probe, x, sigmas, "sd15"))
    for norm, _, x_, normed in calls:                           # plain per-frame GroupNorm, bit for bit
        assert torch.equal(normed, torch.nn.functional.group_norm(x_, norm.num_groups, norm.weight, norm.bias,
                                                                  norm.eps))
    assert not any(n._forward_pre_hooks or n._forward_hooks for n in host.resblock_group_norms(base).values())
    assert not torch.allclose(sample(on, x, sigmas, "sd15"), out_off, atol=1e-4)


@pytest.mark.real_host
def test_frame_pooled_norm_over_identical_frames_is_per_frame_norm():
    """Every frame the same: the pooled statistics are each frame's own, so the edit is the per-frame one."""
    frames = 3
    trajectories = trajectories_for(frames)
    base = make_tiny_model("sd15")
    off = ApplyFLATTEN.execute(base, trajectories, "highest resolution", "dense_output", False).result[0]
    on = apply(base, trajectories)
    x = make_latent(1, 8, 8)["samples"].repeat(frames, 1, 1, 1)
    sigmas = host.sigma_grid(base, "ddim_uniform", 2)
    pooled, per_frame = sample(on, x, sigmas, "sd15"), sample(off, x, sigmas, "sd15")
    assert torch.allclose(pooled, per_frame, atol=1e-4 * per_frame.abs().max())
