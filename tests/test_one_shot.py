"""One-shot tuning (Tune-A-Video + EI²'s STAM) on the real host: identity before tuning, the loss it lowers, base
weights untouched, save/load round trip, clear errors with nothing half-patched, progress and cancel; an adapter loads
only onto the weights it was tuned on (or when allowed); query deltas that do not fit are refused."""
import re

import pytest
import torch

from tve.attention.temporal import KINDS, TemporalAttention, instance_centering
from tve.engine import host
from tve.nodes.one_shot_nodes import OneShotTune
from tve.engine.one_shot import evaluate_loss, tune
from tve.nodes.one_shot_nodes import LoadTemporalAdapter, SaveTemporalAdapter
from tve.engine.temporal_adapter import TemporalAdapter, apply_adapter, model_blocks
from tve.tests.hosts import FAMILIES, make_conditioning, make_latent, make_tiny_model

pytestmark = pytest.mark.real_host


def denoised(model, samples, conditioning, sigma=1.5, seed=0):
    """D(x; σ) of one noisy copy of the clip through comfy's whole sampling stack (fp32 CPU)."""
    out = []
    noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(seed))

    def loop(denoise, x0):
        with torch.no_grad():
            out.append(denoise(x0 + sigma * noise, torch.tensor(sigma)))

    host.train_on_clip(model, conditioning, samples, loop)
    return out[0]


def untrained_adapter(model, kind):
    blocks = model_blocks(model)
    temporal = {name: TemporalAttention(c, h, kind, torch.Generator().manual_seed(0)).state_dict()
                for name, (c, h) in blocks.items()}
    diffs = {key: torch.zeros_like(model.get_model_object(key.rsplit(".", 1)[0]).weight)
             for b in host.attention_blocks(model) for key in host.query_weight_keys(b)}
    return TemporalAdapter(kind, host.model_family(model), blocks, temporal, diffs, "temporal+queries", 0, ())


def patch_state(model):
    to = model.model_options["transformer_options"]
    return (repr(sorted(to.get("patches", {}))), len(to.get("patches", {}).get("middle_patch", [])),
            sorted(model.patches), sorted(model.weight_wrapper_patches), sorted(model.attachments))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_untuned_adapter_is_exactly_the_identity(family, kind):
    model = make_tiny_model(family)
    samples, cond = make_latent(3, 8, 12)["samples"], make_conditioning(family)
    adapted = apply_adapter(model, untrained_adapter(model, kind))
    assert len(adapted.model_options["transformer_options"]["patches"]["middle_patch"]) == 1
    assert torch.equal(denoised(adapted, samples, cond), denoised(model, samples, cond))


