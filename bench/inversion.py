"""Inversion and live-injection cost against plain sampling, and finer inversion's reconstruction error, on the
real host with the trained test model (one run, ratios first).

    COMFYUI_PATH=/path/to/ComfyUI python bench/inversion.py [--frames 16] [--size 32] [--steps 10] [--recon-steps 25]
                                                            [--recon-frames 8] [--recon-size 16] [--finer-only]

Targets (issue 3): inversion / plain CFG sampling ≤ 0.6× (one branch instead of two); live injection adds one
source pass (one branch) to the two CFG branches, ≈ 1.5× plain. Issue 15: inverting with 10× the sampling steps
(the papers' practice) and sampling back on the sampling grid cuts the reconstruction error by ≈ 40 %.
The three runs are interleaved (``_timing``: best and median of ``--repeats`` rounds, one torch thread by default).
"""
import argparse

import _timing
import _tve

_tve.real_host()

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import torch  # noqa: E402

from tve.engine.injection import apply_feature_injection
from tve.engine.inversion import invert
from tve.tools.train_test_model import HELD_OUT_SEED  # noqa: E402
from tve.tools.video_world import frames_to_latent, render_clip  # noqa: E402
from tve.tests.trained_model import load_trained_model, trained_conditioning  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--recon-steps", type=int, default=25)
    ap.add_argument("--recon-frames", type=int, default=8)
    ap.add_argument("--recon-size", type=int, default=16)
    ap.add_argument("--finer-only", action="store_true", help="only the finer-inversion reconstruction figures")
    _timing.add_arguments(ap, repeats=2, backends=())
    opts = ap.parse_args()
    _timing.pin_threads(opts.threads)
    # The trained test model: a random-weight UNet's inversion diverges to extreme values whose float arithmetic
    # is several times slower on the CPU, which would time the divergence instead of the method.
    model = load_trained_model()
    source, target, negative = (trained_conditioning(n) for n in ("source", "target", "empty"))
    if opts.finer_only:
        return finer_inversion(model, source, opts.recon_frames, opts.recon_size, opts.recon_steps)
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
    finer_inversion(model, source, opts.recon_frames, opts.recon_size, opts.recon_steps)


def finer_inversion(model, source, frames: int, size: int, steps: int) -> None:
    """Relative reconstruction error (inversion, then Euler back on the ``steps``-step grid with the source prompt,
    guidance 1) of a held-out clip for 1×, 5× and 10× inversion steps per sampling step."""
    latent = frames_to_latent(render_clip(frames, size * 8, size * 8, seed=HELD_OUT_SEED + 1).frames)
    euler = comfy.samplers.sampler_object("euler")
    errors = {}
    for multiple in (1, 5, 10):
        x_T, inversion = invert(model, latent, source, steps, "ddim_uniform", multiple)
        recon = comfy.sample.sample_custom(model, torch.zeros_like(x_T), 1.0, euler, inversion.sigmas, source,
                                           source, x_T, disable_pbar=True)
        errors[multiple] = float((recon - latent).norm() / latent.norm())
    for multiple, error in errors.items():
        print(f"{error / errors[1]:.2f}x  reconstruction error, {multiple}x inversion steps ({steps * multiple}) / 1x, "
              f"sampled on the {steps}-step grid  (relative error {error:.3f}; {frames} frames, {size}x{size} "
              "latent, the trained test model)", flush=True)


if __name__ == "__main__":
    main()
