"""Every ordered pair of TVE features on one MODEL: it composes into what it means, or the second node refuses
at once naming both nodes (and the order that works). Real host, tiny SD1.5 model, two sampled steps each."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tve.tests.hosts import make_conditioning, make_latent, make_tiny_model

pytestmark = pytest.mark.real_host

FRAMES, SIZE, STEPS = 4, 8, 2
CROSS_FRAME_MODES = ("keyframes", "dense", "anchor", "fine_coarse")
ITEMS = ("FLATTEN", *(f"cross-frame {m}" for m in CROSS_FRAME_MODES), "injection", "TokenFlow", "motion+anchor")
NODE_NAMES = {"FLATTEN": "Apply FLATTEN (TVE)", "injection": "Apply Feature Injection (TVE)",
              "TokenFlow": "Apply TokenFlow (TVE)", "motion+anchor": "Motion Dynamics Latents (TVE)",
              **{f"cross-frame {m}": "Apply Cross-Frame Attention (TVE)" for m in CROSS_FRAME_MODES}}


def outcome(first: str, second: str) -> str:
    """The combination table (docs/stacking.md): 'composes' or 'refused'."""
    attention = lambda item: item == "FLATTEN" or item.startswith("cross-frame") or item == "motion+anchor"  # noqa
    flatten_like = {first == "FLATTEN", second == "FLATTEN"}
    if first == "TokenFlow" and (attention(second) or second == "FLATTEN"):
        return "refused"                        # TokenFlow must be the last attention feature
    if True in flatten_like and (attention(first) and attention(second)) and first != second:
        return "refused"                        # FLATTEN and cross-frame attention: one of them
    if second == "TokenFlow" and first in ("cross-frame anchor", "motion+anchor"):
        return "refused"                        # the keyframe pass does not hold the anchor frame
    if second == "motion+anchor" and first in ("FLATTEN", "injection", "TokenFlow"):
        return "refused"                        # motion dynamics samples one new frame from noise
    return "composes"


@pytest.fixture(scope="module")
def world():
    from tve.flow.estimate import FlowField
    from tve.flow.trajectories import build_trajectories
    from tve.engine.inversion import invert
    from tve.tools.video_world import render_clip
    model = make_tiny_model("sd15")
    cond = make_conditioning("sd15", seed=1)
    x_T, inversion = invert(model, make_latent(FRAMES, SIZE, SIZE)["samples"], cond, STEPS, "ddim_uniform")
    clip = render_clip(FRAMES, SIZE * 8, SIZE * 8, seed=0, sprites=1)
    flow = FlowField(forward=clip.flow_forward, backward=clip.flow_backward, occlusion=clip.occlusion_forward,
                     method="ground truth")
    return dict(model=model, x_T=x_T, inversion=inversion, trajectories=build_trajectories(flow, (SIZE, SIZE), seed=0))


def applied(world, model, item: str, motion: list):
    from tve.engine.cross_frame import apply_cross_frame
    from tve.engine.flatten import apply_flatten
    from tve.engine.injection import apply_feature_injection
    from tve.engine.motion_dynamics import motion_dynamics
    from tve.engine.tokenflow import apply_tokenflow
    inversion = world["inversion"]
    if item == "FLATTEN":
        return apply_flatten(model, world["trajectories"], "highest resolution", "dense_output")
    if item.startswith("cross-frame"):
        return apply_cross_frame(model, item.split()[1], FRAMES, 0, False, 2, 3, "all", 0.0, 1.0)
    if item == "injection":
        return apply_feature_injection(model, inversion, 1.0, 1.0, "tokenflow", "sigma-matched")
    if item == "TokenFlow":
        return apply_tokenflow(model, inversion, FRAMES, 7, "paper", 0.5, 0.8)     # one keyframe per step
    motion.append(motion_dynamics(model, make_conditioning("sd15", 5), make_conditioning("sd15", 6),
                                  (4, SIZE, SIZE), 0, FRAMES, 1.0, 0.0, STEPS, 3.0, "ddim_uniform", 0, 1))
    return apply_cross_frame(model, "anchor", FRAMES, 0, False, 2, 3, "all", 0.0, 1.0)


class Recorder:
    """The passes of every UNet call, and each block's attn1 output (after to_out) per pass and cond chunk."""

    def __init__(self, model):
        from tve.engine import host
        self.calls, self.outputs = [], []
        host.add_wrapper(model, host.DIFFUSION_MODEL, "test_spy", self.unet_call)
        model.set_model_attn1_output_patch(self.attn1_output)

    def unet_call(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        from tve.engine.run import current_pass
        self.calls.append(current_pass(transformer_options).value)
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    def attn1_output(self, n, extra_options):
        from tve.engine.run import current_pass
        key = (*extra_options["block"], extra_options["block_index"])
        chunks = n.reshape(len(extra_options["cond_or_uncond"]), -1, *n.shape[1:])      # (chunks, F, T, C)
        self.outputs.append((len(self.calls), current_pass(extra_options).value, key, chunks.detach().clone()))
        return n


def sampled(world, model, motion: list):
    from tve.engine import host
    from tve.engine.stack import stack_of
    # A model that reads the inversion edits its x_T (the start latent is checked against it before the first
    # step); otherwise the motion-dynamics latents, when the pair made them, are what it samples.
    use_motion = motion and stack_of(model).inversion is None
    latent, sigmas = (motion[-1].raw_latents, motion[-1].sigmas) if use_motion else (world["x_T"],
                                                                                    world["inversion"].sigmas)
    return host.sample(model, torch.zeros_like(latent), 2.0, "euler", sigmas, make_conditioning("sd15", 5),
                       make_conditioning("sd15", 6), latent)


def expected_passes(pair: tuple[str, str]) -> list[str]:
    if "TokenFlow" in pair:
        return ["source", "keyframes", "edit"] * STEPS
    if "injection" in pair:
        return ["source", "edit"] * STEPS
    return ["edit"] * STEPS


def assert_edit_outputs_are_keyframe_tokens(recorder: Recorder) -> None:
    """With one keyframe per step, every attn1 output token of the edit pass is one of the keyframe pass's."""
    checked = 0
    keyframe_out = {}
    for call, name, key, chunks in recorder.outputs:
        if name == "keyframes":
            keyframe_out[key] = chunks                                    # (chunks, 1, T, C)
        elif name == "edit":
            kf = keyframe_out.pop(key)
            for c in range(chunks.shape[0]):
                tokens = chunks[c].reshape(-1, chunks.shape[-1])          # (F·T, C)
                pool = kf[c].reshape(-1, kf.shape[-1])                    # (T, C)
                distance = torch.cdist(tokens.double(), pool.double(), compute_mode="donot_use_mm_for_euclid_dist").amin(1)
                assert distance.max() <= 1e-4 * (1 + pool.abs().max()), (key, float(distance.max()))
            checked += 1
    assert checked == STEPS * 7                                           # every block of the tiny UNet, each step


PAIRS = [(a, b) for a in ITEMS for b in ITEMS]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}->{p[1]}".replace(" ", "_"))
def test_each_ordered_pair_composes_or_the_second_node_refuses_naming_both(world, pair):
    from tve.engine.methods import Refused
    first, second = pair
    motion: list = []
    model = applied(world, world["model"], first, motion)
    if outcome(first, second) == "refused":
        with pytest.raises(Refused) as refusal:
            applied(world, model, second, motion)
        message = str(refusal.value)
        on_model = "Apply Cross-Frame Attention (TVE)" if first == "motion+anchor" else NODE_NAMES[first]
        assert on_model in message and NODE_NAMES[second] in message, message
        assert re.search(r"Apply .* first|neither order|Give .* the model from before|Use mode|without", message)
        return
    model = applied(world, model, second, motion)
    recorder = Recorder(model)
    out = sampled(world, model, motion)
    assert torch.isfinite(out).all()
    assert recorder.calls == expected_passes(pair)
    if "TokenFlow" in pair:
        assert_edit_outputs_are_keyframe_tokens(recorder)


