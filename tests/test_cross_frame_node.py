"""TVE_ApplyCrossFrameAttention: node logic on both hosts, sampling on the real one."""
import types

import pytest
import torch

from tve.attention.cross_frame import anchor_attention, dense_attention, keyframe_attention
from tve.attention.tokenflow import pick_keyframes
from tve.engine import host, passes
from tve.engine.run import SamplingRun, call_layout
from tve.engine.stack import stack_of
from tve.engine.cross_frame import MODES
from tve.nodes.edit_nodes import ApplyCrossFrameAttention
from tve.tests.hosts import (FAMILIES, REAL_HOST, cond_chunks_split, context_window_calls, make_conditioning,
                             make_latent, make_tiny_model, with_context_windows)


def apply(model, mode="dense", **kw):
    args = dict(keyframe_interval=2, anchor_frame=0, anchor_include_self=False, coarse_factor=2, seed=3,
                token_grids="all", start_percent=0.0, end_percent=1.0)
    args.update(kw)
    return ApplyCrossFrameAttention.execute(model, mode, **args).result[0]


def attn1_replaces(model):
    return model.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {})


def attention_of(model):
    """The block router's attention, called as inside a sampling run of ``model`` at the step and frames the
    ``extra_options`` name (what CALC_COND_BATCH reads once per call)."""
    def attend(q, k, v, extra):
        run = SamplingRun(stack=stack_of(model))
        passes.begin_call(run, q.shape[0] // len(extra["cond_or_uncond"]), extra["sigmas"], extra)
        return passes.route_attention(q, k, v, {**extra, host.RUN_KEY: run})
    return attend


def extra_options(chunks=2, grid=(4, 4), step_sigma=1.0, window=None, heads=2):
    """Shaped as BasicTransformerBlock builds it (comfyui-api.md §1.3)."""
    options = {"cond_or_uncond": [1, 0][:chunks] if chunks <= 2 else list(range(chunks)), "n_heads": heads,
               "dim_head": 4, "attn_precision": None, "activations_shape": [8, 8, *grid],
               "sigmas": torch.full((4,), step_sigma), "sample_sigmas": torch.tensor([14.6, 3.0, 1.0, 0.3, 0.0]),
               "block": ("output", 3), "block_index": 0, "transformer_index": 6, "original_shape": [8, 4, 8, 8]}
    if window is not None:
        options["context_window"] = types.SimpleNamespace(index_list=list(window))
    return options


def qkv(batch, tokens=16, channels=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, channels, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_self_attention_block_gets_a_replace_on_a_clone_only(family):
    model = make_tiny_model(family)
    patched = apply(model)
    keys = {b.key for b in host.attention_blocks(model)}
    assert set(attn1_replaces(patched)) == keys and keys
    assert attn1_replaces(model) == {}


def test_token_grid_choice_selects_blocks_by_resolution():
    model = make_tiny_model("sdxl")
    latent_level = apply(model, token_grids="latent/2")
    assert {k[2] for k in attn1_replaces(latent_level)} == {0, 1}          # SDXL depth-2 transformers
    with pytest.raises(ValueError, match="token_grids"):
        apply(model, token_grids="latent")                                 # SDXL has no attention there


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replace_computes_the_mode_on_host_shaped_inputs(dtype):
    model = make_tiny_model("sd15")
    fn = attention_of(apply(model, "dense"))
    q, k, v = qkv(8, dtype=dtype)
    out = fn(q, k, v, extra_options())
    assert out.dtype == dtype
    assert torch.allclose(out.float(), dense_attention(q, k, v, 2, 2).float(), atol=2e-2 if dtype != torch.float32 else 1e-5)


def test_keyframes_are_redrawn_per_step_and_follow_context_window_ids():
    model = make_tiny_model("sd15")
    fn = attention_of(apply(model, "keyframes", keyframe_interval=2))
    q, k, v = qkv(8)
    window = [6, 7, 8, 9]
    out = fn(q, k, v, extra_options(step_sigma=3.0, window=window))
    kf = pick_keyframes(window, 2, 3, 1)
    assert torch.allclose(out, keyframe_attention(q, k, v, 2, 2, kf), atol=1e-5)
    steps = {tuple(pick_keyframes(range(16), 2, 3, s).tolist()) for s in range(4)}
    assert len(steps) > 1


def test_anchor_outside_the_call_is_a_clear_error_and_inside_it_is_the_anchor_reference():
    model = make_tiny_model("sd15")
    fn = attention_of(apply(model, "anchor", anchor_frame=5))
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match="anchor_frame"):
        fn(q, k, v, extra_options())
    out = fn(q, k, v, extra_options(window=[3, 4, 5, 6]))
    assert torch.allclose(out, anchor_attention(q, k, v, 2, 2, 2, False), atol=1e-5)


def test_outside_the_schedule_window_attention_is_vanilla():
    model = make_tiny_model("sd15")
    fn = attention_of(apply(model, "dense", start_percent=0.6))
    q, k, v = qkv(8)
    out = fn(q, k, v, extra_options(step_sigma=3.0))                   # step 1 of 4: 25 %
    assert torch.allclose(out, host.optimized_attention(q, k, v, 2, extra_options()), atol=1e-5)


def test_bad_inputs_are_clear_errors():
    model = make_tiny_model("sd15")
    with pytest.raises(ValueError, match="mode"):
        apply(model, "sideways")
    with pytest.raises(ValueError, match="start_percent"):
        apply(model, start_percent=0.8, end_percent=0.2)


# ---------------------------------------------------------------------------------------------- real host
def sample(model, family, frames=4, cfg=5.0, steps=2, seed=0):
    """Core KSampler (its noise from ``seed``), euler / normal."""
    (out,) = host.run_core_node("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                                scheduler="normal", positive=make_conditioning(family, 1),
                                negative=make_conditioning(family, 2), latent_image=make_latent(frames, 8, 8))
    return out["samples"]


@pytest.mark.real_host
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_sampling_with_each_mode_is_identical_with_cond_and_uncond_together_or_split(family, mode):
    patched = apply(make_tiny_model(family), mode)
    layouts = []
    host.add_wrapper(patched, host.DIFFUSION_MODEL, "test_spy", lambda executor, *args, **kw: (
        layouts.append(list(args[5]["cond_or_uncond"])), executor(*args, **kw))[1])
    together = sample(patched, family)
    split = sample(cond_chunks_split(patched), family)
    assert layouts == [[1, 0]] * 2 + [[1], [0]] * 2
    assert torch.isfinite(together).all()
    assert torch.allclose(together, split, atol=1e-4 * together.abs().max())


@pytest.mark.real_host
def test_core_context_windows_pick_keyframes_among_the_windows_global_frames():
    seen = []

    def spy(q, k, v, extra_options):
        layout = call_layout(q.shape[0], extra_options)
        seen.append((layout.frame_ids, tuple(pick_keyframes(layout.frame_ids, 2, 3, layout.step).tolist())))
        return inner(q, k, v, extra_options)

    model = make_tiny_model("sd15")
    patched = apply(model, "keyframes")
    key = next(iter(attn1_replaces(patched)))
    inner = attn1_replaces(patched)[key]
    patched.set_model_attn1_replace(spy, *key)
    windowed = with_context_windows(patched, 4)
    sample(windowed, "sd15", frames=8)
    windows = {ids for ids, _ in seen}
    assert windows == set(context_window_calls(windowed, 8))
    for ids, local in seen:
        assert all(0 <= i < len(ids) for i in local)


@pytest.mark.skipif(REAL_HOST, reason="checks the stand-in only")
def test_stand_in_layout_matches_the_real_hosts_replace_keys():
    # Recorded on the real host (comfyui-api.md §1.4 and tests/hosts.py layouts): SD1.5-shaped tiny UNet.
    keys = [b.key for b in host.attention_blocks(make_tiny_model("sd15"))]
    assert keys == [("input", 1, 0), ("input", 3, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0),
                    ("output", 2, 0), ("output", 3, 0)]
