"""nodes/host.py against the real ComfyUI: one test per ComfyUI internal the pack touches, so that a ComfyUI update
that changes one fails here, by name, instead of deep inside sampling. (Model files, devices and progress are
pinned in test_flow_nodes.py and test_pack_loading.py.)"""
import pytest
import torch

from tve.tests.hosts import (FAMILIES, context_window_calls, make_conditioning, make_latent, make_tiny_controlnet,
                             make_tiny_model, with_context_windows)

pytestmark = pytest.mark.real_host


def sample(model, frames=2, steps=2, cfg=2.0, family="sd15"):
    import comfy.sample
    latent = make_latent(frames, 8, 8)["samples"]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal",
                               make_conditioning(family, 1), make_conditioning(family, 2), latent, disable_pbar=True)


def spy_every_block(model):
    """An attn1 patch recording (block key, activations shape, step) of every self-attention call."""
    from tve.nodes import host
    seen = []

    def patch(n, context, value, extra_options):
        seen.append((host.block_key(extra_options), tuple(extra_options["activations_shape"][-2:]),
                     host.current_step(extra_options), host.schedule_percent(extra_options)))
        return n, context, value

    model.set_model_attn1_patch(patch)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_blocks_are_the_keys_and_levels_the_unet_calls_its_self_attention_with(family):
    from tve.nodes import host
    model = make_tiny_model(family)
    blocks = host.attention_blocks(model)
    m = model.clone()
    seen = spy_every_block(m)
    sample(m, family=family, steps=1)
    assert {key for key, *_ in seen} == {b.key for b in blocks}
    for block in blocks:
        grids = {hw for key, hw, *_ in seen if key == block.key}
        assert grids == {(-(-8 // 2 ** block.level),) * 2}, block
        assert block.channels == model.get_model_object(f"{block.path}.attn1.to_q").out_features


def test_current_step_and_schedule_percent_count_the_sampling_schedule():
    model = make_tiny_model("sd15").clone()
    seen = spy_every_block(model)
    sample(model, steps=3)
    assert sorted({step for *_, step, _ in seen}) == [0, 1, 2]
    assert sorted({percent for *_, percent in seen}) == pytest.approx([0.0, 1 / 3, 2 / 3])


def test_decoder_stages_and_resblock_branch_hooks_see_each_output_resblocks_residual_branch():
    from tve.nodes import host
    model = make_tiny_model("sd15")
    stages = host.decoder_stages(model)
    assert stages == [[0, 1], [2, 3]]                      # lowest resolution first, two ResBlocks per stage
    seen = {}

    def record(i):
        def hook(h):
            seen[i] = h.shape
            return torch.zeros_like(h) if i == 3 else None
        return hook

    reference = sample(model.clone())
    with host.resblock_output_hooks(model, {i: record(i) for i in (0, 3)}):
        changed = sample(model.clone())
    assert seen[0][-2:] == (4, 4) and seen[3][-2:] == (8, 8)                 # latent/2, then latent resolution
    assert seen[3][1] == host.resblock_branch(model, 3).out_channels
    assert not torch.allclose(changed, reference)
    assert torch.equal(sample(model.clone()), reference)                    # the hooks are gone
    assert not host.resblock_branch(model, 3)._forward_hooks


def test_optimized_attention_is_softmax_attention_over_heads():
    from tve.nodes import host
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 16, generator=g) for _ in range(3))
    out = host.optimized_attention(q, k, v, 2, {"attn_precision": None})
    split = lambda t: t.reshape(2, 16, 2, 8).transpose(1, 2)  # noqa: E731
    expected = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    assert torch.allclose(out, expected.transpose(1, 2).reshape(2, 16, 16), atol=1e-5)


def test_attn1_patches_and_replaces_are_read_and_set_on_a_clone_only():
    from tve.nodes import host
    model = make_tiny_model("sd15")
    m = model.clone()
    blocks = host.attention_blocks(m)[:2]
    fn = lambda q, k, v, extra: host.optimized_attention(q, k, v, extra["n_heads"], extra)  # noqa: E731
    host.set_attn1_replace(m, fn, [b.key for b in blocks])
    patch = lambda n, c, v, extra: (n, c, v)  # noqa: E731
    host.ensure_attn1_patch(m, patch)
    host.ensure_attn1_patch(m, patch)
    assert host.attn1_replaces(m) == {b.key: fn for b in blocks}
    assert m.model_options["transformer_options"]["patches"]["attn1_patch"] == [patch]
    assert host.attn1_replaces(model) == {}
    assert torch.equal(sample(m.clone()), sample(model.clone()))       # the same attention, through the replace


def test_attachments_and_keyed_wrappers_follow_clones_and_replace_each_other():
    from tve.nodes import host
    model = make_tiny_model("sd15")
    m = model.clone()
    marker = object()
    host.set_attachment(m, marker)
    assert host.get_attachment(m.clone()) is marker and host.get_attachment(model) is None
    runs = []
    for name in ("first", "second"):
        host.set_wrapper(m, host.OUTER_SAMPLE, lambda executor, *a, name=name, **k: (
            runs.append((name, host.sampling_model(executor))), executor(*a, **k))[1])
    sample(m)
    assert [name for name, _ in runs] == ["second"]
    assert runs[0][1].model is model.model
    assert not model.get_wrappers(host.OUTER_SAMPLE, host.WRAPPER_KEY)


def test_call_frame_ids_follow_core_context_windows():
    from tve.nodes import host
    seen = set()
    model = make_tiny_model("sd15").clone()
    model.set_model_attn1_patch(lambda n, c, v, extra: (seen.add(host.call_frame_ids(
        n.shape[0] // len(extra["cond_or_uncond"]), extra)), (n, c, v))[1])
    windowed = with_context_windows(model, 2)
    sample(windowed, frames=4, steps=1)
    assert seen == set(context_window_calls(windowed, 4))
    assert seen >= {(0, 1)} and ({(2, 3)} <= seen or {(1, 2, 3)} <= seen)     # 0.33+: the causal frame 1 first


@pytest.mark.parametrize("family", FAMILIES)
def test_sigma_grid_sigma_min_family_and_latent_spaces(family):
    from tve.nodes import host
    model = make_tiny_model(family)
    grid = host.sigma_grid(model, "ddim_uniform", 4)
    assert grid.dtype == torch.float32 and grid[-1] == 0 and (grid[:-1] > grid[1:]).all()
    assert "ddim_uniform" in host.scheduler_names()
    assert 0 < host.sigma_min(model) < float(grid[-2])
    assert host.model_family(model) == {"sd15": "SD15/EPS", "sd2": "SD20/V_PREDICTION", "sdxl": "SDXL/EPS"}[family]
    assert host.model_dtype(model) == torch.float32
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(host.process_latent_out(model, host.process_latent_in(model, x)), x, atol=1e-6)


def test_encode_conditioning_and_cond_for_frames_slice_per_frame_model_conds():
    import comfy.conds
    from tve.nodes import host
    model = make_tiny_model("sd15")
    x = torch.randn(4, 4, 8, 8)
    conds = host.encode_conditioning(model.model, make_conditioning(), x)
    assert conds[0]["model_conds"]["c_crossattn"].cond.shape == (1, 77, 768)
    per_frame = dict(conds[0], model_conds={**conds[0]["model_conds"],
                                            "y": comfy.conds.CONDRegular(torch.arange(4.0)[:, None])})
    sliced = host.cond_for_frames(per_frame, torch.tensor([1, 3]), 4, (1, 3), 4)
    assert type(sliced["model_conds"]["y"]) is comfy.conds.CONDRegular
    assert sliced["model_conds"]["y"].cond.flatten().tolist() == [1.0, 3.0]
    assert sliced["model_conds"]["c_crossattn"] is conds[0]["model_conds"]["c_crossattn"]     # shared: not sliced
    assert per_frame["model_conds"]["y"].cond.shape[0] == 4


def test_control_for_frames_copies_a_stack_with_the_frames_hints_and_its_run_state():
    from comfy.controlnet import ControlNet
    from tve.nodes import host
    model = make_tiny_model("sd15")
    hints = torch.arange(4.0)[:, None, None, None].expand(4, 3, 64, 64)
    first = make_tiny_controlnet().copy().set_cond_hint(hints, 0.5, (0.0, 0.5))
    second = make_tiny_controlnet().copy().set_cond_hint(hints[:1], 1.0, (0.0, 1.0))
    second.set_previous_controlnet(first)
    for control in (first, second):
        control.pre_run(model.model, lambda p: model.model.model_sampling.percent_to_sigma(p))
    cache = {}
    c = host.control_for_frames(second, (3, 1), 4, cache)
    assert isinstance(c, ControlNet) and c is not second and host.control_for_frames(second, (3, 1), 4, cache) is c
    assert c.cond_hint_original.shape[0] == 1                               # one shared image stays shared
    prev = c.previous_controlnet
    assert prev is not first and prev.cond_hint_original[:, 0, 0, 0].tolist() == [3.0, 1.0]
    assert prev.timestep_range == first.timestep_range and prev.strength == 0.5
    assert prev.model_sampling_current is first.model_sampling_current is not None
    assert first.cond_hint_original.shape[0] == 4                           # the original is untouched
    with pytest.raises(ValueError, match="control: .* 4 hint images but the video has 6 frames"):
        host.check_control_hints(second, 6)


def test_sample_with_runs_a_k_diffusion_function_through_the_whole_stack_with_guidance_one():
    from tve.nodes import host
    model = make_tiny_model("sd15")
    seen = []

    def one_step(model_k, x, sigmas, extra_args=None, callback=None, disable=None, scale=1.0):
        seen.append(scale)
        return x - model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {})) * 0

    latent = make_latent(2, 8, 8)["samples"]
    out = host.sample_with(model, one_step, {"scale": 2.0}, torch.tensor([1.0, 0.0]), make_conditioning(), latent)
    assert seen == [2.0] and out.shape == latent.shape
    assert torch.allclose(out, latent, atol=1e-5)                          # raw space in, raw space out
