"""host.weights_fingerprint on the real host: it identifies the UNet's weights as the sampler runs them — equal for
clones and for every patch TVE adds (attention patches, wrappers, attachments, object patches), different for
another checkpoint of the same layout, a LoRA (even at strength 0.01), a temporal adapter's query deltas and a
tuned model; device- and dtype-agnostic up to fp16/bf16 rounding; the base read right while a patched clone is
loaded. validation.same_weights words the refusal."""
import pytest
import torch

from tve.engine import host, validation
from tve.tests.hosts import FAMILIES, make_conditioning, make_latent, make_tiny_model

pytestmark = pytest.mark.real_host


def fingerprint(model):
    return host.weights_fingerprint(model)


def difference(a, b):
    return validation.weights_difference(fingerprint(a), fingerprint(b))


def lora(model, strength, seed=0, rank=2):
    """A clone with a LoRA on every attention projection, through core's LoRA loader (``host.add_lora``: the
    LoraLoaderModelOnly path) from a kohya-style state dict (``lora_unet_`` and the weight's UNet path with ``_``
    for ``.``), in the UNet's weight order."""
    g = torch.Generator().manual_seed(seed)
    keys = [f"{block.path}.{attn}.{proj}.weight" for block in host.attention_blocks(model)
            for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v")]
    state = {}
    for weight_key, (out_features, in_features) in host.weight_shapes(model, keys).items():
        lora_key = "lora_unet_" + weight_key[len("diffusion_model."):-len(".weight")].replace(".", "_")
        state[f"{lora_key}.lora_up.weight"] = torch.randn(out_features, rank, generator=g)
        state[f"{lora_key}.lora_down.weight"] = torch.randn(rank, in_features, generator=g)
        state[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    assert state
    patched = host.add_lora(model, state, strength)
    assert len(patched.patches) == len(state) // 3
    return patched


def with_every_tve_patch(model):
    """A clone with what TVE's nodes add to a MODEL: attn1 patches and replaces, a middle patch, keyed wrappers, an
    attachment and an object patch (the masked-edit inpaint latent)."""
    from tve.nodes.edit_nodes import ApplyCrossFrameAttention
    m, = ApplyCrossFrameAttention.execute(model, "dense", 2, 0, False, 2, 0, "all", 0.0, 1.0).result
    m = m.clone()
    host.ensure_attn1_patch(m, lambda n, c, v, extra_options: (n, c, v))
    host.set_middle_patch(m, lambda x, extra_options: x)
    host.set_wrapper(m, host.APPLY_MODEL, lambda executor, *args, **kwargs: executor(*args, **kwargs))
    host.set_attachment(m, object(), "tve_test")
    host.set_inpaint_latent(m, lambda sigma, noise, latent_image, x=None, **kwargs: latent_image)
    return m


@pytest.mark.parametrize("family", FAMILIES)
def test_clones_and_every_tve_patch_leave_the_fingerprint_as_it_was(family):
    model = make_tiny_model(family)
    assert difference(model, model.clone()) is None
    assert difference(model, with_every_tve_patch(model)) is None
    with_lora = lora(model, 0.5)
    assert difference(with_lora, with_every_tve_patch(with_lora).clone()) is None


def test_the_same_lora_loaded_twice_is_the_same_weights_and_its_strength_counts():
    model = make_tiny_model("sd15")
    assert difference(lora(model, 0.5), lora(model, 0.5)) is None
    assert "other weight patches" in difference(lora(model, 0.5), lora(model, 0.25))
    assert "other weight patches" in difference(lora(model, 0.5), lora(model, 0.5, seed=1))


@pytest.mark.parametrize("strength", [1.0, 0.01])
def test_a_lora_even_at_small_strength_is_another_model(strength):
    model = make_tiny_model("sd15")
    assert "other weight patches (a LoRA" in difference(model, lora(model, strength))


def test_another_checkpoint_of_the_same_layout_and_another_family_are_other_weights():
    assert "other base weights" in difference(make_tiny_model("sd15"), make_tiny_model("sd15", seed=1))
    assert "another layout" in difference(make_tiny_model("sd15"), make_tiny_model("sd2"))
    tweaked = make_tiny_model("sd15")
    with torch.no_grad():                              # a fine-tune of one tensor by 1 %
        tweaked.model.diffusion_model.out[2].weight.mul_(1.01)
    assert "other base weights" in difference(make_tiny_model("sd15"), tweaked)


def test_temporal_adapter_deltas_and_a_tuned_model_are_other_weights():
    from tve.nodes.one_shot_nodes import OneShotTune
    from tve.tests.test_one_shot import untrained_adapter
    from tve.engine.temporal_adapter import apply_adapter
    model = make_tiny_model("sd15")
    adapter = untrained_adapter(model, "stam")
    adapter.query_diffs.update({k: torch.full_like(d, 1e-3) for k, d in adapter.query_diffs.items()})
    assert "other weight patches" in difference(model, apply_adapter(model, adapter))
    tuned, _, _ = OneShotTune.execute(model, make_latent(3, 8, 8), make_conditioning("sd15"), 1, 1e-2, 0, "stam",
                                      "temporal+queries", False).result
    assert "other weight patches" in difference(model, tuned)


def test_a_weight_wrapper_is_part_of_the_weights():
    model = make_tiny_model("sd15")
    key = host.query_weight_keys(host.attention_blocks(model)[0])[0]
    m = model.clone()
    host.add_trainable_weight_diff(m, key, torch.nn.Parameter(torch.full((32, 32), 0.1)))
    assert "other weight patches" in difference(model, m)


def cast(model, dtype):
    """``model`` with its BaseModel's weights cast to ``dtype`` in place."""
    model.model.to(dtype)
    return model


def test_the_same_weights_in_fp16_or_bf16_are_the_same_model_and_in_fp8_they_are_not():
    model = make_tiny_model("sd15")
    for dtype in (torch.float16, torch.bfloat16):
        assert difference(model, cast(make_tiny_model("sd15"), dtype)) is None, dtype
    assert "other base weights" in difference(model, cast(make_tiny_model("sd15"), torch.float8_e4m3fn))


def test_while_a_lora_clone_is_loaded_with_its_weights_patched_in_place_the_base_still_reads_as_the_base():
    model = make_tiny_model("sd15")
    patched = lora(model, 1.0)
    before_base, before_lora = fingerprint(model), fingerprint(patched)
    host.load_model(patched)
    try:
        key = next(iter(patched.patches))
        live = model.get_model_object(key)
        assert key in patched.backup and not torch.equal(live, patched.backup[key].weight)  # patched in place
        assert validation.weights_difference(before_base, fingerprint(model)) is None
        assert validation.weights_difference(before_lora, fingerprint(patched)) is None
    finally:
        host.unload_models()


def test_same_weights_names_the_wire_and_says_what_differs():
    model = make_tiny_model("sd15")
    with pytest.raises(ValueError, match=r"^inversion: was made with a model whose weights differ from this model's: "
                                         r"other weight patches \(a LoRA or other patch added, removed, or at another "
                                         r"strength\) \(there: 286 UNet weights; here: 286 UNet weights, weight "
                                         r"patches \(LoRA, tuning, merges\) on 42\); invert with the MODEL you edit"):
        validation.same_weights(fingerprint(model), fingerprint(lora(model, 0.3)), "inversion",
                                "was made with a model", "invert with the MODEL you edit with")
    validation.same_weights(fingerprint(model), fingerprint(with_every_tve_patch(model)), "inversion", "", "")


def test_hook_patches_are_part_of_the_weights_whatever_order_the_hooks_were_added_in():
    model = make_tiny_model("sd15")
    keys = [host.query_weight_keys(b)[0] for b in host.attention_blocks(model)[:2]]
    hooks = [host.new_weight_hook(), host.new_weight_hook()]

    def hooked(order):
        m = model.clone()
        for i in order:
            m.add_hook_patches(hooks[i], {keys[i]: (torch.full((32, 32), 0.1 * (i + 1)),)}, 1.0)
        return m

    assert "other weight patches" in difference(model, hooked([0]))
    assert difference(hooked([0, 1]), hooked([1, 0])) is None
    assert difference(hooked([0, 1]), hooked([0])) is not None


# ---------------------------------------------------------------------------------------------- the INVERSION's model
def inverted(model, frames=3, steps=3):
    from tve.engine.inversion import invert
    x_T, inversion = invert(model, make_latent(frames, 8, 8)["samples"], make_conditioning("sd15", seed=1), steps,
                            "ddim_uniform")
    return x_T, inversion


def edit(model, x_T, inversion):
    return host.sample(model, torch.zeros_like(x_T), 4.0, "euler", inversion.sigmas, make_conditioning("sd15", 5),
                       make_conditioning("sd15", 6), x_T)


def readers(allow=False):
    """Each node that reads an INVERSION, as ``(name, apply(model, inversion) -> node output)``."""
    from tve.nodes.edit_nodes import ApplyFeatureInjection, ApplyTokenFlow
    from tve.nodes.measure_nodes import PreviewFeatures
    return [
        ("Apply Feature Injection (TVE)",
         lambda m, inv: ApplyFeatureInjection.execute(m, inv, 0.5, 0.8, "tokenflow", "sigma-matched", allow)),
        ("Apply TokenFlow (TVE)", lambda m, inv: ApplyTokenFlow.execute(m, inv, 2, 0, "paper", 0.5, 0.8, allow)),
        ("Preview Features (TVE)", lambda m, inv: PreviewFeatures.execute(m, inv, 0.5, "output latent", 2, 1, allow)),
    ]


def test_an_inversion_records_the_weights_of_the_model_it_was_made_with_as_patched():
    model = make_tiny_model("sd15")
    with_lora = lora(model, 0.5)
    assert validation.weights_difference(inverted(with_lora)[1].weights, fingerprint(with_lora)) is None
    assert "other weight patches" in validation.weights_difference(inverted(model)[1].weights, fingerprint(with_lora))


@pytest.mark.parametrize("other, what", [
    (lambda model: lora(model, 0.3), "other weight patches (a LoRA or other patch added, removed, or at another "
                                     "strength)"),
    (lambda model: make_tiny_model("sd15", seed=1), "other base weights (another checkpoint of the same layout"),
])
def test_every_node_reading_an_inversion_refuses_a_model_of_other_weights_naming_the_wire(other, what):
    model = make_tiny_model("sd15")
    _, inversion = inverted(model)
    for name, apply in readers():
        m = other(model)
        before = (host.get_attachment(m), dict(m.model_options["transformer_options"]))
        with pytest.raises(ValueError) as refusal:
            apply(m, inversion)
        message = str(refusal.value)
        assert message.startswith(f"inversion: made with a model whose weights differ from this model's: {what}"), name
        assert f"invert with the MODEL you edit with" in message and f"allow_other_weights on {name}" in message, name
        assert (host.get_attachment(m), dict(m.model_options["transformer_options"])) == before, name   # unpatched


def test_tve_patches_on_either_side_are_not_other_weights():
    from tve.nodes.edit_nodes import ApplyFeatureInjection
    model = make_tiny_model("sd15")
    x_T, inversion = inverted(with_every_tve_patch(model))         # FLATTEN-style: inverted with TVE patches on
    out = ApplyFeatureInjection.execute(model, inversion, 0.5, 0.8, "tokenflow", "sigma-matched")
    assert out.ui is None                                          # nothing to say
    for _, apply in readers():
        apply(with_every_tve_patch(model), inversion)


def test_allowed_other_weights_are_said_on_the_node_and_once_in_the_server_log(caplog):
    model = make_tiny_model("sd15")
    x_T, inversion = inverted(model)
    styled = lora(model, 0.3)
    for name, apply in readers(allow=True):
        with caplog.at_level("WARNING"):
            caplog.clear()
            shown = apply(styled, inversion)
        (note,) = shown.ui["text"]
        assert note.startswith(f"{name}: edits with other weights than the inversion was made with: other weight "
                               "patches (a LoRA"), note
        assert "allowed by allow_other_weights" in note
        assert [r.getMessage() for r in caplog.records if "[TVE]" in r.getMessage()] == [f"[TVE] {note}"]
    patched = readers(allow=True)[0][1](styled, inversion).result[0]
    with caplog.at_level("WARNING"):
        caplog.clear()
        out = edit(patched, x_T, inversion)                          # said by the node already: not again
    assert bool(torch.isfinite(out).all())
    assert not [r for r in caplog.records if "[TVE]" in r.getMessage()]


def test_a_lora_added_after_the_node_is_refused_when_sampling_starts_or_said_once_where_allowed(caplog):
    from tve.nodes.edit_nodes import ApplyFeatureInjection, ApplyTokenFlow
    model = make_tiny_model("sd15")
    x_T, inversion = inverted(model)
    for node in (lambda m: ApplyFeatureInjection.execute(m, inversion, 0.5, 0.8, "tokenflow",
                                                         "sigma-matched").result[0],
                 lambda m: ApplyTokenFlow.execute(m, inversion, 2, 0, "paper", 0.5, 0.8).result[0]):
        with pytest.raises(ValueError, match=r"^inversion: made with a model whose weights differ from this model's: "
                                             r"other weight patches .*allow_other_weights on Apply"):
            edit(lora(node(model), 0.3), x_T, inversion)
    allowed = ApplyTokenFlow.execute(model, inversion, 2, 0, "paper", 0.5, 0.8, True).result[0]   # same weights
    styled_after = lora(allowed, 0.3)
    with caplog.at_level("WARNING"):
        caplog.clear()
        edit(styled_after, x_T, inversion)
        edit(styled_after, x_T, inversion)
    said = [r.getMessage() for r in caplog.records if "[TVE]" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("[TVE] Apply TokenFlow (TVE): edits with other weights than the "
                                                 "inversion was made with: other weight patches"), said


def test_with_injection_and_tokenflow_the_node_whose_settings_remain_decides_about_other_weights(caplog):
    from tve.nodes.edit_nodes import ApplyFeatureInjection, ApplyTokenFlow
    model = make_tiny_model("sd15")
    x_T, inversion = inverted(model)

    def injection(m, allow):
        return ApplyFeatureInjection.execute(m, inversion, 0.5, 0.8, "tokenflow", "sigma-matched", allow).result[0]

    def tokenflow(m, allow):
        return ApplyTokenFlow.execute(m, inversion, 2, 0, "paper", 0.5, 0.8, allow).result[0]

    # TokenFlow allows, then Feature Injection (not allowing) replaces its injection settings: refused, naming it
    with pytest.raises(ValueError, match=r"^inversion: .*allow_other_weights on Apply Feature Injection \(TVE\)"):
        edit(lora(injection(tokenflow(model, True), False), 0.3), x_T, inversion)
    # Feature Injection (not allowing), then TokenFlow (allowing) replaces it: allowed, said once by TokenFlow
    with caplog.at_level("WARNING"):
        caplog.clear()
        edit(lora(tokenflow(injection(model, False), True), 0.3), x_T, inversion)
    said = [r.getMessage() for r in caplog.records if "other weights" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("[TVE] Apply TokenFlow (TVE): edits with other weights"), said
