"""TVE_ApplyTokenFlow on the real host: passes, keyframe draws, equivalence with extended attention + PnP."""
import pytest
import torch

from tve.tests.hosts import (FAMILIES, cond_chunks_split, context_window_calls, make_conditioning, make_latent,
                             make_tiny_model, with_context_windows)

pytestmark = pytest.mark.real_host


class PassRecorder:
    """DIFFUSION_MODEL wrapper: per UNet call, the pass, its σ and the global frame ids it ran on."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        from tve.engine.run import call_frame_ids, current_pass
        frames = x.shape[0] // len(transformer_options["cond_or_uncond"])
        self.calls.append((current_pass(transformer_options).value, float(transformer_options["sigmas"][0]),
                           call_frame_ids(frames, transformer_options)))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def inverted(family="sd15", frames=16, steps=3, size=8):
    from tve.engine.inversion import invert
    model = make_tiny_model(family)
    cond = make_conditioning(family, seed=1)
    x_T, inversion = invert(model, make_latent(frames, size, size)["samples"], cond, steps, "ddim_uniform")
    return model, cond, x_T, inversion


def edit(model, x_T, sigmas, family="sd15", cfg=4.0):
    from tve.engine import host
    return host.sample(model, torch.zeros_like(x_T), cfg, "euler", sigmas, make_conditioning(family, 5),
                       make_conditioning(family, 6), x_T)


def tokenflow(model, inversion, interval=4, seed=7, mode="paper", attn=0.5, conv=0.8):
    from tve.nodes.edit_nodes import ApplyTokenFlow
    return ApplyTokenFlow.execute(model, inversion, interval, seed, mode, attn, conv).result[0]


def recorded(model):
    from tve.engine import host
    spy = PassRecorder()
    host.add_wrapper(model, host.DIFFUSION_MODEL, "test_spy", spy)
    return spy


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_edit_runs_16_frames_with_source_keyframe_and_full_passes(family):
    model, cond, x_T, inversion = inverted(family)
    patched = tokenflow(model, inversion)
    spy = recorded(patched)
    out = edit(patched, x_T, inversion.sigmas, family)
    assert out.shape == x_T.shape and torch.isfinite(out).all()
    passes = [c[0] for c in spy.calls]
    assert passes == ["source", "keyframes", "edit"] * 3
    for name, _, ids in spy.calls:
        if name == "keyframes":
            assert len(ids) == 4 and [i // 4 for i in ids] == [0, 1, 2, 3]


def test_keyframes_change_between_steps_and_repeat_with_the_same_seed():
    model, cond, x_T, inversion = inverted(steps=6)

    def draws(seed):
        patched = tokenflow(model, inversion, seed=seed)
        spy = recorded(patched)
        out = edit(patched, x_T, inversion.sigmas)
        return [ids for name, _, ids in spy.calls if name == "keyframes"], out

    first, out1 = draws(7)
    again, out2 = draws(7)
    other, _ = draws(8)
    assert first == again and torch.equal(out1, out2)
    assert len(set(first)) > 1
    assert other != first


def test_interval_one_equals_keyframe_attention_plus_injection():
    from tve.nodes.edit_nodes import ApplyCrossFrameAttention
    from tve.engine.injection import apply_feature_injection
    model, cond, x_T, inversion = inverted(frames=4, steps=3)
    via_tokenflow = edit(tokenflow(model, inversion, interval=1), x_T, inversion.sigmas)
    extended = ApplyCrossFrameAttention.execute(model, "keyframes", 1, 0, False, 2, 7, "all", 0.0, 1.0).result[0]
    reference = apply_feature_injection(extended, inversion, 0.5, 0.8, "tokenflow", "sigma-matched")
    expected = edit(reference, x_T, inversion.sigmas)
    assert torch.allclose(via_tokenflow, expected, atol=1e-4 * expected.abs().max())


def test_cond_and_uncond_split_by_memory_give_the_same_edit():
    model, cond, x_T, inversion = inverted(frames=8, steps=3)
    patched = tokenflow(model, inversion)
    together = edit(patched, x_T, inversion.sigmas)
    split = edit(cond_chunks_split(patched), x_T, inversion.sigmas)
    assert torch.allclose(together, split, atol=1e-4 * together.abs().max())


def test_official_propagation_runs_and_differs_from_paper():
    model, cond, x_T, inversion = inverted(frames=16, steps=2)
    paper = edit(tokenflow(model, inversion, mode="paper"), x_T, inversion.sigmas)
    official = edit(tokenflow(model, inversion, mode="official"), x_T, inversion.sigmas)
    assert torch.isfinite(official).all() and not torch.allclose(paper, official)


def test_core_context_windows_draw_keyframes_inside_each_window():
    model, cond, x_T, inversion = inverted(frames=16, steps=2)
    patched = tokenflow(model, inversion, interval=4)
    windowed = with_context_windows(patched, 8)
    spy = recorded(windowed)
    out = edit(windowed, x_T, inversion.sigmas)
    assert torch.isfinite(out).all()
    windows = context_window_calls(windowed, 16)                      # with core 0.33+'s causal frame first
    edit_calls = [ids for name, _, ids in spy.calls if name == "edit"]
    keyframe_calls = [ids for name, _, ids in spy.calls if name == "keyframes"]
    assert edit_calls == windows * 2                                  # 2 steps, every window's frames
    assert len(keyframe_calls) == 2 * len(windows)
    for ids, window in zip(keyframe_calls, windows * 2):
        # one keyframe per interval of global ids among the frames the call holds, the causal frame included
        assert set(ids) <= set(window) and sorted(i // 4 for i in ids) == sorted({i // 4 for i in window})


def test_bad_inputs_are_refused_before_sampling():
    model, cond, x_T, inversion = inverted(frames=4, steps=2)
    with pytest.raises(ValueError, match="keyframe_interval"):
        tokenflow(model, inversion, interval=0)
    with pytest.raises(ValueError, match="propagation"):
        tokenflow(model, inversion, mode="sideways")
    with pytest.raises(ValueError, match="inversion"):
        tokenflow(make_tiny_model("sdxl"), inversion)


# ---------------------------------------------------------------------------------------------- official full pass
class BlockRecorder:
    """Per UNet call: its pass and frame ids, every self-attention block's normed input (the attn1 patch, after
    TVE's), its self-attention output after ``to_out`` (attn1 output patch), the NN field TokenFlow computed there,
    and the output of the injected ResBlock's branch as the block after it reads it (a hook added per call, after
    the run's own)."""

    def __init__(self, model, monkeypatch, resblock):
        from tve.attention import tokenflow as math
        from tve.engine import host
        self.calls, self.resblock = [], resblock
        host.add_wrapper(model, host.DIFFUSION_MODEL, "test_blocks", self.call)
        model.set_model_attn1_patch(self.attn1_input)
        model.set_model_attn1_output_patch(self.attn1_output)
        field = math.Propagation.field
        monkeypatch.setattr(math.Propagation, "field", lambda p, *a, **k: self.field(field(p, *a, **k)))

    def call(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        from tve.engine.run import call_frame_ids, current_pass
        frames = x.shape[0] // len(transformer_options["cond_or_uncond"])
        record = {"pass": current_pass(transformer_options).value, "ids": call_frame_ids(frames, transformer_options),
                  "n": {}, "out": {}, "field": {}, "key": None}
        self.calls.append(record)
        hook = self.resblock.register_forward_hook(lambda m, i, o: record.__setitem__("resblock", o.clone()))
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            hook.remove()

    def attn1_input(self, n, context, value, extra_options):
        from tve.engine import host
        record = self.calls[-1]
        record["key"] = host.block_key(extra_options)
        record["n"].setdefault(record["key"], n.clone())
        return n, context, value

    def attn1_output(self, out, extra_options):
        self.calls[-1]["out"].setdefault(self.calls[-1]["key"], out.clone())
        return out

    def field(self, result):
        self.calls[-1]["field"].setdefault(self.calls[-1]["key"], result.clone())
        return result


def cosine_argmax(frames, keyframes):
    """Written out as the official code does (``util.batch_cosine_sim``, argmax): (F, T, C), (K, T, C) -> (F, K, T)."""
    a = frames.double() / frames.double().norm(dim=-1, keepdim=True)
    b = keyframes.double() / keyframes.double().norm(dim=-1, keepdim=True)
    return torch.einsum("ftc,ksc->fkts", a, b).argmax(-1)


def official_pairs(frames, interval):
    """omerbt/TokenFlow's rule, written out per frame: the keyframe of the frame's window (weight
    sigmoid(d2 / (d1 + d2)), d1, d2 the distances to the own and previous window's centres) and the previous
    window's keyframe, if any. -> [(own slot, previous slot, weight of own)]."""
    out = []
    for f in range(frames):
        w = f // interval
        if w == 0:
            out.append((0, 0, 1.0))
            continue
        d1, d2 = abs(f - (w * interval + interval // 2)), abs(f - ((w - 1) * interval + interval // 2))
        out.append((w, w - 1, float(torch.sigmoid(torch.tensor(d2 / (d1 + d2), dtype=torch.float64)))))
    return out


def tokenflow_records(mode, monkeypatch, frames=8, interval=4):
    from tve.engine.injection import injection_targets
    from tve.engine import host
    model, cond, x_T, inversion = inverted(frames=frames, steps=2)
    patched = tokenflow(model, inversion, interval=interval, seed=3, mode=mode)
    resblock = host.resblock_branch(patched, injection_targets(patched, "tokenflow")[1][0])
    recorder = BlockRecorder(patched, monkeypatch, resblock)
    edit(patched, x_T, inversion.sigmas)
    return recorder.calls


def test_official_full_pass_propagates_its_source_branch_and_reads_fields_from_it(monkeypatch):
    """The official full pass (tokenflow_utils.py, the non-pivotal TokenFlow block) gathers the keyframes' outputs
    into all three chunks, the source chunk included: so the source branch's first block is the keyframes'
    per-frame source outputs propagated (written out here), its second block's tokens are no longer the per-frame
    source's, and the fields of block 2 (and the ResBlock feature the edit gets) are the propagated source's. At
    every block the branch's own field gathers the keyframes' per-frame source outputs into it and the keyframe
    pass's outputs into the edit (the reference's blend, written out). ``paper`` keeps the per-frame source. Step 0
    of each run; the keyframe draw is the same in both modes."""
    frames, interval = 8, 4
    official = tokenflow_records("official", monkeypatch, frames, interval)
    paper = tokenflow_records("paper", monkeypatch, frames, interval)
    assert [c["pass"] for c in official[:4]] == ["source", "keyframes", "source", "edit"]
    assert [c["pass"] for c in paper[:3]] == ["source", "keyframes", "edit"]
    per_frame_keyframes, _, propagated, edited = official[:4]
    per_frame = paper[0]
    keyframe_ids = list(per_frame_keyframes["ids"])
    assert keyframe_ids == list(official[1]["ids"]) == list(paper[1]["ids"]) and len(keyframe_ids) == 2
    assert list(propagated["ids"]) == list(per_frame["ids"]) == list(range(frames))
    first, second = list(propagated["n"])[:2]

    # block 1: same tokens as the per-frame source; its output is the keyframes' per-frame outputs propagated
    assert torch.allclose(propagated["n"][first], per_frame["n"][first], atol=1e-5)
    field = cosine_argmax(propagated["n"][first], per_frame_keyframes["n"][first])        # (F, K, T)
    keyframe_out = per_frame_keyframes["out"][first]                                        # (K, T, C)
    expected = torch.stack([w * keyframe_out[own][field[f, own]] + (1 - w) * keyframe_out[prev][field[f, prev]]
                            for f, (own, prev, w) in enumerate(official_pairs(frames, interval))])
    assert torch.allclose(propagated["out"][first], expected, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(propagated["out"][first], per_frame["out"][first], atol=1e-2)

    # block 2: the propagated source's tokens differ from the per-frame source's, and each mode's field is its own
    assert not torch.allclose(propagated["n"][second], per_frame["n"][second], atol=1e-2)
    keyframes_2 = per_frame_keyframes["n"][second]
    assert torch.allclose(keyframes_2, per_frame["n"][second][keyframe_ids], atol=1e-5)
    pairs = torch.tensor([[own, prev] for own, prev, _ in official_pairs(frames, interval)])
    at_pairs = lambda full: full.gather(1, pairs[:, :, None].expand(-1, -1, full.shape[-1]))   # (F, 2, T)
    from_propagated = at_pairs(cosine_argmax(propagated["n"][second], keyframes_2))
    from_per_frame = at_pairs(cosine_argmax(per_frame["n"][second], keyframes_2))
    assert (from_propagated != from_per_frame).float().mean() > 0.1                    # the test can tell them apart
    official_field = propagated["field"][second]
    assert (official_field == from_propagated).float().mean() > 0.99
    from tve.attention.tokenflow import propagation_weights
    paper_pair, _ = propagation_weights(range(frames), keyframe_ids, "paper", interval)
    paper_expected = cosine_argmax(per_frame["n"][second], keyframes_2).gather(
        1, paper_pair[:, :, None].expand(-1, -1, official_field.shape[-1]))
    assert (paper[2]["field"][second] == paper_expected).float().mean() > 0.99
    assert not edited["field"] and not propagated["field"].keys() - propagated["n"].keys()   # the edit reuses them

    # every block: the field of the propagated branch's own tokens, which both its outputs and the edit's read
    keyframes_pass = official[1]
    for key, tokens in propagated["n"].items():
        field = propagated["field"][key]                                                  # (F, 2, T)
        assert (field == at_pairs(cosine_argmax(tokens, per_frame_keyframes["n"][key]))).float().mean() > 0.99, key
        for out, keyframe_out in ((propagated["out"][key], per_frame_keyframes["out"][key]),
                                  (edited["out"][key], keyframes_pass["out"][key])):
            chunks = keyframe_out.shape[0] // len(keyframe_ids)
            keyframe_out = keyframe_out.view(chunks, len(keyframe_ids), *keyframe_out.shape[1:])
            expected = torch.stack([torch.stack([w * kf[own][field[f, 0]] + (1 - w) * kf[prev][field[f, 1]]
                                                 for f, (own, prev, w) in enumerate(official_pairs(frames, interval))])
                                    for kf in keyframe_out]).flatten(0, 1)
            assert torch.allclose(out, expected, atol=1e-5 * float(expected.abs().max())), key

    # the ResBlock feature the edit gets is the propagated source's (and not the per-frame source's)
    chunks = edited["resblock"].shape[0] // frames
    assert torch.equal(edited["resblock"], propagated["resblock"].repeat(chunks, 1, 1, 1))
    assert not torch.allclose(propagated["resblock"], per_frame["resblock"], atol=1e-2)
    assert torch.equal(paper[2]["resblock"], per_frame["resblock"].repeat(chunks, 1, 1, 1))
