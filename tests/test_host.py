"""engine/host.py against the real ComfyUI: one test per ComfyUI internal the pack touches, so that a ComfyUI update
that changes one fails here, by name, instead of deep inside sampling. (Model files, devices and progress are
pinned in test_flow_nodes.py and test_pack_loading.py.)"""
import os

import pytest
import torch

from tve.tests.hosts import (FAMILIES, context_window_calls, make_conditioning, make_latent, make_tiny_controlnet,
                             make_tiny_model, with_context_windows)

pytestmark = pytest.mark.real_host


def sample(model, frames=2, steps=2, cfg=2.0, family="sd15"):
    """Euler over ``steps`` steps of the normal schedule (what core's KSampler samples with these settings)."""
    from tve.engine import host
    latent = make_latent(frames, 8, 8)["samples"]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    return host.sample(model, noise, cfg, "euler", host.sigma_grid(model, "normal", steps),
                       make_conditioning(family, 1), make_conditioning(family, 2), latent)


def spy_every_block(model):
    """An attn1 patch recording (block key, activations shape, step) of every self-attention call."""
    from tve.engine import host
    seen = []

    def patch(n, context, value, extra_options):
        step = host.current_step(extra_options["sigmas"], extra_options)
        seen.append((host.block_key(extra_options), host.token_grid(extra_options), step,
                     step / host.schedule_length(extra_options)))
        return n, context, value

    model.set_model_attn1_patch(patch)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_blocks_are_the_keys_and_levels_the_unet_calls_its_self_attention_with(family):
    from tve.engine import host
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


def test_current_step_and_schedule_length_count_the_sampling_schedule():
    model = make_tiny_model("sd15").clone()
    seen = spy_every_block(model)
    sample(model, steps=3)
    assert sorted({step for *_, step, _ in seen}) == [0, 1, 2]
    assert sorted({percent for *_, percent in seen}) == pytest.approx([0.0, 1 / 3, 2 / 3])


def test_decoder_stages_and_resblock_branch_hooks_see_each_output_resblocks_residual_branch():
    from tve.engine import host
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
    with host.forward_hooks({host.resblock_branch(model, i): record(i) for i in (0, 3)}):
        changed = sample(model.clone())
    assert seen[0][-2:] == (4, 4) and seen[3][-2:] == (8, 8)                 # latent/2, then latent resolution
    assert seen[3][1] == host.resblock_branch(model, 3).out_channels
    assert not torch.allclose(changed, reference)
    assert torch.equal(sample(model.clone()), reference)                    # the hooks are gone
    assert not host.resblock_branch(model, 3)._forward_hooks


def test_optimized_attention_is_softmax_attention_over_heads():
    from tve.engine import host
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 16, generator=g) for _ in range(3))
    out = host.optimized_attention(q, k, v, 2, {"attn_precision": None})
    split = lambda t: t.reshape(2, 16, 2, 8).transpose(1, 2)  # noqa: E731
    expected = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    assert torch.allclose(out, expected.transpose(1, 2).reshape(2, 16, 16), atol=1e-5)


def test_attn1_patches_and_replaces_are_read_and_set_on_a_clone_only():
    from tve.engine import host
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
    from tve.engine import host
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
    from tve.engine import host
    seen = set()
    model = make_tiny_model("sd15").clone()
    model.set_model_attn1_patch(lambda n, c, v, extra: (seen.add(host.context_window_frame_ids(
        host.context_window(extra))), (n, c, v))[1])
    windowed = with_context_windows(model, 2)
    sample(windowed, frames=4, steps=1)
    assert seen == set(context_window_calls(windowed, 4))
    assert seen >= {(0, 1)} and ({(2, 3)} <= seen or {(1, 2, 3)} <= seen)     # 0.33+: the causal frame 1 first


@pytest.mark.parametrize("family", FAMILIES)
def test_sigma_grid_sigma_min_family_and_latent_spaces(family):
    from tve.engine import host
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
    from tve.engine import host
    model = make_tiny_model("sd15")
    x = torch.randn(4, 4, 8, 8)
    conds = host.encode_conditioning(model.model, make_conditioning(), x)
    assert conds[0]["model_conds"]["c_crossattn"].cond.shape == (1, 77, 768)
    # SDXL's y (CONDRegular) is per frame when the pooled embedding is: one text embedding, four pooled rows
    sdxl = make_tiny_model("sdxl")
    text, pooled = make_conditioning("sdxl")[0][0], torch.arange(4.0)[:, None].expand(4, 1280)
    per_frame = host.encode_conditioning(sdxl.model, [[text, {"pooled_output": pooled}]], x)[0]
    y = per_frame["model_conds"]["y"]
    assert y.cond.shape == (4, 2816)
    sliced = host.cond_for_frames(per_frame, torch.tensor([1, 3]), 4, (1, 3), 4)
    assert type(sliced["model_conds"]["y"]) is type(y)
    assert sliced["model_conds"]["y"].cond[:, 0].tolist() == [1.0, 3.0]
    assert sliced["model_conds"]["c_crossattn"] is per_frame["model_conds"]["c_crossattn"]    # shared: not sliced
    assert per_frame["model_conds"]["y"].cond.shape[0] == 4