def test_injection_and_attention_features_commute(world):
    motion: list = []
    for other in ("FLATTEN", "cross-frame keyframes", "cross-frame fine_coarse"):
        one = sampled(world, applied(world, applied(world, world["model"], "injection", motion), other, motion), [])
        two = sampled(world, applied(world, applied(world, world["model"], other, motion), "injection", motion), [])
        assert torch.equal(one, two), other


def test_a_feature_applied_again_is_one_feature_with_the_later_settings(world):
    from tve.engine.cross_frame import apply_cross_frame
    from tve.engine.flatten import apply_flatten
    from tve.engine.injection import apply_feature_injection
    from tve.engine.tokenflow import apply_tokenflow
    model, inversion, trajectories = world["model"], world["inversion"], world["trajectories"]
    later = {
        "injection": lambda m: apply_feature_injection(m, inversion, 1.0, 0.5, "flatten", "sigma-matched"),
        "TokenFlow": lambda m: apply_tokenflow(m, inversion, 2, 3, "official", 1.0, 1.0),
        "FLATTEN": lambda m: apply_flatten(m, trajectories, "all", "projections"),
        "cross-frame": lambda m: apply_cross_frame(m, "dense", 2, 0, False, 2, 3, "all", 0.0, 1.0),
    }
    earlier = {
        "injection": lambda m: apply_feature_injection(m, inversion, 0.0, 1.0, "tokenflow", "clean-first"),
        "TokenFlow": lambda m: apply_tokenflow(m, inversion, 4, 7, "paper", 0.0, 0.0),
        "FLATTEN": lambda m: apply_flatten(m, trajectories, "highest resolution", "dense_output"),
        "cross-frame": lambda m: apply_cross_frame(m, "anchor", 2, 1, True, 2, 3, "all", 0.0, 1.0),
    }
    for name in later:
        alone = sampled(world, later[name](model), [])
        again = sampled(world, later[name](earlier[name](model)), [])
        assert torch.equal(alone, again), name
    # TokenFlow brings its own injection settings: injection before it is overridden, injection after it wins.
    tokenflow = lambda m, a, c: apply_tokenflow(m, inversion, 2, 3, "paper", a, c)  # noqa: E731
    assert torch.equal(sampled(world, tokenflow(earlier["injection"](model), 0.5, 0.8), []),
                       sampled(world, tokenflow(model, 0.5, 0.8), []))
    after = apply_feature_injection(tokenflow(model, 0.0, 0.0), inversion, 1.0, 1.0, "tokenflow", "sigma-matched")
    assert torch.equal(sampled(world, after, []), sampled(world, tokenflow(model, 1.0, 1.0), []))


