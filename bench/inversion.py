"""Inversion and live-injection cost against plain sampling, and finer inversion's reconstruction error, on the
real host with the trained test model (one run, ratios first).

    COMFYUI_PATH=/path/to/ComfyUI python bench/inversion.py [--frames 16] [--size 32] [--steps 10]
        [--recon-steps 10 25 50] [--multiples 1 5 10] [--recon-frames 8] [--recon-size 16]
        [--testbed test_model|test_model_256] [--finer-only]

Targets (issue 3): inversion / plain CFG sampling ≤ 0.6× (one branch instead of two); live injection adds one
source pass (one branch) to the two CFG branches, ≈ 1.5× plain. Issue 15: inverting with 10× the sampling steps
(the papers' practice) and sampling back on the sampling grid cuts the reconstruction error by ≈ 40 %. Issue 23:
the inversion formula, ε at the current σ (FLATTEN's code) or the next σ (TokenFlow's code), interleaved.
The three timed runs are interleaved (``_timing``: best and median of ``--repeats`` rounds, one torch thread by
default).
"""
import argparse

import _timing
import _tve

_tve.real_host()

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import torch  # noqa: E402

from tve.engine.injection import apply_feature_injection  # noqa: E402
from tve.engine.inversion import FORMULAS, invert  # noqa: E402
from tve.tools.train_test_model import HELD_OUT_SEED, TESTBEDS  # noqa: E402
from tve.tools.video_world import frames_to_latent, render_clip  # noqa: E402
from tve.tests.trained_model import load_trained_model, trained_conditioning  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--recon-steps", type=int, nargs="+", default=[10, 25, 50])
    ap.add_argument("--recon-frames", type=int, default=8)
    ap.add_argument("--recon-size", type=int, help="latent size (default: the testbed's frame size / 8)")
    ap.add_argument("--multiples", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--testbed", choices=sorted(TESTBEDS), default="test_model")
    ap.add_argument("--finer-only", action="store_true", help="only the finer-inversion reconstruction figures")
    _timing.add_arguments(ap, repeats=2, backends=())
    opts = ap.parse_args()
    _timing.pin_threads(opts.threads)
    # The trained test model: a random-weight UNet's inversion diverges to extreme values whose float arithmetic
    # is several times slower on the CPU, which would time the divergence instead of the method.
    model = load_trained_model(opts.testbed)
    source, target, negative = (trained_conditioning(n, opts.testbed) for n in ("source", "target", "empty"))
    recon_size = opts.recon_size or TESTBEDS[opts.testbed].frame_size // 8

    def finer() -> None:
        finer_inversion(model, source, opts.recon_frames, recon_size, opts.recon_steps, tuple(opts.multiples),
                        label=f"tools/{opts.testbed}")

    if opts.finer_only:
        return finer()
    clip = render_clip(opts.frames, opts.size * 8, opts.size * 8, seed=HELD_OUT_SEED)
    latent = frames_to_latent(clip.frames)
    euler = comfy.samplers.sampler_object("euler")
    state = {}

    def inversion():
        state["x_T"], state["inv"] = invert(model, latent, source, opts.steps, "ddim_uniform")

    inversion()
    sigmas = state["inv"].sigmas
    zeros = torch.zeros_like(latent)

    def plain():
        comfy.sample.sample_custom(model, zeros, 7.5, euler, sigmas, target, negative, state["x_T"], disable_pbar=True)

    patched = apply_feature_injection(model, state["inv"], 0.5, 0.8, "tokenflow", "sigma-matched")

    def injected():
        comfy.sample.sample_custom(patched, zeros, 7.5, euler, sigmas, target, negative, state["x_T"],
                                   disable_pbar=True)

    shape = f"{opts.frames} frames, {opts.size}x{opts.size} latent, {opts.steps} steps, the trained test model, CPU"
    _timing.header(f"inversion and live injection vs plain CFG sampling, {shape}")
    times = _timing.interleaved({"inversion": inversion, "plain": plain, "injected": injected}, opts.repeats)
    print(_timing.ratio_line(times, "inversion", "plain", "inversion / plain CFG sampling"))
    print(_timing.ratio_line(times, "injected", "plain", "live injection edit (attn 0.5, conv 0.8) / plain CFG "
                             "sampling"), flush=True)
    finer()


def finer_inversion(model, source, frames: int, size: int, steps_list, multiples=(1, 5, 10),
                    formulas=FORMULAS, label: str = "the trained test model") -> None:
    """Relative reconstruction error (inversion, then Euler back on the ``steps``-step grid with the source prompt,
    guidance 1) of a held-out clip, for each step count, inversion multiple and inversion formula (ε at the
    current or the next σ, ``sample_ddim_inversion``): each formula against the first, then each multiple
    against 1x."""
    latent = frames_to_latent(render_clip(frames, size * 8, size * 8, seed=HELD_OUT_SEED + 1).frames)
    euler = comfy.samplers.sampler_object("euler")
    shape = f"{frames} frames, {size}x{size} latent, {label}"
    for steps in steps_list:
        errors = {}
        for multiple in multiples:
            for formula in formulas:
                x_T, inversion = invert(model, latent, source, steps, "ddim_uniform", multiple, formula)
                recon = comfy.sample.sample_custom(model, torch.zeros_like(x_T), 1.0, euler, inversion.sigmas,
                                                   source, source, x_T, disable_pbar=True)
                errors[formula, multiple] = float((recon - latent).norm() / latent.norm())
            base = errors[formulas[0], multiple]
            for formula in formulas[1:]:
                error = errors[formula, multiple]
                print(f"{error / base:.2f}x  reconstruction error, {formula} / {formulas[0]}, {steps} steps, "
                      f"{multiple}x inversion ({steps * multiple} steps)  (relative error {error:.3f} vs {base:.3f}; "
                      f"{shape})", flush=True)
        for formula in formulas:
            for multiple in multiples[1:]:
                error, base = errors[formula, multiple], errors[formula, multiples[0]]
                print(f"{error / base:.2f}x  reconstruction error, {multiple}x inversion steps ({steps * multiple}) "
                      f"/ {multiples[0]}x, {formula}, sampled on the {steps}-step grid  (relative error {error:.3f}; "
                      f"{shape})", flush=True)


if __name__ == "__main__":
    main()