def test_control_for_frames_copies_a_stack_with_the_frames_hints_and_its_run_state():
    from tve.engine import host
    model = make_tiny_model("sd15")
    hints = torch.arange(4.0)[:, None, None, None].expand(4, 3, 64, 64)
    first = make_tiny_controlnet().copy().set_cond_hint(hints, 0.5, (0.0, 0.5))
    second = make_tiny_controlnet().copy().set_cond_hint(hints[:1], 1.0, (0.0, 1.0))
    second.set_previous_controlnet(first)
    for control in (first, second):
        control.pre_run(model.model, lambda p: model.model.model_sampling.percent_to_sigma(p))
    cache = {}
    c = host.control_for_frames(second, (3, 1), 4, cache)
    assert type(c) is type(second) and c is not second and host.control_for_frames(second, (3, 1), 4, cache) is c
    assert c.cond_hint_original.shape[0] == 1                               # one shared image stays shared
    prev = c.previous_controlnet
    assert prev is not first and prev.cond_hint_original[:, 0, 0, 0].tolist() == [3.0, 1.0]
    assert prev.timestep_range == first.timestep_range and prev.strength == 0.5
    assert prev.model_sampling_current is first.model_sampling_current is not None
    assert first.cond_hint_original.shape[0] == 4                           # the original is untouched
    assert host.control_hint_counts(second) == [1, 4]                       # the chain, newest first
    from tve.engine import validation
    with pytest.raises(ValueError, match="control: .* 4 hint images but the video has 6 frames"):
        validation.control_hints(second, 6)


def test_sample_with_runs_a_k_diffusion_function_through_the_whole_stack_with_guidance_one():
    from tve.engine import host
    model = make_tiny_model("sd15")
    seen = []

    def one_step(model_k, x, sigmas, extra_args=None, callback=None, disable=None, scale=1.0):
        seen.append(scale)
        return x - model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {})) * 0

    latent = make_latent(2, 8, 8)["samples"]
    out = host.sample_with(model, one_step, {"scale": 2.0}, torch.tensor([1.0, 0.0]), make_conditioning(), latent)
    assert seen == [2.0] and out.shape == latent.shape
    assert torch.allclose(out, latent, atol=1e-5)                          # raw space in, raw space out