def test_instance_centering_of_real_block_features_removes_the_frame_mean_and_keeps_their_scale():
    model, seen = make_tiny_model("sd15"), []

    def record(x, extra_options):
        seen.append(x.detach().clone())
        return x

    m = model.clone()
    host.set_middle_patch(m, record)
    samples = make_latent(4, 8, 8)["samples"]
    denoised(m, samples, make_conditioning("sd15"))
    assert len(seen) == len(host.attention_blocks(model))
    for x in seen:                                                  # (F, T, C): one chunk, 4 frames
        seq = x.permute(1, 0, 2)                                    # (T, F, C): one instance per token
        centred = instance_centering(seq)
        assert centred.mean(1).abs().max() < 1e-4 * seq.abs().max()
        assert torch.allclose(centred.std(1), seq.std(1), rtol=1e-4, atol=1e-6)
        assert torch.allclose(seq - centred, seq.mean(1, keepdim=True).expand_as(seq), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_tuning_lowers_the_clips_diffusion_loss_on_the_trained_model(kind):
    from tve.tests.trained_model import load_trained_model, trained_conditioning
    from tve.tools.train_test_model import HELD_OUT_SEED
    from tve.tools.video_world import frames_to_latent, render_clip

    clip = render_clip(6, 64, 64, seed=HELD_OUT_SEED + 7, sprites=2)
    samples, cond = frames_to_latent(clip.frames), trained_conditioning("source")
    model = load_trained_model()
    before = evaluate_loss(model, samples, cond, draws=12, seed=5)
    adapter = tune(model, samples, cond, steps=30, learning_rate=1e-2, seed=0, kind=kind)
    after = evaluate_loss(apply_adapter(model, adapter), samples, cond, draws=12, seed=5)
    assert after < 0.95 * before, (before, after)
    assert evaluate_loss(model, samples, cond, draws=12, seed=5) == before          # the base model is as it was


def test_tuning_leaves_the_base_weights_and_the_input_model_untouched():
    model = make_tiny_model("sd15")
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    state = patch_state(model)
    samples, cond = make_latent(3, 8, 8)["samples"], make_conditioning("sd15")
    reference = denoised(model, samples, cond)
    tuned, adapter, graph = OneShotTune.execute(model, {"samples": samples}, cond, 3, 1e-2, 0, "stam",
                                                "temporal+queries", True).result
    assert not torch.equal(denoised(tuned, samples, cond), reference)
    assert torch.equal(denoised(model, samples, cond), reference)
    assert all(torch.equal(v, weights[k]) for k, v in model.model.state_dict().items())
    assert patch_state(model) == state
    assert all(p.grad is None for p in model.model.parameters())
    assert len(adapter.losses) == 3 and adapter.query_diffs and any(d.abs().sum() > 0
                                                                    for d in adapter.query_diffs.values())
    assert graph.shape[0] == 1 and graph.shape[-1] == 3 and 0 <= graph.min() and graph.max() <= 1


def test_temporal_only_tunes_no_queries():
    model = make_tiny_model("sd15")
    adapter = tune(model, make_latent(3, 8, 8)["samples"], make_conditioning("sd15"), 2, 1e-2, 0, "stam",
                   "temporal")
    assert adapter.query_diffs == {}
    assert any(float(state["gain"]) != 0 for state in adapter.temporal.values())


def test_gradient_checkpointing_gives_the_same_tuning_as_plain_backward():
    """The checkpointed recomputation runs each block with the transformer_options it first saw (block keys)."""
    model, samples, cond = make_tiny_model("sdxl"), make_latent(3, 8, 8)["samples"], make_conditioning("sdxl")
    a = tune(model, samples, cond, 3, 1e-2, 0, "layernorm", gradient_checkpointing=True)
    b = tune(model, samples, cond, 3, 1e-2, 0, "layernorm", gradient_checkpointing=False)
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    for name in a.temporal:
        assert torch.allclose(a.temporal[name]["out"], b.temporal[name]["out"], atol=1e-6)
    unet = model.get_model_object("diffusion_model")
    assert not any("forward" in m.__dict__ for m in unet.modules())             # core's forwards are back


def test_save_then_load_reproduces_the_tuned_outputs(adapter_folder):
    model, samples, cond = make_tiny_model("sd2"), make_latent(3, 8, 8)["samples"], make_conditioning("sd2")
    tuned, adapter, _ = OneShotTune.execute(model, {"samples": samples}, cond, 2, 1e-2, 0, "stam",
                                            "temporal+queries", True).result
    written = SaveTemporalAdapter.execute(adapter, "clips/dog")
    (name,) = host.adapter_files()
    assert name.replace("\\", "/") == "clips/dog_00001.safetensors" and written.ui["text"][0].endswith(name)
    loaded_model, loaded = LoadTemporalAdapter.execute(model, name).result
    assert (loaded.kind, loaded.family, loaded.steps, loaded.losses) == (adapter.kind, adapter.family, 2,
                                                                         adapter.losses)
    assert torch.equal(denoised(loaded_model, samples, cond), denoised(tuned, samples, cond))


def test_an_adapter_of_another_family_is_refused_with_nothing_patched():
    sd15, sd2 = make_tiny_model("sd15"), make_tiny_model("sd2")
    adapter = untrained_adapter(sd15, "stam")
    state = patch_state(sd2)
    with pytest.raises(ValueError, match=r"adapter: tuned on a SD15/EPS model but this model is SD20/V_PREDICTION"):
        apply_adapter(sd2, adapter)
    assert patch_state(sd2) == state
    with pytest.raises(TypeError, match="adapter: expected a TVE_TEMPORAL_ADAPTER"):
        apply_adapter(sd15, {"kind": "stam"})


@pytest.mark.parametrize("case, error", [
    ("one_frame", r"latent: one-shot tuning learns the motion between frames, but the clip has 1 frame"),
    ("zero_steps", r"steps: expected an integer at least 1, got 0"),
    ("nan_learning_rate", r"learning_rate: expected a finite number, got nan"),
    ("latent_channels", r"latent: has 16-channel latents \(SD3 / Flux\); TVE edits with SD1.x, SD2.x and SDXL"),
    ("sdxl_conditioning", r"conditioning: its text embedding is 2048 wide but this SD15/EPS model's cross-attention "
                          r"takes 768"),
    ("already_adapted", r"model: it already carries a temporal adapter"),
    ("sdxl_without_pooled", r"conditioning: this SDXL/EPS model needs a pooled text embedding"),
])
def test_bad_input_is_one_clear_error_with_nothing_patched(case, error):
    family = "sdxl" if case.startswith("sdxl_without") else "sd15"
    model = make_tiny_model(family)
    samples, cond = make_latent(3, 8, 8)["samples"], make_conditioning(family)
    steps, lr = 2, 1e-3
    if case == "sdxl_without_pooled":
        cond = [[cond[0][0], {}]]
    elif case == "one_frame":
        samples = samples[:1]
    elif case == "zero_steps":
        steps = 0
    elif case == "nan_learning_rate":
        lr = float("nan")
    elif case == "latent_channels":
        samples = torch.zeros(3, 16, 8, 8)
    elif case == "sdxl_conditioning":
        cond = make_conditioning("sdxl")
    elif case == "already_adapted":
        model = apply_adapter(model, untrained_adapter(model, "stam"))
    state = patch_state(model)
    with pytest.raises(ValueError, match=error):
        OneShotTune.execute(model, {"samples": samples}, cond, steps, lr, 0, "stam", "temporal+queries", True)
    assert patch_state(model) == state


def test_progress_runs_from_first_to_last_step_and_cancel_stops_tuning():
    model, samples, cond = make_tiny_model("sd15"), make_latent(3, 8, 8)["samples"], make_conditioning("sd15")
    updates = []
    host.report_progress_to(lambda value, total: updates.append((value, total)))
    try:
        tune(model, samples, cond, 3, 1e-3, 0, "stam")
        # core's bar always sends the first and the last update; 0.33's drops those in between that come sooner
        # than its throttle interval after the last one sent, so which of them arrive depends on machine speed
        assert updates[0] == (1, 3) and updates[-1] == (3, 3)
        assert all(a < b for (a, _), (b, _) in zip(updates, updates[1:])) and {t for _, t in updates} == {3}

        def cancel(step, loss):
            host.interrupt()

        with pytest.raises(host.Interrupted):
            tune(model, samples, cond, 5, 1e-3, 0, "stam", on_step=cancel)
    finally:
        host.report_progress_to(None)
        host.interrupt(False)
    assert not any("forward" in m.__dict__ for m in model.get_model_object("diffusion_model").modules())


def test_tuning_a_model_loaded_in_inference_mode_inside_inference_mode_as_comfyui_runs_nodes():
    with torch.inference_mode():                        # ComfyUI loads checkpoints and runs nodes like this
        model = make_tiny_model("sd15")
        samples, cond = make_latent(3, 8, 8)["samples"], make_conditioning("sd15")
        assert all(p.is_inference() for p in model.model.parameters())
        before = [p.requires_grad for p in model.model.parameters()]      # True at 0.3.64, False at 0.33
        tuned, adapter, _ = OneShotTune.execute(model, {"samples": samples}, cond, 2, 1e-2, 0, "stam",
                                                "temporal+queries", True).result
        after = [p.requires_grad for p in model.model.parameters()]
    assert len(adapter.losses) == 2 and any(float(s["gain"]) != 0 for s in adapter.temporal.values())
    assert after == before                              # restored as they were
    assert not torch.equal(denoised(tuned, samples, cond), denoised(model, samples, cond))


def random_adapter(model, kind, seed=3):
    """An adapter whose every parameter is random (as after long tuning): the temporal attention is not a no-op."""
    adapter = untrained_adapter(model, kind)
    g = torch.Generator().manual_seed(seed)
    for name, module in adapter.modules().items():
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 0 else 0.0))
        module.refresh_spectral_norms(500)
        adapter.temporal[name] = module.state_dict()
    return adapter