def test_a_model_runs_one_source_pass_per_step_for_injection_and_tokenflow_together(world):
    model = applied(world, applied(world, world["model"], "TokenFlow", []), "injection", [])
    recorder = Recorder(model)
    sampled(world, model, [])
    assert recorder.calls.count("source") == STEPS


def test_features_read_one_inversion(world):
    from tve.engine.injection import apply_feature_injection
    from tve.engine.inversion import invert
    from tve.engine.methods import Refused
    _, other = invert(world["model"], make_latent(FRAMES, SIZE, SIZE, seed=9)["samples"],
                      make_conditioning("sd15", seed=1), STEPS, "ddim_uniform")
    model = applied(world, world["model"], "TokenFlow", [])
    with pytest.raises(Refused, match="Apply Feature Injection .* after Apply TokenFlow .* same DDIM Inversion"):
        apply_feature_injection(model, other, 1.0, 1.0, "tokenflow", "sigma-matched")


def test_documented_stacking_table_is_the_tested_one():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "stacking.md").read_text(encoding="utf-8")
    section = next(block for block in doc.split("\n\n") if block.startswith("| first"))
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0][1:]]
    assert header == list(ITEMS)
    table = {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows[2:]}
    assert list(table) == list(ITEMS)
    for first in ITEMS:
        for second, cell in zip(ITEMS, table[first]):
            expected = "✓" if outcome(first, second) == "composes" else "✗"
            assert cell.startswith(expected), (first, second, cell)