# ---------------------------------------------------------------------------------------------- scripts and tests
@pytest.mark.parametrize("family", FAMILIES)
def test_build_model_is_comfys_model_of_the_config_with_the_layout_given(family):
    from tve.engine import host
    from tve.tests.hosts import HEAD_CHANNELS
    model = make_tiny_model(family)
    assert host.model_family(model) == {"sd15": "SD15/EPS", "sd2": "SD20/V_PREDICTION", "sdxl": "SDXL/EPS"}[family]
    assert host.latent_channels(model) == 4 and host.needs_pooled_output(model) == (family == "sdxl")
    assert host.context_dim(model) == {"sd15": 768, "sd2": 1024, "sdxl": 2048}[family]
    blocks = host.attention_blocks(model)
    assert {b.channels for b in blocks} == ({64} if family == "sdxl" else {32, 64})        # model_channels 32, x1 x2
    assert all(host.attention_heads(model, b) == b.channels // HEAD_CHANNELS for b in blocks)  # the layout's heads
    with pytest.raises(ValueError, match="config: expected one of"):
        host.build_model("SD3", {}, "EPS")


def test_checkpoint_model_loads_a_checkpoint_file_as_core_checkpoint_loader_does(tmp_path):
    import safetensors.torch
    from tve.engine import host
    from tve.tests.e2e.tiny_sd15 import UNET
    layout = dict(UNET, channel_mult=[1], num_res_blocks=[1], transformer_depth=[1], transformer_depth_output=[1, 1])
    built = host.build_model("SD15", layout)            # 320 channels: a layout core's detection takes for SD1.5
    state = {f"model.{k}": torch.full_like(v, i * 1e-3, dtype=torch.float16)
             for i, (k, v) in enumerate(built.model.state_dict().items()) if k.startswith("diffusion_model.")}
    safetensors.torch.save_file(state, str(tmp_path / "tiny.safetensors"))
    model = host.checkpoint_model(str(tmp_path / "tiny.safetensors"))
    assert host.model_family(model) == "SD15/EPS"
    assert [b.key for b in host.attention_blocks(model)] == [b.key for b in host.attention_blocks(built)]
    key = host.attention_blocks(model)[0].path + ".attn1.to_q.weight"
    assert torch.equal(model.get_model_object(key).half(), state[f"model.{key}"])


def test_sample_is_a_core_ksampler_with_its_noise_and_honours_mask_seed_and_callback():
    from tve.engine import host
    model = make_tiny_model("sd15")
    latent = make_latent(2, 8, 8)["samples"]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    ours = host.sample(model, noise, 2.0, "euler", host.sigma_grid(model, "normal", 3), make_conditioning(seed=1),
                       make_conditioning(seed=2), latent)
    (core,) = host.run_core_node("KSampler", model=model, seed=7, steps=3, cfg=2.0, sampler_name="euler",
                                 scheduler="normal", positive=make_conditioning(seed=1),
                                 negative=make_conditioning(seed=2), latent_image={"samples": latent})
    assert torch.allclose(ours, core["samples"], atol=1e-6)
    sigmas = host.sigma_grid(model, "normal", 2)
    steps = []
    kept = host.sample(model, noise, 2.0, "euler", sigmas, make_conditioning(), make_conditioning(), latent,
                       noise_mask=torch.zeros(1, 8, 8), callback=lambda i, x0, x, total: steps.append((i, total)))
    assert torch.allclose(kept, latent, atol=1e-5) and steps == [(0, 2), (1, 2)]       # nothing inside the mask
    ancestral = [host.sample(model, noise, 2.0, "euler_ancestral", sigmas, make_conditioning(), make_conditioning(),
                             latent, seed=seed) for seed in (0, 0, 1)]
    assert torch.equal(ancestral[0], ancestral[1]) and not torch.allclose(ancestral[0], ancestral[2])
    assert {"euler", "euler_ancestral", "dpm_2", "dpmpp_2m"} <= set(host.sampler_names())


def test_diffusion_model_wrappers_see_every_unet_call_in_the_order_added():
    from tve.engine import host
    model = make_tiny_model("sd15").clone()
    seen = []
    for name in ("first", "second"):
        host.add_wrapper(model, host.DIFFUSION_MODEL, f"test_{name}", lambda executor, *args, name=name, **kw: (
            seen.append((name, args[0].shape, float(args[5]["sigmas"][0]))), executor(*args, **kw))[1])
    sample(model, steps=2)
    grid = host.sigma_grid(model, "normal", 2)
    assert seen == [(name, (4, 4, 8, 8), pytest.approx(float(s))) for s in grid[:2] for name in ("first", "second")]


def test_a_hook_ends_a_unet_call_early_on_a_clone_whose_call_end_wrapper_returns_zeros_of_the_output_shape():
    from tve.engine import host
    base = make_tiny_model("sd15")
    reference = sample(base.clone())
    model = base.clone()
    seen = []
    host.add_wrapper(model, host.DIFFUSION_MODEL, "test_outer", lambda executor, x, *args, **kw: (
        out := executor(x, *args, **kw), seen.append((host.ends_unet_calls(args[4]), x.shape, out)))[0])
    host.set_unet_call_end(model)
    host.set_unet_call_end(model)                                        # once per clone, however often set
    ran = []
    hooks = {host.resblock_branch(model, 0): lambda h: host.end_unet_call(),
             host.resblock_branch(model, 1): lambda h: ran.append(1)}
    with host.forward_hooks(hooks):
        sample(model, steps=2)
    assert len(seen) == 2 and not ran                                     # both calls ended at output block 0
    for ends, shape, out in seen:
        assert ends and out.shape == shape and not out.any()
    assert torch.equal(sample(base.clone()), reference)                  # nothing stays on the base model
    plain = base.clone()
    host.add_wrapper(plain, host.DIFFUSION_MODEL, "test_outer", lambda executor, *args, **kw: (
        seen.append(host.ends_unet_calls(args[5])), executor(*args, **kw))[1])
    sample(plain, steps=1)
    assert seen[-1] is False

    def fails(h):
        raise ValueError("not the end of a call")

    with host.forward_hooks({host.resblock_branch(model, 0): fails}), pytest.raises(ValueError, match="not the end"):
        sample(model, steps=1)                                           # only the call end is caught


def test_add_lora_patches_a_clone_and_load_model_patches_the_weights_in():
    from tve.engine import host
    model = make_tiny_model("sd15")
    block = host.attention_blocks(model)[0]
    key = f"{block.path}.attn1.to_q.weight"
    lora_key = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
    state = {f"{lora_key}.lora_up.weight": torch.ones(32, 1), f"{lora_key}.lora_down.weight": torch.ones(1, 32),
             f"{lora_key}.alpha": torch.tensor(1.0)}
    patched = host.add_lora(model, state, 0.5)
    assert list(patched.patches) == [key] and not model.patches
    base = model.get_model_object(key).clone()
    host.load_model(patched)
    try:
        assert host.helper_loaded(patched)
        assert torch.allclose(model.get_model_object(key), base + 0.5)              # W + 0.5 · up·down
    finally:
        host.unload_models()
    assert not host.helper_loaded(patched) and torch.equal(model.get_model_object(key), base)
    hooked = model.clone()
    hooked.add_hook_patches(host.new_weight_hook(), {key: (torch.ones(32, 32),)}, 1.0)
    assert host.weights_fingerprint(hooked).patches != host.weights_fingerprint(model).patches


def test_controls_built_by_the_host_change_sampling_through_core_controlnet_apply():
    from tve.engine import host
    from tve.tests.hosts import make_tiny_t2i_adapter
    layout = dict(num_res_blocks=[2, 2], transformer_depth=[1, 1, 1, 1], transformer_depth_output=[1] * 6)
    model = make_tiny_model("sd15", **layout)
    hints = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    latent = make_latent(2, 8, 8)["samples"]

    def sampled(control):
        positive, negative = make_conditioning(seed=1), make_conditioning(seed=2)
        if control is not None:
            positive, negative = host.run_core_node("ControlNetApplyAdvanced", positive=positive, negative=negative,
                                                    control_net=control, image=hints, strength=1.0,
                                                    start_percent=0.0, end_percent=1.0)
        return host.sample(model, torch.zeros_like(latent), 2.0, "euler", host.sigma_grid(model, "normal", 1),
                           positive, negative, latent)

    plain = sampled(None)
    for control in (make_tiny_controlnet("sd15", **layout), make_tiny_t2i_adapter()):
        assert host.control_hint_counts(control) == []                        # no hint until a node sets one
        assert not torch.allclose(sampled(control), plain, atol=1e-4)


def test_vae_from_state_dict_is_comfys_sd_vae_and_attention_backends_are_softmax_attention():
    from tve.engine import host
    from tve.tests.hosts import make_vae
    assert host.vae_downscale_ratio(make_vae()) == 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 16, generator=g) for _ in range(3))
    split = lambda t: t.reshape(2, 16, 2, 8).transpose(1, 2)  # noqa: E731
    expected = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    for name in ("basic", "pytorch", "sub_quad", "split"):
        out = host.attention_backend(name)(q, k, v, 2)
        assert torch.allclose(out, expected.transpose(1, 2).reshape(2, 16, 16), atol=1e-5), name