def test_inside_core_context_windows_the_temporal_attention_sees_the_windows_frames_only():
    from tve.tests.hosts import context_window_calls, with_context_windows

    model = make_tiny_model("sd15")
    adapted = apply_adapter(model, random_adapter(model, "stam"))
    latent = make_latent(8, 8, 8)["samples"]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))
    sigmas = host.sigma_grid(model, "normal", 1)            # one step: every window starts from the same latents

    def sample(m, frames):
        return host.sample(m, noise[frames], 5.0, "euler", sigmas, make_conditioning("sd15", 1),
                           make_conditioning("sd15", 2), latent[frames])

    windowed_model = with_context_windows(adapted, 4)
    windowed = sample(windowed_model, slice(0, 8))
    # each window's call on its own (0.33+ puts the frame before a window in front of it: core drops its output)
    calls = context_window_calls(windowed_model, 8)
    apart = torch.cat([sample(adapted, list(ids))[len(ids) - 4:] for ids in calls])
    whole = sample(adapted, slice(0, 8))
    assert torch.allclose(windowed, apart, atol=1e-4 * apart.abs().max())
    assert not torch.allclose(whole, apart, atol=1e-2 * apart.abs().max())     # it does mix frames otherwise


# ---------------------------------------------------------------------------------------------- adapter identity (issue 24)
@pytest.fixture
def adapter_folder(tmp_path):
    with host.model_folder_at(host.ADAPTER_FOLDER, str(tmp_path)):
        yield tmp_path


def saved(adapter, name="a"):
    SaveTemporalAdapter.execute(adapter, name)
    return f"{name}_00001.safetensors"


def with_lora(model, strength):
    from tve.tests.test_model_identity import lora
    return lora(model, strength)


def test_an_adapter_records_the_weights_it_was_tuned_on_and_loads_only_onto_them_unless_allowed(adapter_folder):
    model, samples, cond = make_tiny_model("sd15"), make_latent(3, 8, 8)["samples"], make_conditioning("sd15")
    tuned, adapter, _ = OneShotTune.execute(model, {"samples": samples}, cond, 1, 1e-2, 0, "stam", "temporal+queries",
                                            False).result
    name = saved(adapter)
    path = host.adapter_path(name)
    loaded_model, _ = LoadTemporalAdapter.execute(model.clone(), name).result
    assert torch.equal(denoised(loaded_model, samples, cond), denoised(tuned, samples, cond))
    for other, what in [(make_tiny_model("sd15", seed=1), "other base weights"),
                        (with_lora(model, 0.05), "other weight patches")]:
        state = patch_state(other)
        with pytest.raises(ValueError, match=rf"^adapter_name: {re.escape(path)}: was tuned on a model whose weights "
                                             rf"differ from this model's: {what} .*set allow_other_checkpoint"):
            LoadTemporalAdapter.execute(other, name)
        assert patch_state(other) == state                                       # nothing patched
        shown = LoadTemporalAdapter.execute(other, name, allow_other_checkpoint=True)   # said on the node
        (note,) = shown.ui["text"]
        assert note.startswith(f"adapter_name: {path}: was tuned on other weights than this model's: {what}")
        assert "loaded anyway (allow_other_checkpoint is on)" in note
        allowed, _ = shown.result
        assert len(allowed.model_options["transformer_options"]["patches"]["middle_patch"]) == 1
    assert LoadTemporalAdapter.execute(model.clone(), name, allow_other_checkpoint=True).ui is None   # no note


def test_a_format_1_adapter_without_identity_loads_only_when_allowed(adapter_folder):
    import dataclasses
    model = make_tiny_model("sd15")
    name = saved(dataclasses.replace(untrained_adapter(model, "stam"), identity=None), "old")
    with pytest.raises(ValueError, match=r"^adapter_name: .*old_00001.safetensors: records no identity of the model "
                                         r"it was tuned on \(saved in format tve_temporal_adapter/1\)"):
        LoadTemporalAdapter.execute(model, name)
    shown = LoadTemporalAdapter.execute(model, name, allow_other_checkpoint=True)
    assert "loaded unchecked (allow_other_checkpoint is on)" in shown.ui["text"][0]


@pytest.mark.parametrize("case, error", [
    ("wrong_shape", r"its query delta for diffusion_model\.\S+\.attn1\.to_q\.weight is \(32, 16\) but this model's "
                    r"weight is \(32, 32\); load it onto the model it was tuned on"),
    ("unknown_block", r"holds a query delta for diffusion_model\.input_blocks\.9\.1\.transformer_blocks\.0\.attn1\.to_q"
                      r"\.weight, which is not a query projection of this model's transformer blocks"),
])
def test_a_query_delta_that_does_not_fit_the_model_is_refused_before_anything_is_patched(adapter_folder, case, error):
    model = make_tiny_model("sd15")
    adapter = untrained_adapter(model, "stam")
    key = next(k for k in adapter.query_diffs if k.endswith("attn1.to_q.weight"))
    if case == "wrong_shape":
        adapter.query_diffs[key] = torch.zeros(32, 16)
    else:
        adapter.query_diffs["diffusion_model.input_blocks.9.1.transformer_blocks.0.attn1.to_q.weight"] = \
            adapter.query_diffs.pop(key)
    name = saved(adapter, case)
    state = patch_state(model)
    for allow in (False, True):
        with pytest.raises(ValueError, match=rf"^adapter_name: .*{case}_00001.safetensors: {error}"):
            LoadTemporalAdapter.execute(model, name, allow_other_checkpoint=allow)
    assert patch_state(model) == state