def test_progress_reaches_the_global_hook_and_an_interrupt_stops_the_next_update():
    import re
    from tve.engine import host
    updates = []
    host.report_progress_to(lambda done, total: updates.append((done, total)))
    try:
        update = host.progress(3)
        update(1, 3)
        update(3, 3)                      # a first and a last update always reach it (0.33 throttles the others)
        host.interrupt()
        assert host.interrupt_requested()
        with pytest.raises(host.Interrupted):
            host.progress(2)(1, 2)
        assert not host.interrupt_requested()                                 # raised once, then cleared
    finally:
        host.report_progress_to(None)
        host.interrupt(False)
    assert updates == [(1, 3), (3, 3)]
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", host.comfyui_version())


def test_model_folder_at_points_a_folder_at_a_path_and_restores_it(tmp_path):
    from tve.engine import host
    host.register_adapter_folder()                                            # as the pack does when it loads
    before = host.adapter_folders()
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.pth").write_bytes(b"")
    with host.model_folder_at(host.ADAPTER_FOLDER, str(tmp_path)):
        assert host.adapter_folders() == [str(tmp_path)] and host.adapter_files() == ["a.safetensors"]
    assert host.adapter_folders() == before
    with host.model_folder_at(host.OPTICAL_FLOW_FOLDER, str(tmp_path)):
        assert host.optical_flow_files() == ["a.safetensors", "b.pth"]
    assert host.default_model_folder("x").endswith(os.path.join("models", "x"))


# ---------------------------------------------------------------------------------------------- frame-pooled norms
@pytest.mark.parametrize("family", FAMILIES)
def test_resblock_group_norms_are_every_unet_group_norm_but_the_transformers_own(family):
    from tve.engine import host
    model = make_tiny_model(family)
    norms = host.resblock_group_norms(model)
    unet = model.get_model_object("diffusion_model")
    every = {f"diffusion_model.{name}": m for name, m in unet.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    transformers = {path for path in every if path.endswith(".norm")
                    and hasattr(model.get_model_object(path.rsplit(".", 1)[0]), "proj_in")}
    assert set(norms) == set(every) - transformers and transformers
    assert list(norms)[-1] == "diffusion_model.out.0"
    assert all(model.get_model_object(path) is module for path, module in norms.items())
    resblock_parts = [path for path in norms if path.endswith((".in_layers.0", ".out_layers.0"))]
    assert len(resblock_parts) == len(norms) - 1 and len(resblock_parts) % 2 == 0


def test_calls_in_layout_call_a_module_on_another_layout_for_the_run_only():
    from tve.engine import host
    model = make_tiny_model("sd15")
    out_norm = host.resblock_group_norms(model)["diffusion_model.out.0"]
    seen = []
    reference = sample(model.clone())
    with host.calls_in_layout([out_norm], lambda x: x.unsqueeze(2), lambda y: torch.zeros_like(y.squeeze(2))):
        probe = out_norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
        try:
            zeroed = sample(model.clone())
        finally:
            probe.remove()
    assert seen and all(len(shape) == 5 and shape[2] == 1 for shape in seen)     # the module saw the new layout
    assert not torch.allclose(zeroed, reference)                                 # and its output came back mapped
    assert torch.equal(sample(model.clone()), reference)                         # the hooks are gone
    assert not out_norm._forward_hooks and not out_norm._forward_pre_hooks


# ---------------------------------------------------------------------------------------------- CFG chunks alike
def alike_and_first_block(model, family="sd15", positive=None, negative=None, frames=2):
    """Per two-chunk UNet call of a CFG sample: what ``chunks_alike_before_text`` says (an APPLY_MODEL wrapper) and
    whether the first self-attention block's input was in fact equal in both chunks."""
    from tve.engine import host
    first = host.attention_blocks(model)[0].key
    said, truth = [], []

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        said.append(host.chunks_alike_before_text(x, t, c_concat, control, transformer_options, kw, (record,)))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    def record(n, context, value, extra_options):
        if host.block_key(extra_options) == first and len(extra_options["cond_or_uncond"]) == 2:
            truth.append(torch.equal(n[:frames], n[frames:]))
        return n, context, value

    model = model.clone()
    host.add_wrapper(model, host.APPLY_MODEL, "test_alike", wrapper)
    model.set_model_attn1_patch(record)
    latent = make_latent(frames, 8, 8)["samples"]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    host.sample(model, noise, 2.0, "euler", host.sigma_grid(model, "normal", 2),
                positive or make_conditioning(family, 1), negative or make_conditioning(family, 2), latent)
    return [s for s in said if len(s) == 2], truth


@pytest.mark.parametrize("family", FAMILIES)
def test_chunks_alike_before_text_are_those_whose_first_self_attention_input_is_equal(family):
    said, truth = alike_and_first_block(make_tiny_model(family), family)
    assert said and len(said) == len(truth)
    assert [s == (0, 0) for s in said] == truth
    assert truth == [family != "sdxl"] * len(truth)       # SDXL's y holds the pooled text: its chunks differ at once


def test_chunks_are_not_alike_with_control_residuals_or_another_packs_patch_before_the_first_block():
    from tve.engine import host
    model = make_tiny_model("sd15")
    hints = torch.zeros(2, 64, 64, 3)                                   # IMAGE (B, H, W, C) of an 8×8 latent
    positive, negative = (host.run_core_node("ControlNetApplyAdvanced", positive=make_conditioning("sd15", 1),
                                             negative=make_conditioning("sd15", 2), control_net=make_tiny_controlnet(),
                                             image=hints, strength=1.0, start_percent=0.0, end_percent=1.0))
    said, _ = alike_and_first_block(model, positive=positive, negative=negative)
    assert said and all(s == (0, 1) for s in said)
    patched = model.clone()
    patched.set_model_input_block_patch(lambda h, extra_options: h)
    said, truth = alike_and_first_block(patched)
    assert said and all(s == (0, 1) for s in said) and all(truth)      # not known alike: computed apart
